"""Step 1 of `regbn.insert`: every pair resolved and checked before any graph is touched.

`normalise_pairs` reads the user's ``pairs``; `resolve_pairs` resolves each name to its node and
checks that f and g are floating-point tensors with a channel dimension and one batch size;
`check_order` refuses a pair whose f feeds g (the layer would feed its own input), simulating the
edits of the earlier pairs on the networkx graph (each runs once per graph); `build_layers`
makes the `regbn.RegBN` layers from the shapes. Errors say which pair; `regbn.insert` names
itself in front.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ...errors import RegBNTypeError, RegBNValueError, context
from ...layer import RegBN
from ..names import entry_name, resolve_name
from ..shapes.record import tensor_record

__all__ = ["Plan", "build_layers", "check_order", "normalise_pairs", "resolve_pairs"]


@dataclass
class Plan:
    """One pair resolved: its nodes, the names the user gave, and (once built) its layer."""

    f: fx.Node
    g: fx.Node
    f_name: str
    g_name: str
    layer: nn.Module | None
    index: int = 0  # the pair's position in the user's pairs


def normalise_pairs(pairs: Any) -> list[tuple[str, str]] | str:
    """``pairs`` as a list of ``(f, g)`` names, or ``"auto"``; a bare pair counts as one."""
    if isinstance(pairs, str):
        if pairs == "auto":
            return "auto"
        raise RegBNValueError(
            f"pairs must be 'auto' or a list of (f, g) name pairs; got the string "
            f"{pairs!r}. Example: pairs=[('gray_net.fc', 'colored_net.fc')]"
        )
    if (
        isinstance(pairs, (tuple, list))
        and len(pairs) == 2
        and all(isinstance(p, str) for p in pairs)
    ):
        pairs = [pairs]  # one pair given bare: ("a", "b")
    if not isinstance(pairs, Iterable):
        raise RegBNTypeError(
            f"pairs must be 'auto' or a list of (f, g) name pairs; got "
            f"{type(pairs).__name__} {pairs!r}"
        )
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(pairs):
        if (
            isinstance(pair, str)
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(p, str) for p in pair)
        ):
            raise RegBNTypeError(
                f"pair {i}: each pair must be two names (f, g), f normalised with "
                f"respect to g; got {pair!r}. Example: ('gray_net.fc', 'colored_net.fc')"
            )
        out.append((pair[0], pair[1]))
    if not out:
        raise RegBNValueError(
            "pairs is empty; give at least one (f, g) pair, or pairs='auto'"
        )
    return out


def _check_tensor(node: fx.Node, name: str) -> tuple[int, ...]:
    """The shape of ``node``; refused unless it is one float tensor (batch, channels, ...)."""
    shape = tensor_record(node).shape
    if shape is None:
        nested = tensor_record(node).nested
        entries = [
            entry_name(node, u.args[1]) if node.op == "placeholder" else u.name
            for u in node.users
            if u.op == "call_function" and u.target is operator.getitem
        ]
        hint = f"; name one of its entries instead: {entries}" if entries else ""
        what = f"a {type(nested).__name__}" if nested is not None else "not a tensor"
        raise RegBNValueError(
            f"{name!r} (node {node.name}) is {what}, but RegBN needs one tensor{hint}"
        )
    dtype = tensor_record(node).dtype
    if dtype is not None and not dtype.is_floating_point:
        raise RegBNValueError(
            f"{name!r} holds {dtype} values; RegBN normalises floating-point features "
            "(pair an embedding output, not token ids)"
        )
    if len(shape) < 2:
        raise RegBNValueError(
            f"RegBN needs tensors shaped (batch, channels, ...); {name!r} has shape "
            f"{tuple(shape)}. Pair a tensor with a channel dimension, e.g. before a final "
            ".squeeze()/.sum(-1)"
        )
    return tuple(shape)


def _refuse_path(graph: nx.DiGraph, a: str, b: str, names: tuple[str, str]) -> None:
    """Refuse a pair whose f (``a``) feeds its g (``b``): the layer would feed its own input."""
    if nx.has_path(graph, a, b):
        path = " -> ".join(nx.shortest_path(graph, a, b))
        raise RegBNValueError(
            f"{names[1]!r} is computed from {names[0]!r} ({path}). RegBN removes from f "
            "what g explains, and every use of f is rewired to the layer's output f_r; when f "
            "feeds g that would feed the layer's output back into its own input (a cycle). Pair "
            "tensors from separate branches, e.g. the two inputs of the fusion "
            "(regbn.find_fusions lists them), or swap f and g"
        )


def _build_layer(f: tuple[int, ...], g: tuple[int, ...], f_node: fx.Node, kwargs: dict) -> RegBN:
    device = tensor_record(f_node).device or torch.device("cpu")
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
        raise RegBNTypeError(
            f"regbn_kwargs: {e}; they are passed to every regbn.RegBN layer"
        ) from e
    if tensor_record(f_node).dtype == torch.float64:
        layer = layer.to(torch.float64)
    return layer


def resolve_pairs(
    gm: fx.GraphModule, pairs: Sequence[tuple[str, str]], model: nn.Module
) -> list[Plan]:
    """Each pair's nodes in ``gm``, checked on its own: two different float tensors (batch,
    channels, ...) of one batch size. A plan keeps the user's pair index."""
    plans = []
    for i, (f_name, g_name) in enumerate(pairs):
        with context(f"pair {i}"):
            f, g = resolve_name(gm, f_name, model), resolve_name(gm, g_name, model)
            _check_pair(f, g, f_name, g_name)
        plans.append(Plan(f, g, f_name, g_name, None, i))
    return plans


def check_order(plans: list[Plan], graph: nx.DiGraph, mode: str = "") -> None:
    """Refuse a pair whose f feeds its g once the earlier pairs are spliced in, simulating the
    edits on ``graph`` (`build_graph` of the plans' graph module, which this mutates); the fx
    graph is untouched."""
    current: dict[str, str] = {}  # original node name -> name of its latest normalised form
    for k, plan in enumerate(plans):
        f, g = plan.f.name, plan.g.name
        fc, gc = current.get(f, f), current.get(g, g)
        with context(f"pair {plan.index}{mode}"):
            _refuse_path(graph, fc, gc, (plan.f_name, plan.g_name))
        _simulate(graph, fc, gc, k, current, f, g)


def _check_pair(f: fx.Node, g: fx.Node, f_name: str, g_name: str) -> None:
    fs, gs = _check_tensor(f, f_name), _check_tensor(g, g_name)
    if f is g:
        raise RegBNValueError(
            f"f and g are the same tensor ({f_name!r} and {g_name!r} both name node {f.name}); "
            "RegBN normalises one tensor with respect to another"
        )
    if fs[0] != gs[0]:
        raise RegBNValueError(
            f"batch sizes differ: {f_name!r} has shape {fs}, {g_name!r} has {gs}; RegBN pairs "
            "samples, so both need the same first dimension"
        )


def build_layers(plans: list[Plan], kwargs: dict) -> list[RegBN]:
    """One `regbn.RegBN` per plan, sized by its pair's shapes, with ``kwargs``."""
    return [
        _build_layer(
            tuple(tensor_record(p.f).shape or ()),
            tuple(tensor_record(p.g).shape or ()),
            p.f,
            kwargs,
        )
        for p in plans
    ]


def _simulate(graph: nx.DiGraph, f: str, g: str, i: int, current: dict, f0: str, g0: str) -> None:
    """The edits `splice` will make for pair ``i``, on the networkx graph of names."""
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

