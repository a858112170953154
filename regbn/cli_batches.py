"""The batches of ``regbn inspect --measure N`` (random) and ``--batches FILE`` (the user's).

Either one makes `regbn.inspect` measure the cross-modal dependence at each fusion. Random
inputs measure the architecture, what it makes of unrelated inputs, not the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._format import one_line
from .fx.shapes.inputs import fake_inputs

__all__ = ["BatchesError", "load_batches", "random_batches"]


class BatchesError(Exception):
    """A ``--batches``/``--measure`` argument the command line refuses (one line, status 2)."""


def load_batches(path: str) -> list[Any]:
    """``--batches FILE``: a ``torch.save``'d list of batches, loaded with weights_only=True."""
    expected = (
        "expected a torch.save'd list of input tuples (or dicts of keyword inputs), one per "
        "batch, e.g. torch.save([(x1, x2), (x1, x2)], 'batches.pt')"
    )
    if not Path(path).is_file():
        raise BatchesError(f"--batches: no such file: {path!r}")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a pickle of other objects, or not a torch file at all
        raise BatchesError(
            f"--batches: cannot load {path!r} ({type(e).__name__}: {one_line(e)[:200]}); "
            f"{expected}"
        ) from None
    if isinstance(loaded, tuple) and not any(isinstance(b, torch.Tensor) for b in loaded):
        loaded = list(loaded)  # a tuple of batches is a list of them
    if not isinstance(loaded, list) or not loaded:
        kind = "an empty list" if isinstance(loaded, list) else f"a {type(loaded).__name__}"
        raise BatchesError(f"--batches: {path!r} holds {kind}; {expected}")
    return loaded


def random_batches(model: nn.Module, shapes: Any, count: int) -> list[Any]:
    """``--measure N``: N batches of random tensors shaped and typed as the ``--input`` shapes
    (floats in the model's dtype, standard normal; integers 0 or 1, valid token ids and mask
    values for any vocabulary; booleans coin flips), seeded: the same numbers on every run."""
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    try:
        # Outside fake mode these are real (uninitialised) tensors of the right shape and dtype.
        positional, named = fake_inputs(model, shapes, None, device)
    except (ValueError, TypeError) as e:
        raise BatchesError(f"--input: {one_line(e)}") from None
    gen = torch.Generator().manual_seed(0)
    template = dict(named) if named else tuple(positional)
    return [_random_like(template, gen) for _ in range(count)]


def _random_like(value: Any, gen: torch.Generator) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            out = torch.randn(value.shape, generator=gen).to(value.dtype)
        elif value.dtype == torch.bool:
            out = torch.rand(value.shape, generator=gen) < 0.5
        else:
            out = torch.randint(0, 2, value.shape, generator=gen).to(value.dtype)
        return out.to(value.device)
    if isinstance(value, dict):
        return {k: _random_like(v, gen) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_random_like(v, gen) for v in value)
    return value
