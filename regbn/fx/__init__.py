"""torch.fx surgery: tracing, shape propagation, modality analysis and RegBN insertion."""

from __future__ import annotations

from .shapes import ShapeFailure, propagate_shapes
from .tracing import TraceError, trace

__all__ = ["ShapeFailure", "TraceError", "propagate_shapes", "trace"]
