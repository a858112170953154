"""Splice RegBN layers into a traced model: `insert` and `remove`.

A pair ``(f, g)`` means "normalise tensor f with respect to tensor g". The layer is called once both
tensors exist, and every use of f and of g (other than the layer itself) reads ``f_r`` and ``g_out``
instead, exactly as if the call had been written by hand. Nodes are then re-ordered topologically
(networkx), moving as little as possible.

When g feeds f (f is computed from g), the uses of g on the way to f come before the layer and
keep the raw g; the later ones read ``g_out``. A pair whose f feeds g is refused: every use of f
is rewired, so the layer would need its own output (a cycle).
"""

from __future__ import annotations

import copy as copy_module
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ..layer import RegBN
from .modality import annotate_modalities, build_graph, detect_fusions
from .names import INSPECT_HINT, entry_name, is_ambiguous, resolve_name
from .shapes import propagate_shapes
from .tracing import carry_missing_state, is_regbn, trace

__all__ = ["insert", "remove", "resolve_name", "is_ambiguous"]

_LAYER_NAME = re.compile(r"^regbn_(\d+)$")


# ----------------------------------------------------------------------------- validation


@dataclass
class _Plan:
    f: fx.Node
    g: fx.Node
    f_name: str
    g_name: str
    layer: nn.Module


def _normalise_pairs(pairs: Any) -> list[tuple[str, str]] | str:
    if isinstance(pairs, str):
        if pairs == "auto":
            return "auto"
        raise ValueError(
            f"pairs must be 'auto' or a list of (f, g) name pairs; got the string {pairs!r}. "
            "Example: pairs=[('gray_net.fc', 'colored_net.fc')]"
        )
    if (
        isinstance(pairs, (tuple, list))
        and len(pairs) == 2
        and all(isinstance(p, str) for p in pairs)
    ):
        pairs = [pairs]  # one pair given bare: ("a", "b")
    if not isinstance(pairs, Iterable):
        raise TypeError(
            f"pairs must be 'auto' or a list of (f, g) name pairs; got {type(pairs).__name__} "
            f"{pairs!r}"
        )
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(pairs):
        if (
            isinstance(pair, str)
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(p, str) for p in pair)
        ):
            raise TypeError(
                f"pair {i}: each pair must be two names (f, g), f normalised with respect to g; "
                f"got {pair!r}. Example: ('gray_net.fc', 'colored_net.fc')"
            )
        out.append((pair[0], pair[1]))
    if not out:
        raise ValueError("pairs is empty; give at least one (f, g) pair, or pairs='auto'")
    return out


def _check_tensor(node: fx.Node, name: str, where: str) -> tuple[int, ...]:
    shape = node.meta.get("regbn_shape")
    if shape is None:
        nested = node.meta.get("regbn_nested")
        entries = [
            entry_name(node, u.args[1]) if node.op == "placeholder" else u.name
            for u in node.users
            if u.op == "call_function" and u.target is operator.getitem
        ]
        hint = f"; name one of its entries instead: {entries}" if entries else ""
        what = f"a {type(nested).__name__}" if nested is not None else "not a tensor"
        raise ValueError(
            f"{where}: {name!r} (node {node.name}) is {what}, but RegBN needs one tensor{hint}"
        )
    dtype = node.meta.get("regbn_dtype")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"{where}: {name!r} holds {dtype} values; RegBN normalises floating-point features "
            "(pair an embedding output, not token ids)"
        )
    if len(shape) < 2:
        raise ValueError(
            f"{where}: RegBN needs tensors shaped (batch, channels, ...); {name!r} has shape "
            f"{tuple(shape)}. Pair a tensor with a channel dimension, e.g. before a final "
            ".squeeze()/.sum(-1)"
        )
    return tuple(shape)


def _refuse_path(graph: nx.DiGraph, a: str, b: str, names: tuple[str, str], where: str) -> None:
    if nx.has_path(graph, a, b):
        path = " -> ".join(nx.shortest_path(graph, a, b))
        raise ValueError(
            f"{where}: {names[1]!r} is computed from {names[0]!r} ({path}). RegBN removes from f "
            "what g explains, and every use of f is rewired to the layer's output f_r; when f "
            "feeds g that would feed the layer's output back into its own input (a cycle). Pair "
            "tensors from separate branches, e.g. the two inputs of the fusion "
            "(regbn.find_fusions lists them), or swap f and g"
        )


