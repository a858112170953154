"""Splice RegBN layers into a traced model: `insert` and `remove`.

A pair ``(f, g)`` means "normalise tensor f with respect to tensor g". The layer is called once both
tensors exist, and every use of f and of g (other than the layer itself) reads ``f_r`` and ``g_out``
instead, exactly as if the call had been written by hand. Nodes are then re-ordered topologically
(networkx), moving as little as possible.

When g feeds f (f is computed from g), the uses of g on the way to f come before the layer and
keep the raw g; the later ones read ``g_out``. A pair whose f feeds g is refused: every use of f
is rewired, so the layer would need its own output (a cycle).

Training mode. `insert` traces the model twice, once with every module in training mode and once
in eval mode (the model's own flags are restored), and compares the graphs. Identical graphs (no
traced code reads ``self.training``; ``nn.Dropout`` and ``nn.BatchNorm`` are leaves that read it
at run time) give one ``GraphModule``. Different graphs (``F.dropout(x, p, self.training)``,
stochastic depth) give a `ModeGraphModule`: the same layers are spliced into both graphs, names
resolve against the training graph, and ``train()``/``eval()`` switch between them. The second
trace costs about one ``symbolic_trace``; a graph per mode is the only exact answer, since a
Python-level ``if self.training`` leaves no trace in the graph of the other mode.
"""

from __future__ import annotations

import copy as copy_module
import difflib
import inspect
import operator
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ..layer import RegBN
from .analysis import Analysis, analyse, auto_pairs
from .modality import build_graph
from .names import INSPECT_HINT, entry_name, is_ambiguous, resolve_name
from .tracing import (
    ModeGraphModule,
    TraceError,
    carry_missing_state,
    in_mode,
    is_regbn,
    same_trace,
    trace_graph,
    unwrap,
)

__all__ = ["insert", "remove", "resolve_name", "is_ambiguous"]

_LAYER_NAME = re.compile(r"^regbn_(\d+)$")
# Names of the RegBN submodules insert added: in gm.meta (kept by deepcopy) and as an attribute of
# the same name (kept by pickle, which rebuilds meta empty).
ADDED = "regbn_inserted"
# Set by insert from the inferred shapes, never by the caller.
_INFERRED = ("f_num_channels", "g_num_channels", "f_layer_dim", "g_layer_dim")
_REWRAP = {
    "torch.compile": "torch.compile(patched)",
    "DataParallel": "nn.DataParallel(patched, ...)",
    "DistributedDataParallel": "DistributedDataParallel(patched, ...)",
}


# ----------------------------------------------------------------------------- validation


@dataclass
class _Plan:
    f: fx.Node
    g: fx.Node
    f_name: str
    g_name: str
    layer: nn.Module | None


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


def _build_layer(f: tuple[int, ...], g: tuple[int, ...], f_node: fx.Node, kwargs: dict) -> RegBN:
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
    gm: fx.GraphModule, pairs, model: nn.Module, graph: nx.DiGraph, mode: str = ""
) -> list[_Plan]:
    """Resolve and check every pair, simulating the edits on ``graph`` (`build_graph` of ``gm``,
    which this mutates); the fx graph is untouched. Layers are built later (`_build_layers`)."""
    resolved: list[tuple[fx.Node, fx.Node, str, str]] = []
    for i, (f_name, g_name) in enumerate(pairs):
        where = f"pair {i}{mode}"
        f = resolve_name(gm, f_name, where, model)
        g = resolve_name(gm, g_name, where, model)
        resolved.append((f, g, f_name, g_name))
    current: dict[str, str] = {}  # original node name -> name of its latest normalised form
    plans: list[_Plan] = []
    for i, (f, g, f_name, g_name) in enumerate(resolved):
        where = f"pair {i}{mode}"
        _check_tensor(f, f_name, where)
        _check_tensor(g, g_name, where)
        fs, gs = f.meta["regbn_shape"], g.meta["regbn_shape"]
        if f is g:
            raise ValueError(
                f"{where}: f and g are the same tensor ({f_name!r} and {g_name!r} both name node "
                f"{f.name}); RegBN normalises one tensor with respect to another"
            )
        if fs[0] != gs[0]:
            raise ValueError(
                f"{where}: batch sizes differ: {f_name!r} has shape {tuple(fs)}, {g_name!r} has "
                f"{tuple(gs)}; RegBN pairs samples, so both need the same first dimension"
            )
        fc, gc = current.get(f.name, f.name), current.get(g.name, g.name)
        _refuse_path(graph, fc, gc, (f_name, g_name), where)
        _simulate(graph, fc, gc, i, current, f.name, g.name)
        plans.append(_Plan(f, g, f_name, g_name, None))
    return plans


