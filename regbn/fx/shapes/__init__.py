"""Step 2, shapes: every node's tensor facts, from a run on real or fake inputs.

Owns: shape propagation (`propagate_shapes`, on example inputs or on fake tensors built from
``input_shapes``), arranging and faking the inputs (`inputs`), the shortcut for ops whose output
has their input's shape (`fast`), the one shape record per node and its accessors (`record`:
`ShapeRecord`, `tensor_record`), and the check every insert runs, which runs the traced graph
beside the model with the same interpreters (`verify`: `VerifyError`).

Reads: a traced graph (step 1) and the example inputs or input shapes.

Writes on nodes: ``regbn_tensor``, a `ShapeRecord` (shape, dtype, device, and for a tuple,
list or dict of tensors the same structure of ``(shape, dtype)``).
"""

from __future__ import annotations

from .propagate import ShapeFailure, ShapeInterpreter, ThawingInterpreter, propagate_shapes
from .record import ShapeRecord, tensor_record
from .verify import VerifyError

__all__ = [
    "ShapeFailure",
    "ShapeInterpreter",
    "ShapeRecord",
    "ThawingInterpreter",
    "VerifyError",
    "propagate_shapes",
    "tensor_record",
]
