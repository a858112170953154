"""Training and eval mode of a traced model: one graph per mode.

Code that reads ``self.training`` (``F.dropout(x, p, self.training)``, stochastic depth, many
Hugging Face layers) is frozen into an fx graph with the mode the model had while it was traced.
`ModeGraphModule` holds one graph per mode and follows ``train()``/``eval()``; `in_mode` puts a
model in one mode for a trace and restores every module's flag afterwards; `same_graph` says
whether two traces run the same code.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, cast

import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _format_import_block, reduce_graph_module
from torch.package import sys_importer

from .module_state import assign, carry_missing_state, lookup

__all__ = ["ModeGraphModule", "in_mode", "same_graph"]


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model.train(training)`` for the duration, then every module's own flag as it was.

    A `ModeGraphModule` also gets the graph of its original mode back.
    """
    flags = [(m, m.training) for m in model.modules()]
    current = not isinstance(model, ModeGraphModule) or model.graph is model.mode_graphs[training]
    if current and all(flag is training for _, flag in flags):  # nothing to switch or restore
        yield model
        return
    model.train(training)
    try:
        yield model
    finally:
        if isinstance(model, ModeGraphModule):
            model.train(flags[0][1])
        for m, flag in flags:
            m.training = flag


def _signature(graph: fx.Graph) -> list[tuple[Any, ...]]:
    def name(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: ("%node", n.name))

    return [(n.name, n.op, n.target, name(n.args), name(n.kwargs)) for n in graph.nodes]


def same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """True when ``a`` and ``b`` run the same code: same nodes, ops, targets and arguments."""
    if len(a.nodes) != len(b.nodes):
        return False
    try:
        return bool(_signature(a) == _signature(b))
    except (RuntimeError, TypeError, ValueError):  # tensors among the arguments: ambiguous ==
        return False



class ModeGraphModule(fx.GraphModule):
    """A ``GraphModule`` with one graph for training and one for evaluation.

    ``train()`` and ``eval()`` switch ``graph`` (and the generated ``forward``) to that mode's
    graph; both graphs call the same submodules, so parameters, buffers and ``state_dict`` keys
    are shared, never duplicated. ``graph`` and ``code`` are those of the current mode, and so is
    what any tracer that re-traces this module sees (``torch.fx.symbolic_trace``, a
    ``DataParallel`` replica, ``torch.export``). ``mode_graphs`` gives both; an edit to one graph
    applies to that mode only. Setting ``module.training`` by hand does not switch graphs; call
    ``train()``/``eval()``.

    Why two graphs rather than one: fx graphs have no control flow, and ``self.training`` decides
    Python-level branches (stochastic depth skips its ops in eval mode), so one graph cannot hold
    both behaviours. torchvision's ``create_feature_extractor`` takes the same route; `regbn.insert`
    only builds this class when the two traces differ, so models without mode-dependent code keep
    a plain ``GraphModule``.
    """

    def __init__(
        self,
        root: nn.Module,
        train_graph: fx.Graph,
        eval_graph: fx.Graph,
        class_name: str = "GraphModule",
        eval_root: nn.Module | None = None,
    ) -> None:
        super().__init__(root, train_graph, class_name)
        self._merge_targets(eval_root if eval_root is not None else root, eval_graph)
        self._mode_graphs = {True: train_graph, False: eval_graph}
        self._select(self.training)

    def _merge_targets(self, source: nn.Module, graph: fx.Graph) -> None:
        """Give ``self`` every attribute ``graph`` reads; a name taken by a different object (a
        constant that differs between modes) is renamed in ``graph``."""
        for node in graph.nodes:
            if node.op not in ("get_attr", "call_module"):
                continue
            wanted = lookup(source, str(node.target))
            mine = lookup(self, str(node.target))
            if mine is wanted:
                continue
            target = str(node.target)
            if mine is not None:
                k = 0
                while lookup(self, f"{target}_eval{k}") is not None:
                    k += 1
                target = f"{target}_eval{k}"
                node.target = target
            assign(self, target, wanted)

    @property
    def mode_graphs(self) -> dict[bool, fx.Graph]:
        """``{True: training graph, False: evaluation graph}``."""
        return dict(self._mode_graphs)

    def _select(self, training: bool) -> None:
        graph = self._mode_graphs[bool(training)]
        if self._graph is not graph:
            self.graph = graph  # recompiles forward

    def train(self, mode: bool = True) -> ModeGraphModule:
        super().train(mode)
        self._select(mode)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ModeGraphModule:
        res = cast(ModeGraphModule, super().__deepcopy__(memo))
        # self.__dict__ was deep-copied with the same memo: this returns those copies.
        res._mode_graphs = copy.deepcopy(self._mode_graphs, memo)
        for graph in res._mode_graphs.values():
            graph.owning_module = res
        res._select(res.training)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        # Like GraphModule: the generated code of each graph, not the graphs themselves.
        body = self.__dict__.copy()
        del body["_graph"]
        graphs = body.pop("_mode_graphs")
        sources = {}
        for mode, graph in graphs.items():
            code = graph.python_code(root_module="self")
            sources[mode] = (code.src, _format_import_block(code.globals, sys_importer))
        return (_rebuild_mode_graph_module, (body, sources, type(self).__name__))


def _rebuild_mode_graph_module(
    body: dict[str, Any], sources: dict[bool, tuple[str, str]], class_name: str
) -> ModeGraphModule:
    built = {
        mode: reduce_graph_module(dict(body, _code=src), block)
        for mode, (src, block) in sources.items()
    }
    # reduce_graph_module is typed as returning a plain Module; it builds a GraphModule.
    train, ev = cast(fx.GraphModule, built[True]), cast(fx.GraphModule, built[False])
    out = ModeGraphModule(train, train.graph, ev.graph, class_name, eval_root=ev)
    carry_missing_state(built[True], out)
    out.meta = body.get("meta", {})
    return out
