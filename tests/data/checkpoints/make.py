"""Write the checkpoints that tests/test_checkpoints.py loads, from the regbn on sys.path.

Each format RegBN has saved is kept as it was written, by the code that wrote it: check out a
commit of that format and run this script with that commit's regbn first on the path, e.g.

    git worktree add --detach /tmp/old-81565b1 81565b1
    PYTHONPATH=/tmp/old-81565b1 python tests/data/checkpoints/make.py v1-shapes 81565b1
    git worktree remove /tmp/old-81565b1

(``python tests/data/checkpoints/make.py v2 HEAD`` in this tree for the current format). The
files here were written with torch 2.13.0 on the CPU by:

=================  =======  ========================================================================
file prefix        commit   ``_extra_state`` (metadata version)
=================  =======  ========================================================================
v1-dict            a7da30a  ``{"f_shape": ..., "g_shape": ...}`` (1; None in both when lazy)
v1-shapes          81565b1  int64 ``[len f, *f, len g, *g]`` (1; empty when lazy)
v1-projection      534e246  the same + projection code (1; ``[-1, code]`` when lazy)
v1-options         4d7529c  the same + eval-options bits (1; ``[-1, code, bits]`` when lazy)
v2                 ee5e3b4  as v1-options (2: ``RegBN._version``)
=================  =======  ========================================================================

Per prefix: ``-full.pt`` a trained layer (f 2×3×3, g 3×2×2, input norms with running
statistics, affine norms with trained scale and shift), ``-channel.pt`` the same with
``projection="channel"`` (f 2×3×3, g 3×3×3; not at a7da30a, before the option), ``-lazy.pt`` a
lazy ``RegBN()`` that never saw a batch (not at a7da30a, whose lazy layer could not be saved).
Each file holds ``{"state_dict", "args", "kwargs", "input", "eval_output", "commit"}``:
``RegBN(*args, **kwargs)`` rebuilds the layer, and in eval mode it maps ``input`` (f, g) to
``eval_output`` (f_r, g_out).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

from regbn import RegBN

HERE = Path(__file__).resolve().parent


def trained(args: tuple, kwargs: dict) -> dict:
    torch.manual_seed(0)
    layer = RegBN(*args, **kwargs).double()
    fs, gs = (args[0], *args[2]), (args[1], *args[3])
    for _ in range(3):
        f = torch.randn(8, *fs, dtype=torch.float64)
        # g shares a per-sample offset with f, so that W is not near zero
        shift = f.flatten(1).mean(1).reshape(8, *[1] * len(gs))
        g = torch.randn(8, *gs, dtype=torch.float64) + 2 * shift
        f_r, g_out = layer(f, g)
        loss = f_r.square().mean() + g_out.mean()
        layer.zero_grad()
        loss.backward()
        # One SGD step, so that the affine norms' scale and shift are not 1 and 0.
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.1 * p.grad
    layer.eval()
    f = torch.randn(4, *fs, dtype=torch.float64)
    g = torch.randn(4, *gs, dtype=torch.float64)
    with torch.no_grad():
        out = layer(f, g)
    return {"state_dict": layer.state_dict(), "input": (f, g),
            "eval_output": tuple(x.clone() for x in out)}


def main(prefix: str, commit: str) -> None:
    options = {"normalize_input": True, "normalize_output": True, "affine": True}
    cases = {"full": ((2, 3, [3, 3], [2, 2]), options)}
    if "projection" in inspect.signature(RegBN).parameters:
        cases["channel"] = ((2, 3, [3, 3], [3, 3]), {**options, "projection": "channel"})
    for name, (args, kwargs) in cases.items():
        record = trained(args, kwargs)
        torch.save({**record, "args": args, "kwargs": kwargs, "commit": commit},
                   HERE / f"{prefix}-{name}.pt")
    try:
        lazy = RegBN().state_dict()
    except Exception as err:  # the first formats could not save a lazy layer
        print(f"{prefix}: no lazy checkpoint ({type(err).__name__}: {err})")
    else:
        torch.save({"state_dict": lazy, "args": (), "kwargs": {}, "commit": commit},
                   HERE / f"{prefix}-lazy.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
