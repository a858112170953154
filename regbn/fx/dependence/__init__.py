"""Step 6, dependence: how much of f the other modality's g explains, at a pair or a fusion.

Owns: the measure itself and its result types (`core`: `DependenceReport`, `DependenceRow`,
`dependence_of`) and running it on a traced graph over batches (`measure`:
`measure_dependence`, `measure_graph`, `measure_fusions`). The entry points that take
``batches=`` (`regbn.inspect`, `regbn.insert`) call it after analysis; it imports nothing of
insertion or the report.

Reads: an analysed graph (steps 1-5) and the user's batches.

Writes on nodes: nothing.
"""

from __future__ import annotations

from .core import DependenceReport, DependenceRow, dependence_of
from .measure import (
    DependenceMeter,
    measure_dependence,
    measure_fusions,
    measure_graph,
    pairs_of_fusions,
)

__all__ = [
    "DependenceMeter",
    "DependenceReport",
    "DependenceRow",
    "dependence_of",
    "measure_dependence",
    "measure_fusions",
    "measure_graph",
    "pairs_of_fusions",
]
