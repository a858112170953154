"""`regbn.insert(..., batches=..., min_dependence=x)`: RegBN only where the branches depend.

The official README (mogvision/regbn) gives one rule for placing RegBN (NeurIPS 2023): it "can
be employed as long as its inputs are not mutually independent". With ``min_dependence``,
`regbn.insert` measures each pair on the user's batches (`regbn.measure_dependence`, through the
training-mode graph it already traced, every module in eval mode) and keeps the pairs whose
dependence above chance (``r2 - r2_shuffled``) reaches ``min_dependence``. The others are named
in one warning with their numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from ...errors import RegBNTypeError, RegBNValueError, RegBNWarning
from ..dependence import measure_graph
from .plan import Plan

__all__ = ["check_dependence_args", "keep_dependent"]


def check_dependence_args(batches: Any, min_dependence: Any) -> None:
    """Refuse ``min_dependence`` without ``batches`` (and the reverse), or a non-number."""
    if min_dependence is None:
        if batches is not None:
            raise RegBNValueError(
                "batches is only used to measure the dependence for min_dependence; "
                "pass min_dependence=x (e.g. 0.05) to insert only where the measure above "
                "chance reaches x, or drop batches"
            )
        return
    if isinstance(min_dependence, bool) or not isinstance(min_dependence, (int, float)):
        raise RegBNTypeError(
            f"min_dependence must be a number, the least dependence above chance "
            f"(r2 - r2_shuffled, 0 to 1) a pair needs; got {type(min_dependence).__name__} "
            f"{min_dependence!r}"
        )
    if not math.isfinite(min_dependence):
        raise RegBNValueError(
            f"min_dependence must be finite (e.g. 0.05); got {min_dependence!r}"
        )
    if batches is None:
        raise RegBNValueError(
            "min_dependence needs batches to measure the dependence on: pass "
            "batches=[...], a few batches each like example_inputs (e.g. batches=[(x1, x2)] or "
            "a DataLoader), or drop min_dependence to insert at every pair"
        )


def keep_dependent(
    gm: fx.GraphModule,
    plans: list[Plan],
    batches: Iterable[Any],
    min_dependence: float,
    model: nn.Module,
) -> list[Plan]:
    """The pairs whose dependence above chance on ``batches`` reaches ``min_dependence``.

    One ``UserWarning`` names the pairs left out and their numbers; a ``RegBNValueError`` says
    so when none is left (there would be nothing to insert).
    """
    pairs = [(p.f_name, p.g_name) for p in plans]
    report = measure_graph(gm, pairs, batches, model=model)
    reached = [row.above_chance >= min_dependence for row in report.rows]
    kept = [plan for plan, ok in zip(plans, reached, strict=True) if ok]
    skipped = [row for row, ok in zip(report.rows, reached, strict=True) if not ok]
    numbers = "; ".join(row.summary() for row in skipped)
    if not kept:
        raise RegBNValueError(
            f"min_dependence={min_dependence}: no pair reaches it, so there is "
            f"nowhere to insert RegBN ({numbers}). Its inputs look independent on these "
            "batches; lower min_dependence, or measure on more (or more varied) batches"
        )
    if skipped:
        warnings.warn(
            f"min_dependence={min_dependence}: skipped {len(skipped)} of "
            f"{len(pairs)} pairs whose dependence above chance (r2 - r2_shuffled) is below it: "
            f"{numbers}",
            RegBNWarning,
            stacklevel=1,
        )
    return kept