def _build_layer(f: tuple[int, ...], g: tuple[int, ...], f_node: fx.Node, kwargs: dict):
    device = f_node.meta.get("regbn_device") or torch.device("cpu")
    try:
        with torch.device(device):
            layer = RegBN(
                f_num_channels=f[1],
                g_num_channels=g[1],
                f_layer_dim=list(f[2:]),
                g_layer_dim=list(g[2:]),
                **kwargs,
            )
    except TypeError as e:
        raise TypeError(f"regbn_kwargs: {e}; they are passed to every regbn.RegBN layer") from e
    if f_node.meta.get("regbn_dtype") == torch.float64:
        layer = layer.to(torch.float64)
    return layer


def _plan(
    gm: fx.GraphModule, pairs, model: nn.Module, kwargs: dict, graph: nx.DiGraph
) -> list[_Plan]:
    """Resolve and check every pair, simulating the edits on ``graph`` (`build_graph` of ``gm``,
    which this mutates); the fx graph is untouched."""
    resolved: list[tuple[fx.Node, fx.Node, str, str]] = []
    for i, (f_name, g_name) in enumerate(pairs):
        where = f"pair {i}"
        f = resolve_name(gm, f_name, where, model)
        g = resolve_name(gm, g_name, where, model)
        resolved.append((f, g, f_name, g_name))
    current: dict[str, str] = {}  # original node name -> name of its latest normalised form
    plans: list[_Plan] = []
    for i, (f, g, f_name, g_name) in enumerate(resolved):
        where = f"pair {i}"
        fs = _check_tensor(f, f_name, where)
        gs = _check_tensor(g, g_name, where)
        if f is g:
            raise ValueError(
                f"{where}: f and g are the same tensor ({f_name!r} and {g_name!r} both name node "
                f"{f.name}); RegBN normalises one tensor with respect to another"
            )
        if fs[0] != gs[0]:
            raise ValueError(
                f"{where}: batch sizes differ: {f_name!r} has shape {fs}, {g_name!r} has {gs}; "
                "RegBN pairs samples, so both need the same first dimension"
            )
        fc, gc = current.get(f.name, f.name), current.get(g.name, g.name)
        _refuse_path(graph, fc, gc, (f_name, g_name), where)
        _simulate(graph, fc, gc, i, current, f.name, g.name)
        plans.append(_Plan(f, g, f_name, g_name, _build_layer(fs, gs, f, kwargs)))
    return plans


def _simulate(graph: nx.DiGraph, f: str, g: str, i: int, current: dict, f0: str, g0: str) -> None:
    layer, f_r, g_out = f"<regbn_{i}>", f"<regbn_{i}.f_r>", f"<regbn_{i}.g_out>"
    upstream = nx.ancestors(graph, f) | {f}  # uses of g that f needs stay raw
    for src, out in ((f, f_r), (g, g_out)):
        for user in list(graph.successors(src)):
            if src == g and user in upstream:
                continue
            graph.remove_edge(src, user)
            graph.add_edge(out, user)
        graph.add_edge(src, layer)
        graph.add_edge(layer, out)
    current[f0], current[g0] = f_r, g_out


# ----------------------------------------------------------------------------- graph edits


def _next_layer_index(gm: fx.GraphModule) -> int:
    used = [int(m.group(1)) for name in gm._modules if (m := _LAYER_NAME.match(name))]
    return max(used) + 1 if used else 0


