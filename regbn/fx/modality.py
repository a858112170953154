"""Modality analysis and fusion detection on an annotated fx graph, with networkx.

A *modality* is one input tensor of the model: a tensor argument of ``forward`` (``"gray"``), or
one entry of an argument that holds several tensors (``"batch['audio']"``, ``"x[0]"``). After
`annotate_modalities`, each node carries ``node.meta["regbn_modalities"]``, the frozenset of
modalities its value depends on, plus ``node.meta["regbn_fusion"]``: its `Fusion` or ``None``.

A *fusion* is a node whose tensor operands depend on pairwise disjoint, non-empty sets of
modalities: where separate branches meet. Operands with identical sets (the key and value of one
modality in attention) are one branch. Constants and parameters are not operands, so
``mul(1, x)`` and ``x * self.scale`` are not fusions, and neither is a residual add inside one
modality.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .names import entry_name, is_constant_getitem
from .tracing import input_name, is_regbn

__all__ = [
    "Fusion",
    "annotate_modalities",
    "build_graph",
    "detect_fusions",
    "modality_sources",
]


@dataclass(frozen=True)
class Fusion:
    """A node where branches of different modalities meet.

    ``pair`` is the ``(f, g)`` that ``regbn.insert(..., pairs="auto")`` uses: the first tensor
    operand is normalised with respect to the next operand from another branch (in argument
    order; for two operands simply the second). A fusion with more than two operands therefore
    gets one RegBN layer; pass explicit pairs to normalise the others. Each name is an fx node
    name, prefixed with ``node:`` only where the bare name would be ambiguous for ``insert``.
    """

    name: str
    kind: str
    operands: tuple[str, ...]
    modalities: tuple[frozenset[str], ...]
    shapes: tuple[tuple[int, ...] | None, ...]
    pair: tuple[str, str]
    module: str | None = None
    output_shape: tuple[int, ...] | None = None

    def __str__(self) -> str:
        ops = ", ".join(
            f"{o} {{{', '.join(sorted(m))}}}"
            for o, m in zip(self.operands, self.modalities, strict=True)
        )
        return f"{self.name} [{self.kind}]: {ops} -> pair {self.pair}"


def build_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph of fx node names; an edge u -> v when v reads u's value."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def _is_tensor_node(node: fx.Node) -> bool | None:
    """True/False from shape meta; None when shapes were not propagated."""
    if "regbn_shape" not in node.meta:
        return None
    return node.meta["regbn_shape"] is not None


def modality_sources(gm: fx.GraphModule) -> dict[str, str]:
    """Map node name -> modality name for every node that introduces a modality.

    A placeholder is a source unless it is a container (a dict or tuple of tensors) read through
    constant keys; then each ``getitem`` with a constant key is a source of its own, and the
    container itself (where used whole) depends on all of them.
    """
    sources: dict[str, str] = {}
    for ph in gm.graph.nodes:
        if ph.op != "placeholder":
            continue
        entries = [u for u in ph.users if is_constant_getitem(u)]
        if entries and _is_tensor_node(ph) is not True:
            for u in entries:
                sources[u.name] = entry_name(ph, u.args[1])
            continue
        sources[ph.name] = input_name(ph)
    return sources


def annotate_modalities(
    gm: fx.GraphModule, graph: nx.DiGraph | None = None, modalities: dict[str, Any] | None = None
) -> nx.DiGraph:
    """Set ``node.meta["regbn_modalities"]`` and ``["regbn_fusion"]`` on every node.

    Returns the networkx graph used. A container placeholder that is also used whole depends on
    all of its entries.
    """
    graph = build_graph(gm) if graph is None else graph
    sources = modality_sources(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    deps: dict[str, frozenset[str]] = {}
    # A source starts afresh rather than inheriting from its container placeholder, so two
    # entries of one dict count as two modalities.
    for name in nx.topological_sort(graph):
        node = by_name[name]
        if name in sources:
            deps[name] = frozenset({sources[name]})
        elif node.op == "placeholder":
            deps[name] = frozenset(sources[u.name] for u in node.users if u.name in sources)
        else:
            deps[name] = frozenset().union(*(deps[p] for p in graph.predecessors(name)))
    for name, mods in deps.items():
        by_name[name].meta["regbn_modalities"] = mods
    for node in gm.graph.nodes:
        node.meta["regbn_fusion"] = _fusion_at(gm, node)
    return graph


def detect_fusions(gm: fx.GraphModule) -> list[Fusion]:
    """The fusions of an annotated graph, in graph order."""
    return [n.meta["regbn_fusion"] for n in gm.graph.nodes if n.meta.get("regbn_fusion")]


def _operands(node: fx.Node) -> list[fx.Node]:
    # all_input_nodes lists each node once. Parameters, constants and buffers carry no modality.
    return [
        src
        for src in node.all_input_nodes
        if _is_tensor_node(src) is not False and src.meta.get("regbn_modalities")
    ]


def _fusion_at(gm: fx.GraphModule, node: fx.Node) -> Fusion | None:
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    if is_regbn(gm, node):
        return None  # the normaliser itself, not a place where branches merge
    ops = _operands(node)
    if len(ops) < 2:
        return None
    mods = [op.meta["regbn_modalities"] for op in ops]
    # Operands from the same branch (key and value of one modality) count once.
    groups = list(dict.fromkeys(mods))
    if len(groups) < 2:
        return None
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            if groups[i] & groups[j]:
                return None
    second = next(op for op, m in zip(ops, mods, strict=True) if m != mods[0])
    return Fusion(
        name=node.name,
        kind=fusion_kind(gm, node),
        operands=tuple(op.name for op in ops),
        modalities=tuple(mods),
        shapes=tuple(op.meta.get("regbn_shape") for op in ops),
        pair=(ops[0].name, second.name),
        module=node.meta.get("regbn_module"),
        output_shape=node.meta.get("regbn_shape"),
    )


_FUNCTION_KINDS: dict[Any, str] = {
    torch.cat: "cat",
    torch.concat: "cat",
    torch.concatenate: "cat",
    torch.hstack: "cat",
    torch.vstack: "cat",
    torch.dstack: "cat",
    torch.column_stack: "cat",
    torch.stack: "stack",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    torch.sub: "sub",
    torch.subtract: "sub",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    torch.multiply: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.floordiv: "div",
    torch.div: "div",
    torch.divide: "div",
    torch.true_divide: "div",
    operator.matmul: "matmul",
    torch.matmul: "matmul",
    torch.mm: "matmul",
    torch.bmm: "matmul",
    torch.einsum: "einsum",
    F.bilinear: "bilinear",
    torch.bilinear: "bilinear",
    F.scaled_dot_product_attention: "attention",
    F.multi_head_attention_forward: "attention",
}

_METHOD_KINDS: dict[str, str] = {
    "add": "add",
    "add_": "add",
    "sub": "sub",
    "sub_": "sub",
    "mul": "mul",
    "mul_": "mul",
    "div": "div",
    "div_": "div",
    "matmul": "matmul",
    "mm": "matmul",
    "bmm": "matmul",
}


def fusion_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """cat, stack, add, sub, mul, div, matmul, einsum, attention, bilinear or other."""
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target, "other")
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, "other")
    try:
        module = gm.get_submodule(node.target)
    except AttributeError:
        return "other"
    if isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        return "attention"
    if isinstance(module, nn.Bilinear):
        return "bilinear"
    return "other"
