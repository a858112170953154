"""torch.fx surgery: tracing (what tracing keeps beyond tensor ops: regions.py), shape
propagation, modality analysis, RegBN insertion (the patched model: patched.py) and the check
every insert runs (verify.py)."""

from __future__ import annotations

from .analysis import find_fusions
from .insertion import insert, remove
from .modality import Fusion, annotate_modalities, build_graph, detect_fusions
from .report import InputInfo, Line, Report, Row, inspect
from .report_summary import Summary
from .shapes import ShapeFailure, propagate_shapes
from .tracing import ModeGraphModule, TraceError, trace
from .verify import VerifyError

__all__ = [
    "Fusion",
    "InputInfo",
    "Line",
    "ModeGraphModule",
    "Report",
    "Row",
    "ShapeFailure",
    "Summary",
    "TraceError",
    "VerifyError",
    "annotate_modalities",
    "build_graph",
    "detect_fusions",
    "find_fusions",
    "insert",
    "inspect",
    "propagate_shapes",
    "remove",
    "trace",
]