def _splice(gm: fx.GraphModule, plans: list[_Plan], start: int) -> list[str]:
    graph = gm.graph
    current: dict[fx.Node, fx.Node] = {}
    names = []
    for i, plan in enumerate(plans):
        name = f"regbn_{start + i}"
        gm.add_submodule(name, plan.layer)
        names.append(name)
        f = current.get(plan.f, plan.f)
        g = current.get(plan.g, plan.g)
        order = {n: k for k, n in enumerate(graph.nodes)}
        anchor = f if order[f] > order[g] else g
        with graph.inserting_after(anchor):
            call = graph.call_module(name, (f, g))
        with graph.inserting_after(call):
            f_r = graph.call_function(operator.getitem, (call, 0))
        with graph.inserting_after(f_r):
            g_out = graph.call_function(operator.getitem, (call, 1))
        _annotate_new(call, f_r, g_out, f, g, plan)
        upstream = _upstream(f)
        f.replace_all_uses_with(f_r, delete_user_cb=lambda u, c=call: u is not c)
        g.replace_all_uses_with(
            g_out, delete_user_cb=lambda u, c=call, up=upstream: u is not c and u not in up
        )
        current[plan.f], current[plan.g] = f_r, g_out
    return names


def _upstream(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it is computed from (what ``nx.ancestors`` gives on the graph)."""
    seen = {node}
    stack = [node]
    while stack:
        for src in stack.pop().all_input_nodes:
            if src not in seen:
                seen.add(src)
                stack.append(src)
    return seen


def _annotate_new(call, f_r, g_out, f, g, plan: _Plan) -> None:
    mods = f.meta.get("regbn_modalities", frozenset()) | g.meta.get("regbn_modalities", frozenset())
    call.meta.update(
        regbn_module=call.target,
        regbn_module_calls=((call.target, 0),),
        regbn_output_of=[(call.target, 0)],
        regbn_shape=None,
        regbn_nested=(
            (f.meta.get("regbn_shape"), f.meta.get("regbn_dtype")),
            (g.meta.get("regbn_shape"), g.meta.get("regbn_dtype")),
        ),
        regbn_modalities=mods,
        regbn_fusion=None,
        regbn_role="layer",
        regbn_pair=(plan.f_name, plan.g_name),
    )
    for out, src, role in ((f_r, f, "f_r"), (g_out, g, "g_out")):
        out.meta.update(
            regbn_module=call.target,
            regbn_module_calls=((call.target, 0),),
            regbn_shape=src.meta.get("regbn_shape"),
            regbn_dtype=src.meta.get("regbn_dtype"),
            regbn_device=src.meta.get("regbn_device"),
            regbn_nested=None,
            regbn_modalities=mods,
            regbn_fusion=None,
            regbn_role=role,
        )


def reorder_topologically(gm: fx.GraphModule) -> None:
    """Put nodes in a valid order, keeping the existing one wherever it is already valid."""
    nodes = list(gm.graph.nodes)
    position = {n.name: (0 if n.op == "placeholder" else 1, k) for k, n in enumerate(nodes)}
    order = list(nx.lexicographical_topological_sort(build_graph(gm), key=position.__getitem__))
    by_name = {n.name: n for n in nodes}
    if order == [n.name for n in nodes]:
        return
    prev = by_name[order[0]]
    if prev is not nodes[0]:
        nodes[0].prepend(prev)
    for name in order[1:]:
        node = by_name[name]
        if prev.next is not node:
            prev.append(node)
        prev = node


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    return gm


def _fresh_graph_module(model: fx.GraphModule, skip: Iterable[str] = ()) -> fx.GraphModule:
    """A new GraphModule over a copy of ``model``'s graph, sharing its submodules and tensors."""
    graph = copy_module.deepcopy(model.graph)
    out = fx.GraphModule(model, graph, type(model).__name__)
    carry_missing_state(model, out, skip=tuple(skip))
    out.meta.update(getattr(model, "meta", {}))
    return out


# ----------------------------------------------------------------------------- public API


def insert(
    model: nn.Module,
    pairs: Any,
    example_inputs: Any = None,
    *,
    input_shapes: Any = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Any = None,
    autowrap_functions: Any = None,
    copy: bool = False,
    **regbn_kwargs: Any,
) -> fx.GraphModule:
    """Return ``model`` as a ``GraphModule`` with a `regbn.RegBN` layer spliced in per pair.

    ``pairs``: a list of ``(f, g)`` names, "normalise f with respect to g", applied in order (a
    tensor normalised by an earlier pair enters later pairs normalised), or ``"auto"``: one layer
    per fusion of `find_fusions`, on its ``pair`` (the fusion's first tensor operand normalised
    with respect to its second). A name is an input (``"gray"``, ``"batch['audio']"``), a dotted
    module path (the output of that call), or an fx node name; prefix ``input:``, ``module:`` or
    ``node:`` to pick one when a name is ambiguous.

    Shapes come from ``example_inputs`` (real tensors) or ``input_shapes`` (fake tensors; no
    memory). Layers are named ``regbn_0``, ``regbn_1``, ... (continuing after existing ones) and get
    ``regbn_kwargs``. The result shares the model's parameters and buffers (``copy=True`` for an
    independent copy), keeps every ``state_dict`` key, and has the model's training mode. The
    model itself is never modified; nothing is touched unless every pair is valid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"insert expects an nn.Module as model; got {type(model).__name__}")
    wanted = _normalise_pairs(pairs)
    if example_inputs is None and input_shapes is None:
        raise ValueError(
            "insert needs example_inputs (real tensors) or input_shapes (e.g. "
            "[(8, 1, 28, 28), (8, 3, 28, 28)]) to infer each RegBN layer's dims"
        )
    if copy:
        model = copy_module.deepcopy(model)
    traced = trace(
        model,
        concrete_args=concrete_args,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
    )
    gm = _fresh_graph_module(traced) if traced is model else traced
    gm.training = model.training
    failure = propagate_shapes(gm, example_inputs=example_inputs, input_shapes=input_shapes)
    if failure is not None:
        raise ValueError(
            f"insert: cannot infer RegBN dims, {failure}. Check example_inputs/input_shapes "
            "against the model's forward, or run regbn.inspect(model, ...) to see the shapes "
            "up to that node"
        )
    graph = annotate_modalities(gm)  # reused by the planning: the fx graph is unchanged until then
    if wanted == "auto":
        wanted = _auto_pairs(gm)
    plans = _plan(gm, wanted, model, regbn_kwargs, graph)
    for plan in plans:
        plan.layer.train(model.training)
    _splice(gm, plans, _next_layer_index(gm))
    reorder_topologically(gm)
    return _finish(gm)


def _auto_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    fusions = detect_fusions(gm)
    if not fusions:
        raise ValueError(
            "pairs='auto': found no fusion (no node whose tensor operands come from disjoint "
            "sets of inputs), so there is nowhere to insert RegBN. Name the pairs explicitly; "
            f"{INSPECT_HINT}"
        )
    return [(f"node:{fu.pair[0]}", f"node:{fu.pair[1]}") for fu in fusions]


def _inserted_layers(gm: fx.GraphModule) -> list[fx.Node]:
    calls = []
    for node in gm.graph.nodes:
        if not (is_regbn(gm, node) and _LAYER_NAME.match(str(node.target))):
            continue
        if all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            calls.append(node)
    return calls


def remove(patched: fx.GraphModule) -> fx.GraphModule:
    """Return ``patched`` without the RegBN layers `insert` added.

    Uses of each layer's outputs read the layer's inputs again, and the ``regbn_*`` submodules are
    gone. ``patched`` itself is not modified; the result shares its other modules and tensors.
    """
    if not isinstance(patched, fx.GraphModule):
        raise TypeError(
            f"remove expects the GraphModule returned by regbn.insert; got {type(patched).__name__}"
        )
    names = {str(n.target) for n in _inserted_layers(patched)}
    gm = _fresh_graph_module(patched, skip=tuple(f"{n}." for n in names))
    for name in names:
        gm._modules.pop(name, None)
    for call in _inserted_layers_by_name(gm, names):
        f, g = call.args[0], call.args[1]
        for user in list(call.users):
            user.replace_all_uses_with(f if user.args[1] == 0 else g)
            gm.graph.erase_node(user)
        gm.graph.erase_node(call)
    return _finish(gm)


def _inserted_layers_by_name(gm: fx.GraphModule, names: set[str]) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
