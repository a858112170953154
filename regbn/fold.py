"""``regbn.fold``: every RegBN call of a model as plain torch ops, for deployment.

In eval mode a RegBN layer (RegBN, NeurIPS 2023) computes

    f_r = norm_f_out(norm_f(F) − norm_g(G) · W),   g_out = norm_g_out(norm_g(G))

with the running projection W (Dg×Df) and the norms in their eval form. :func:`fold` writes
exactly these operations into the model's fx graph (the same function, :func:`regbn.layer.
eval_maths`, that the layer runs), keeps W and the norms' tensors as buffers and parameters of a
plain ``nn.Module`` at the layer's path, and drops the RegBN object. The result needs no regbn
import to run, to be pickled and loaded, or to be exported.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, cast

import torch
from torch import fx, nn

from .errors import RegBNValueError, public
from .fx.tracing.module_state import carry_missing_state
from .fx.tracing.patched import is_patched, patched_graphs
from .layer import RegBN, eval_maths, norm_spec

__all__ = ["fold"]

_NORMS = ("norm_f", "norm_g", "norm_f_out", "norm_g_out")


@public
def fold(model: nn.Module) -> fx.GraphModule:
    """Return an eval-mode copy of ``model`` in which each RegBN call is plain torch ops.

    Args:
        model: a model patched by :func:`regbn.insert`, any model holding
            RegBN layers that ``torch.fx.symbolic_trace`` can trace, or a single RegBN layer
            (folded into a module ``(f, g) -> (f_r, g_out)``).

    Returns:
        A ``torch.fx.GraphModule`` in eval mode. Each RegBN at path ``p`` becomes a plain
        ``nn.Module`` at ``p`` holding ``W`` and the norms' tensors (same state-dict keys), and
        its call becomes ``f_r = F − G @ W`` between the norms. A float16/bfloat16 layer is
        folded in float32 (its inputs are cast, its outputs come back in f's dtype). The
        caller's model is not changed.

    Raises:
        RegBNValueError: a lazy RegBN that has seen no batch, a call forced into training mode
            (``is_training=True``), or a model that cannot be traced.

    Example:
        >>> patched = regbn.insert(model, pairs="auto", example_inputs=(gray, colored))
        >>> folded = regbn.fold(patched)  # eval mode, no RegBN class needed to run it
        >>> torch.export.export(folded, (gray, colored))
    """
    for path, module in model.named_modules():
        if isinstance(module, RegBN) and module.f_shape is None:
            where = f"at {path!r} " if path else ""
            raise RegBNValueError(
                f"regbn.fold: the RegBN {where}is lazy and has seen no batch, so it has no W "
                f"yet; train it (or load its checkpoint) before folding"
            )
    gm = _graph_module(model)
    calls = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), RegBN)
    ]
    layers = {str(n.target): cast(RegBN, gm.get_submodule(n.target)) for n in calls}
    for path, layer in layers.items():  # once per layer, however often it is called
        gm.set_submodule(path, _container(layer, _fold_dtype(layer)))
    for node in calls:
        _fold_call(gm, node, layers[str(node.target)])
    graph = gm.graph
    # The tracer class may be regbn's; a pickled GraphModule would then import regbn to load.
    graph._tracer_cls = None
    graph.lint()
    folded = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    return folded.eval()


def _graph_module(model: nn.Module) -> fx.GraphModule:
    """A private fx copy of ``model`` (RegBN calls are ``call_module`` nodes in any trace)."""
    if isinstance(model, RegBN):
        root = nn.Module()
        root.regbn = copy.deepcopy(model)
        graph = fx.Graph()
        f, g = graph.placeholder("f"), graph.placeholder("g")
        graph.output(graph.call_module("regbn", (f, g)))
        return fx.GraphModule(root, graph, class_name="FoldedRegBN")
    # In eval mode before anything reads a graph: a model patched by regbn.insert may hold one
    # graph per mode, and a trace bakes in every Python branch on self.training.
    if isinstance(model, fx.GraphModule):
        return copy.deepcopy(model).eval()
    if is_patched(model):  # regbn.insert's result: its eval graph, over a copy of its modules
        own = copy.deepcopy(model).eval()
        graph = fx.Graph()
        graph.output(graph.graph_copy(patched_graphs(own)[False], {}))
        gm = fx.GraphModule(own, graph, class_name=type(model).__name__)
        carry_missing_state(own, gm)
        return gm.eval()
    try:
        return fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as e:
        raise RegBNValueError(
            f"regbn.fold: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
            f"{e}). Fold the model that regbn.insert returned, or trace the model yourself (a "
            f"GraphModule is folded as it is)"
        ) from e


def _call_inputs(node: fx.Node) -> tuple:
    args, kwargs = list(node.args), dict(node.kwargs)
    names = ("f", "g", "is_training", "n_epoch", "steps_per_epoch")
    bound = dict(zip(names, args, strict=False)) | kwargs
    if bound.get("is_training"):
        raise RegBNValueError(
            f"regbn.fold: the call {node.name} ({node.target}) passes is_training=True, so it "
            f"always runs the training step; a folded model computes the eval maths only. "
            f"Drop is_training from that call before folding"
        )
    return bound["f"], bound["g"]


def _container(layer: RegBN, dtype: torch.dtype) -> nn.Module:
    """A plain module with the layer's W and norms, in the compute dtype."""
    box = nn.Module()
    box.register_buffer("W", layer.W.detach().to(dtype).clone())
    for name in _NORMS:
        box.add_module(name, copy.deepcopy(getattr(layer, name)).to(dtype).eval())
    return box


def _spec_proxies(spec, prefix: str, norm: nn.Module, attr) -> tuple | None:
    """The norm's spec with each tensor replaced by a ``get_attr`` proxy of the folded graph."""
    if spec is None:
        return None
    names = {id(t): n for n, t in (*norm.named_parameters(), *norm.named_buffers())}
    return tuple(
        attr(f"{prefix}.{names[id(x)]}") if isinstance(x, torch.Tensor) else x for x in spec
    )


def _fold_dtype(layer: RegBN) -> torch.dtype:
    """The compute dtype of the folded ops: W's, float32 for a float16/bfloat16 layer."""
    return layer.W.dtype if layer.W.dtype in (torch.float32, torch.float64) else torch.float32


def _fold_call(gm: fx.GraphModule, node: fx.Node, layer: RegBN) -> None:
    """Replace one RegBN ``call_module`` node by the eval maths, written as graph nodes that
    read the tensors of the plain module now at the layer's path."""
    path = str(node.target)
    box = gm.get_submodule(path)
    dtype = _fold_dtype(layer)
    f_node, g_node = _call_inputs(node)
    graph = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)

    def attr(name: str) -> fx.Proxy:
        return fx.Proxy(graph.get_attr(f"{path}.{name}"), tracer)

    with graph.inserting_before(node):
        # fx Proxies stand in for the tensors: eval_maths records its ops as graph nodes.
        f: Any = fx.Proxy(f_node, tracer)
        g: Any = fx.Proxy(g_node, tracer)
        W: Any = attr("W")
        fs, gs = layer.f_shape, layer.g_shape
        assert fs is not None and gs is not None  # fold refuses lazy layers up front
        specs = [
            _spec_proxies(norm_spec(getattr(box, n)), n, getattr(box, n), attr) for n in _NORMS
        ]
        f_r: Any
        g_out: Any
        f_r, g_out = eval_maths(
            f, g, W, specs, fs, gs, dtype, layer.projection
        )
        # Like the layer: both outputs in f's dtype.
        outs = (f_r.to(f.dtype).node, g_out.to(f.dtype).node)
    for user in list(node.users):
        index = user.args[1] if len(user.args) > 1 else None
        if user.op == "call_function" and user.target is operator.getitem and index in (0, 1):
            user.replace_all_uses_with(outs[cast(int, index)])
            graph.erase_node(user)
        else:
            user.args = fx.node.map_arg(user.args, lambda n: outs if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: outs if n is node else n)
    graph.erase_node(node)
