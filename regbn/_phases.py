"""Profiler labels for the phases of a RegBN training step.

Each phase runs under ``torch.profiler.record_function("regbn.<phase>")`` while a profiler is
recording, so a trace shows where a step spends its time (the profiling benchmark reads these
labels). Outside a profiler no label is created: the check costs a tenth of a microsecond,
a ``record_function`` several.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

__all__ = ["PHASES", "phase"]

# In the order a training step runs them; the backward pass is labelled by the profiler itself.
PHASES = (
    "input_norms",
    "checks",
    "gram",
    "eigh",
    "secular_root",
    "projections",
    "w_batch",
    "running_update",
    "output_norms",
)


def phase(name: str) -> AbstractContextManager:
    """The label ``regbn.<name>`` while a profiler records, else a context that does nothing."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(f"regbn.{name}")
    return contextlib.nullcontext()