def _build_layers(plans: list[_Plan], kwargs: dict) -> list[RegBN]:
    return [
        _build_layer(tuple(p.f.meta["regbn_shape"]), tuple(p.g.meta["regbn_shape"]), p.f, kwargs)
        for p in plans
    ]


def _align(train: fx.GraphModule, ev: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Map each node of the training graph to the same computation in the eval graph.

    Node names drift after the first mode-dependent node (``add_3`` in one graph is ``add_2`` in
    the other), so nodes are matched as sequences of (op, target, module call stack): the longest
    matching blocks, in graph order. Nodes only one mode computes stay unmatched.
    """

    def key(n: fx.Node) -> tuple[Any, ...]:
        return (n.op, str(n.target), n.meta.get("regbn_module_calls", ()))

    a, b = list(train.graph.nodes), list(ev.graph.nodes)
    matcher = difflib.SequenceMatcher(None, [key(n) for n in a], [key(n) for n in b], False)
    out: dict[fx.Node, fx.Node] = {}
    for i, j, size in matcher.get_matching_blocks():
        for k in range(size):
            out[a[i + k]] = b[j + k]
    return out


def _eval_pairs(plans: list[_Plan], train: fx.GraphModule, ev: fx.GraphModule) -> list[tuple]:
    """The pairs of ``plans`` (resolved in the training graph) as node names of the eval graph."""
    match = _align(train, ev)
    out = []
    for i, plan in enumerate(plans):
        names = []
        for node, name in ((plan.f, plan.f_name), (plan.g, plan.g_name)):
            other = match.get(node)
            if other is None or other.meta.get("regbn_shape") != node.meta.get("regbn_shape"):
                raise ValueError(
                    f"pair {i}: {name!r} (node {node.name}) is computed in training mode only "
                    "(code under `if self.training`), so eval mode has no such tensor. Pair a "
                    "tensor both modes compute, e.g. the output of the enclosing module; "
                    f"{INSPECT_HINT}"
                )
            names.append(f"node:{other.name}")
        out.append(tuple(names))
    return out


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


def _splice(gm: fx.GraphModule, plans: list[_Plan], names: list[str]) -> None:
    graph = gm.graph
    current: dict[fx.Node, fx.Node] = {}
    for name, plan in zip(names, plans, strict=True):
        gm.add_submodule(name, plan.layer)
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


def _next_layer_index(gm: fx.GraphModule) -> int:
    used = [int(m.group(1)) for name in gm._modules if (m := _LAYER_NAME.match(name))]
    return max(used) + 1 if used else 0


# ----------------------------------------------------------------------------- arguments


def _check_regbn_kwargs(kwargs: dict[str, Any]) -> None:
    """TypeError naming a keyword that is neither insert's own nor a RegBN constructor argument."""
    params = inspect.signature(RegBN.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n in params if n != "self" and n not in _INFERRED]
    own = [n for n in inspect.signature(insert).parameters if n != "regbn_kwargs"]
    for name in kwargs:
        if name in _INFERRED:
            raise TypeError(
                f"insert: {name!r} is inferred from the shapes of each pair's tensors; drop it "
                "(pass example_inputs/input_shapes that give the shapes you want)"
            )
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted + own, n=2)
            did = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
            raise TypeError(
                f"insert() got an unexpected keyword argument {name!r}{did} Keywords other than "
                f"insert's own are regbn_kwargs, passed to every regbn.RegBN layer, which takes "
                f"{accepted}"
            )


def _unwrapped(model: nn.Module) -> nn.Module:
    inner, wrappers = unwrap(model)
    if wrappers:
        attrs = "".join("._orig_mod" if w == "torch.compile" else ".module" for w in wrappers)
        again = " then ".join(_REWRAP[w] for w in reversed(wrappers))
        warnings.warn(
            f"insert: {type(model).__name__} wraps the model; patched model{attrs}, the "
            f"{type(inner).__name__} inside {' inside '.join(wrappers)}. The result is not "
            f"wrapped and its state_dict keys have no wrapper prefix; wrap it again after insert, "
            f"so that the new layers are part of it: {again}",
            UserWarning,
            stacklevel=3,
        )
    return inner


