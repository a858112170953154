"""Step 1, tracing: the model as a torch.fx graph, with where each node came from.

Owns: symbolic tracing (`trace`, `trace_graph`), the wrappers it looks through (`unwrap`),
what tracing keeps beyond tensor ops (grad-mode and autocast regions, checkpoints, hooked
modules: `regions`), one graph per training mode (`ModeGraphModule`, `mode_graph`), copying a
module's state onto a graph (`module_state`), the patched model's class (`patched`, read here to
trace a model regbn already patched) and trace failures (`TraceError`).

Reads: the user's ``nn.Module`` (or a ``GraphModule``) and the tracing options.

Writes on nodes: ``regbn_module``, ``regbn_module_calls``, ``regbn_output_of``,
``regbn_variable``, ``regbn_region`` and, on placeholders, ``regbn_arg``.
"""

from __future__ import annotations

from .capture import (
    RegBNTracer,
    Traced,
    input_name,
    is_regbn,
    same_trace,
    trace,
    trace_graph,
    unwrap,
)
from .errors import TraceError
from .mode_graph import (  # older pickles name _rebuild_mode_graph_module here
    ModeGraphModule,
    _rebuild_mode_graph_module,
    in_mode,
    same_graph,
)

__all__ = [
    "ModeGraphModule",
    "RegBNTracer",
    "TraceError",
    "Traced",
    "_rebuild_mode_graph_module",
    "in_mode",
    "input_name",
    "is_regbn",
    "same_graph",
    "same_trace",
    "trace",
    "trace_graph",
    "unwrap",
]
