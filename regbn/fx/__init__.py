"""torch.fx surgery: trace a model, infer its shapes, find where its modality branches fuse and
splice RegBN in. The pipeline's steps, in order; each imports only the steps before it:

1. `tracing`     the model as a torch.fx graph, and where each node came from; what tracing
                 keeps beyond tensor ops (regions); one graph per training mode; the patched
                 model's class.
2. `shapes`      every node's shape record, on real or fake inputs; `verify`, which runs the
                 traced graph beside the model with the same interpreters.
3. `names`       the tensor names users pass (inputs, module paths, the code's own spelling).
4. `modality`    which inputs each node depends on, and the fusions.
5. `analysis`    steps 1-4 run once, for `inspect`, `find_fusions`, `insert` and
                 `measure_dependence`.
6. `dependence`  how much of f the other modality's g explains, at a pair or at each fusion.
7. `insertion`   `insert` and `remove`.
8. `report`      `inspect`'s `Report`: its data, then its views (text, HTML, JSON, picture).

Node meta keys (``node.meta[...]``), by the step that writes them:

- ``regbn_module`` (1): dotted path of the innermost module call the node belongs to, or None.
- ``regbn_module_calls`` (1): the stack of module calls, outermost first, ``(path, index)``.
- ``regbn_output_of`` (1): the ``(path, index)`` calls whose return value is this node.
- ``regbn_variable`` (1): the local variable of the model's forward that holds the value.
- ``regbn_region`` (1): ``"grad"``, ``"autocast"``, ``"checkpoint"`` or ``"setattr"`` on the
  nodes that tracing keeps beyond tensor ops.
- ``regbn_arg`` (1): a placeholder's argument name.
- ``regbn_tensor`` (2): the node's `ShapeRecord` (shape, dtype, device, nested structure);
  read through `regbn.fx.shapes.tensor_record`.
- ``regbn_input`` (4): the input label of a placeholder or of an entry of a dict/tuple input.
- ``regbn_modalities`` (4): the modalities (input names) the node's value depends on.
- ``regbn_constant`` (4): True where no input's value reaches the node.
- ``regbn_fusion`` (4): the `Fusion` at this node, or None.
- ``regbn_fusions`` (4): every pairwise fusion at a node with three or more operands.
- ``regbn_role`` (7): ``"layer"``, ``"f_r"`` or ``"g_out"`` on an inserted layer's nodes.
- ``regbn_pair`` (7): the ``(f, g)`` names of an inserted layer's call.

On the graph module (``gm.meta``): ``regbn_inserted`` (7), the names of the layers insert added.
"""

from __future__ import annotations

from .analysis import find_fusions
from .insertion import insert, remove
from .modality import Fusion, annotate_modalities, build_graph, detect_fusions
from .report import InputInfo, Line, Report, Row, Summary, inspect
from .shapes import ShapeFailure, VerifyError, propagate_shapes
from .tracing import ModeGraphModule, TraceError, trace

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
