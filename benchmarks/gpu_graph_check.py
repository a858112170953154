"""The RegBN training step as one CUDA graph, with no host sync (run by gpu_check.sh).

    python benchmarks/gpu_graph_check.py results/graph_cuda.json

At the official README's shape (B=50; f 512 | g 64×7×7) with the official example's options:
compiles the training step with ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA
graphs), checks its outputs, input gradient and running W against an eager copy, replays it
under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync inside the step raises), and
times it. Exit status 0 when there is no sync and the compiled step matches eager.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

import regbn


def main(out_path: str) -> int:
    dev = torch.device("cuda")
    opts = dict(normalize_input=True, normalize_output=True, affine=True)
    layer = regbn.RegBN(512, 64, [], [7, 7], **opts).to(dev)
    eager = copy.deepcopy(layer)
    step = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    f = torch.randn(50, 512, device=dev, generator=gen, requires_grad=True)
    g = torch.randn(50, 64, 7, 7, device=dev, generator=gen, requires_grad=True)

    def train(run) -> tuple[torch.Tensor, torch.Tensor]:
        f.grad = g.grad = None
        f_r, g_out = run(f, g)
        (f_r.sum() + g_out.square().sum()).backward()
        assert f.grad is not None
        return f_r.detach().clone(), f.grad.clone()

    for _ in range(3):  # compile, record, replay
        got, want = train(step), train(eager)
    torch.cuda.synchronize()
    out: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    out["max_abs_diff_f_r"] = (got[0] - want[0]).abs().max().item()
    out["max_abs_diff_grad_f"] = (got[1] - want[1]).abs().max().item()
    out["max_abs_diff_W"] = (layer.W - eager.W).abs().max().item()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            train(step)
        out["host_syncs_in_compiled_step"] = 0
    except RuntimeError as err:  # a synchronising call inside the step
        out["host_syncs_in_compiled_step"] = f"a sync: {err}"[:600]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        train(step)
    torch.cuda.synchronize()
    out["compiled_step_ms_B50"] = (time.perf_counter() - t0) / n * 1e3
    layer.check_status()  # no batch was rejected
    print(json.dumps(out, indent=2))
    with open(out_path, "w") as fh:
        json.dump(out, fh, indent=2)
    ok = out["host_syncs_in_compiled_step"] == 0 and out["max_abs_diff_W"] < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "graph_cuda.json"))