def _warn_existing_layers(model: nn.Module) -> None:
    held = [path for path, m in model.named_modules() if isinstance(m, RegBN)]
    if held:
        warnings.warn(
            f"insert: the model already holds RegBN layers {held}; the new layers are added next "
            "to them (numbered after them). regbn.remove(patched) removes only the layers "
            "insert added",
            UserWarning,
            stacklevel=3,
        )


def _var_args_hint(model: nn.Module, example_inputs: Any) -> str:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ""
    star = [("*" if p.kind is p.VAR_POSITIONAL else "**") + p.name for p in params
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
    if not star:
        return ""
    fixed = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    extra = list(example_inputs) if isinstance(example_inputs, dict) else ["a", "b"]
    names = list(dict.fromkeys(fixed + [n for n in extra if isinstance(n, str)]))
    call = ", ".join(f"{n}={n}" for n in names)
    return (
        f". {type(model).__name__}.forward takes {', '.join(star)}, which torch.fx traces as one "
        "argument, so shapes cannot be given per tensor. Wrap the model in a module whose forward "
        "names each input (names then start with 'model.'):\n"
        "    class Named(nn.Module):\n"
        "        def __init__(self, model):\n"
        "            super().__init__()\n"
        "            self.model = model\n"
        f"        def forward(self, {', '.join(names)}):\n"
        f"            return self.model({call})\n"
        "    patched = regbn.insert(Named(model), ...)\n"
        "or fix the extra arguments with concrete_args={...} where they are constants"
    )


def _analyse(model: nn.Module, example_inputs: Any, options: dict, mode: str) -> Analysis:
    try:
        result = analyse(model, example_inputs, **options)
    except TraceError:
        raise
    except ValueError as e:
        hint = _var_args_hint(model, example_inputs)
        if not hint:
            raise
        raise ValueError(f"insert: {e}{hint}") from e
    if result.failure is not None:
        raise ValueError(
            f"insert: cannot infer RegBN dims{mode}, {result.failure}. Check example_inputs/"
            "input_shapes against the model's forward, or run regbn.inspect(model, ...) to see "
            f"the shapes up to that node{_var_args_hint(model, example_inputs)}"
        )
    return result


def _analyse_modes(
    model: nn.Module, example_inputs: Any, options: dict
) -> tuple[Analysis, Analysis | None]:
    """The analysis of the training graph, and of the eval graph where it differs."""
    tracing = {k: options[k] for k in ("concrete_args", "leaf_modules", "autowrap_functions")}
    with in_mode(model, True):
        train = _analyse(model, example_inputs, options, "")
    with in_mode(model, False):
        traced = trace_graph(model, **tracing)  # no GraphModule (no code compiled) unless needed
        if same_trace(traced, train.gm):
            return train, None
        return train, _analyse(traced.graph_module(), example_inputs, options, " in eval mode")


def _auto_pairs(analysis: Analysis, regbn_kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    """One pair per fusion; a fusion whose W would pass ``max_projection_bytes`` is skipped with
    a ``UserWarning`` naming smaller tensors of the same branches to pair instead."""
    pairs, skipped = auto_pairs(
        analysis.fusions,
        regbn_kwargs.get("max_projection_bytes"),
        regbn_kwargs.get("projection", "full"),
    )
    for message in skipped:
        warnings.warn(message, UserWarning, stacklevel=3)
    return pairs


def _result(model: nn.Module, train: fx.GraphModule, ev: fx.GraphModule | None) -> fx.GraphModule:
    out = train
    if ev is not None:
        out = ModeGraphModule(train, train.graph, ev.graph, type(train).__name__, eval_root=ev)
        carry_missing_state(train, out)
        out.meta.update(train.meta)
    _copy_flags(model, out)
    if isinstance(out, ModeGraphModule):
        out._select(out.training)
    return out


def _mode_dependent(train: fx.GraphModule, ev: fx.GraphModule) -> set[str | None]:
    """Module paths (``None``: the top level) whose code computes differently in the two modes:
    the innermost module call of every node one graph has and the other lacks or calls with
    other arguments."""
    match = _align(train, ev)
    out = {n.meta.get("regbn_module") for n in ev.graph.nodes if n not in match.values()}
    for node, other in match.items():
        try:
            mapped = fx.node.map_arg((node.args, node.kwargs), match.get)
            same = bool(mapped == (other.args, other.kwargs))
        except (RuntimeError, TypeError, ValueError):  # tensor arguments: no plain ==
            same = False
        if not same:
            out.add(node.meta.get("regbn_module"))
    out |= {n.meta.get("regbn_module") for n in train.graph.nodes if n not in match}
    return out


def _warn_mixed_modes(model: nn.Module, train: fx.GraphModule, ev: fx.GraphModule) -> None:
    """Warn where a module whose code reads ``self.training`` is not in the model's mode: the
    result runs the graph of the model's mode until ``train()``/``eval()`` sets every module."""
    other = []
    for path in _mode_dependent(train, ev) - {None}:
        try:
            module = model.get_submodule(path)
        except AttributeError:  # a GraphModule keeps only the modules its graph calls
            continue
        if module.training is not model.training:
            other.append(path)
    if other:
        mode = "training" if model.training else "eval"
        warnings.warn(
            f"insert: the model is in {mode} mode but {sorted(other)} are not, and their code "
            f"reads self.training; the result runs it as in {mode} mode until patched.train() "
            "or patched.eval() sets every module",
            UserWarning,
            stacklevel=3,
        )


def _copy_flags(model: nn.Module, out: fx.GraphModule) -> None:
    # The traces ran with every module in one mode: modules fx made take the model's flags again
    # (the model's own modules, shared with ``out``, got theirs back from `in_mode`).
    original = dict(model.named_modules())
    for path, sub in out.named_modules():
        mod = original.get(path)
        if mod is not None and sub is not mod:
            sub.training = mod.training


# ----------------------------------------------------------------------------- public API


def insert(
    model: nn.Module,
    pairs: Any,
    example_inputs: Any = None,
    *,
    input_shapes: Any = None,
    input_dtypes: Any = None,
    modalities: dict[str, Any] | None = None,
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
    module path (the output of that call), or an fx node name of the training-mode graph (as
    `regbn.inspect` lists them); prefix ``input:``, ``module:`` or ``node:`` to pick one when a
    name is ambiguous.

    Shapes come from ``example_inputs`` (real tensors) or ``input_shapes`` (fake tensors; no
    memory) with ``input_dtypes`` (e.g. ``torch.int64`` for token ids). ``modalities`` groups
    inputs for ``pairs="auto"``, as in `find_fusions`. Layers are named ``regbn_0``,
    ``regbn_1``, ... (continuing after existing ones) and get ``regbn_kwargs`` (an unknown
    keyword is a ``TypeError``). The result shares the model's parameters and buffers
    (``copy=True`` for an independent copy), keeps every ``state_dict`` key, and has the model's
    training mode; ``train()``/``eval()`` give the model's behaviour in that mode, with the
    layers (see the module docstring). A ``torch.compile`` d or ``(Distributed)DataParallel``
    model is patched through the module it wraps, with a warning: wrap the result again. The
    model itself is never modified; nothing is touched unless every pair is valid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"insert expects an nn.Module as model; got {type(model).__name__}")
    _check_regbn_kwargs(regbn_kwargs)
    wanted = _normalise_pairs(pairs)
    if example_inputs is None and input_shapes is None:
        raise ValueError(
            "insert needs example_inputs (real tensors) or input_shapes (e.g. "
            "[(8, 1, 28, 28), (8, 3, 28, 28)]) to infer each RegBN layer's dims"
        )
    model = _unwrapped(model)
    _warn_existing_layers(model)
    if copy:
        model = copy_module.deepcopy(model)
    options = dict(
        input_shapes=input_shapes,
        input_dtypes=input_dtypes,
        modalities=modalities,
        concrete_args=concrete_args,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
    )
    train, ev = _analyse_modes(model, example_inputs, options)
    if wanted == "auto":
        wanted = _auto_pairs(train, regbn_kwargs)
    plans = _plan(train.gm, wanted, model, train.graph)
    per_mode = [(train.gm, plans)]
    if ev is not None:
        eval_pairs = _eval_pairs(plans, train.gm, ev.gm)
        per_mode.append((ev.gm, _plan(ev.gm, eval_pairs, model, ev.graph, " (eval-mode graph)")))
        _warn_mixed_modes(model, train.gm, ev.gm)
    layers = _build_layers(plans, regbn_kwargs)  # may raise: still before any edit
    for layer in layers:
        layer.train(model.training)
    start = _next_layer_index(train.gm)
    names = [f"regbn_{start + i}" for i in range(len(plans))]
    for gm, mode_plans in per_mode:
        for plan, layer in zip(mode_plans, layers, strict=True):
            plan.layer = layer  # one module object in every graph: shared state_dict keys
        _splice(gm, mode_plans, names)
        reorder_topologically(gm)
        _finish(gm)
    out = _result(model, train.gm, ev.gm if ev else None)
    _record(out, [*added_layers(model), *names])
    return out


def added_layers(model: nn.Module) -> list[str]:
    """Names of the RegBN submodules `insert` added to ``model`` (``[]`` for any other model)."""
    meta = getattr(model, "meta", None)
    found = meta.get(ADDED) if isinstance(meta, dict) else None
    return list(found if found is not None else getattr(model, ADDED, ()))


def _record(gm: fx.GraphModule, names: list[str]) -> None:
    gm.meta[ADDED] = list(names)
    setattr(gm, ADDED, list(names))


def _recorded_layers(patched: fx.GraphModule, graph: fx.Graph) -> list[fx.Node]:
    """Calls of the layers insert recorded in ``patched.meta``, whose outputs are only read
    through ``[0]``/``[1]`` (what insert wrote)."""
    added = set(added_layers(patched))
    calls = []
    for node in graph.nodes:
        if not (node.op == "call_module" and node.target in added and is_regbn(patched, node)):
            continue
        if all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            calls.append(node)
    return calls


def _without_layers(graph: fx.Graph, names: set[str]) -> fx.Graph:
    out = copy_module.deepcopy(graph)
    for call in [n for n in out.nodes if n.op == "call_module" and n.target in names]:
        f, g = call.args[0], call.args[1]
        for user in list(call.users):
            user.replace_all_uses_with(f if user.args[1] == 0 else g)
            out.erase_node(user)
        out.erase_node(call)
    return out


def remove(patched: fx.GraphModule) -> fx.GraphModule:
    """Return ``patched`` without the RegBN layers `insert` added.

    Uses of each layer's outputs read the layer's inputs again, and those ``regbn_*`` submodules
    are gone. RegBN layers the model had before `insert` stay, with a ``UserWarning`` naming
    them. ``patched`` itself is not modified; the result shares its other modules and tensors
    and, for a `ModeGraphModule`, keeps one graph per mode.
    """
    if not isinstance(patched, fx.GraphModule):
        raise TypeError(
            f"remove expects the GraphModule returned by regbn.insert; got {type(patched).__name__}"
        )
    graphs = patched.mode_graphs if isinstance(patched, ModeGraphModule) else {None: patched.graph}
    names = {str(n.target) for g in graphs.values() for n in _recorded_layers(patched, g)}
    kept = [p for p, m in patched.named_modules() if isinstance(m, RegBN) and p not in names]
    if kept:
        warnings.warn(
            f"remove: kept the RegBN layers {kept}, which regbn.insert did not add (the model "
            "had them before); delete them by hand if they should go",
            UserWarning,
            stacklevel=2,
        )
    edited = {mode: _without_layers(g, names) for mode, g in graphs.items()}
    name = type(patched).__name__
    if isinstance(patched, ModeGraphModule):
        gm: fx.GraphModule = ModeGraphModule(patched, edited[True], edited[False], name)
    else:
        gm = fx.GraphModule(patched, edited[None], name)
    carry_missing_state(patched, gm, skip=tuple(f"{n}." for n in names))
    gm.meta.update(patched.meta)
    _record(gm, [n for n in added_layers(patched) if n not in names])
    for graph in edited.values():
        graph.lint()
    if isinstance(gm, ModeGraphModule):
        gm._select(gm.training)
    gm.recompile()
    return gm
