"""The JSON view of a report (``report.to_dict()``, ``regbn inspect --json``).

Lists, strings, numbers and None only: ``json.dumps(report.to_dict())`` always works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..._format import shape_to_json
from ..modality.fusions import Fusion
from .data import param_items

if TYPE_CHECKING:
    from .data import ReportData

__all__ = ["fusion_to_dict", "to_dict"]


def to_dict(report: ReportData) -> dict[str, Any]:
    """The report as a JSON-ready dict; ``dependence`` is None unless batches were measured."""
    fail = report.failure
    return {
        "model": report.model_name,
        "inputs": [i.to_dict() for i in report.inputs],
        "rows": [row.to_dict() for row in report.rows],
        "fusions": [fusion_to_dict(f) for f in report.fusions],
        "pairs": [list(p) for p in report.pairs],
        "skipped": list(report.skipped),
        "parameters": {
            "total": report.total_params,
            "by_modality": dict(param_items(report)),
        },
        "failure": None
        if fail is None
        else {
            "node": fail.node_name,
            "target": str(fail.target),
            "input_shapes": [shape_to_json(s) for s in fail.input_shapes or ()],
            "message": str(fail.message),
        },
        "dependence": None if report.dependence is None else report.dependence.to_dict(),
    }


def fusion_to_dict(fusion: Fusion) -> dict[str, Any]:
    return {
        "name": fusion.name,
        "kind": fusion.kind,
        "operands": list(fusion.operands),
        "modalities": [sorted(m) for m in fusion.modalities],
        "shapes": [shape_to_json(s) for s in fusion.shapes],
        "pair": list(fusion.pair),
        "pair_shapes": [shape_to_json(s) for s in fusion.pair_shapes],
        "projection_bytes": fusion.projection_bytes,
        "module": fusion.module,
        "output_shape": shape_to_json(fusion.output_shape),
    }
