"""Branch tensors: where each operand of a fusion was last a feature of its own branch.

From a fusion's operand, `BranchWalk` walks back past the fusion's own ops, the nodes whose every
use leads into the fusion (or past it): layout ops (views, reshapes, transposes, splits, casts,
dropout, a scale by a constant, a concatenation with constants only), gate functions (sigmoid,
tanh, softmax) and, for an elementwise fusion, one linear projection that feeds it along two or
more paths (FiLM's γ and β). The rules, with examples, are in `regbn.fx.modality`.
"""

from __future__ import annotations

import builtins
import operator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..shapes.record import is_integral, is_tensor_node, nodes_in, submodule
from .kinds import ELEMENTWISE_KINDS
from .value_flow import value_inputs

__all__ = ["BranchWalk"]

_LAYOUT_FUNCTIONS = frozenset(
    {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
     torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis, torch.t, torch.chunk,
     torch.split, torch.tensor_split, torch.unbind, operator.getitem, F.dropout, torch.sigmoid,
     torch.tanh, torch.softmax, F.softmax, F.sigmoid, F.tanh, F.hardsigmoid, torch.cat,
     torch.concat, F.pad}
)  # fmt: skip
_LAYOUT_METHODS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "permute",
     "swapaxes", "swapdims", "movedim", "t", "mT", "chunk", "split", "tensor_split", "unbind",
     "expand", "contiguous", "float", "half", "bfloat16", "double", "to", "type_as", "sigmoid",
     "tanh", "softmax", "__getitem__"}
)  # fmt: skip
_SCALE_FUNCTIONS = frozenset(
    {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div, torch.add,
     torch.sub}
)  # fmt: skip
_SCALE_METHODS = frozenset({"mul", "div", "add", "sub", "mul_", "div_", "add_", "sub_"})


class BranchWalk:
    """Walks back from a fusion's operands to their branch tensors (see `regbn.fx.modality`).

    ``graph`` is the networkx graph of node names (`build_graph`) and ``nodes`` maps each name to
    its fx node. The fusion's *region* is the fusion node and every node computed from it.
    """

    def __init__(
        self, fusion: fx.Node, kind: str, graph: nx.DiGraph, nodes: dict[str, fx.Node]
    ) -> None:
        self.fusion = fusion
        self.kind = kind
        self.graph = graph
        self.nodes = nodes
        self.region = nx.descendants(graph, fusion.name) | {fusion.name}
        self._outside = nx.subgraph_view(graph, filter_node=lambda n: n not in self.region)
        self._own: dict[str, bool] = {}

    def branch_tensor(self, operand: fx.Node) -> fx.Node:
        """The last tensor ``operand``'s branch produced before the fusion's own ops."""
        node = self._past_glue(operand)
        if self.kind in ELEMENTWISE_KINDS and self._is_projection(node) and self.own(node):
            source = _single_value_input(node)
            if (
                source is not None
                and is_tensor_node(source) is not False
                and (self._entries(source) >= 2 or self._entries(node) >= 2)
            ):
                node = self._past_glue(source)
        return node

    def _past_glue(self, node: fx.Node) -> fx.Node:
        while _is_glue(node) and self.own(node):
            source = _single_value_input(node)
            if source is None or is_integral(source):
                break  # never onto ids or masks
            if is_tensor_node(source) is False and not _is_split(source):
                break  # nor onto a tuple or dict (a leaf's whole output)
            node = source
        return node

    def own(self, node: fx.Node) -> bool:
        """True when every use of ``node`` leads into the fusion (or past it): no chain of uses
        outside the fusion's region ends at a node nobody reads (a model output, a loss)."""
        name = node.name
        if name in self.region:
            return True
        if name not in self._own:
            later = nx.descendants(self._outside, name) | {name}
            if all(self.graph.out_degree(n) > 0 for n in later):
                self._own.update(dict.fromkeys(later, True))  # their uses lead in as well
            else:
                self._own[name] = False
        return self._own[name]

    def _entries(self, node: fx.Node) -> int:
        """How many nodes of the fusion region read ``node`` or what it feeds the fusion."""

        def feeds(name: str) -> bool:
            return name == node.name or (name not in self.region and self.own(self.nodes[name]))

        feeding = nx.descendants(nx.subgraph_view(self.graph, filter_node=feeds), node.name)
        feeding.add(node.name)
        entries = {u for n in feeding for u in self.graph.successors(n) if u in self.region}
        return len(entries)

    @staticmethod
    def _is_projection(node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target is F.linear
        if node.op != "call_module":
            return False
        owner = node.graph.owning_module
        return owner is not None and isinstance(submodule(owner, node), nn.Linear)


def _single_value_input(node: fx.Node) -> fx.Node | None:
    """The one input carrying ``node``'s modalities, every other one a constant (a scale or
    shift by a parameter or literal, a CLS token); None otherwise (dividing by lengths pools)."""
    mods = node.meta.get("regbn_modalities")
    carriers = []
    for src in value_inputs(node):
        if src.meta.get("regbn_modalities"):
            carriers.append(src)
        elif not src.meta.get("regbn_constant", False):
            return None
    if len(carriers) != 1 or carriers[0].meta.get("regbn_modalities") != mods:
        return None
    return carriers[0]


def _is_getitem(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem) or (
        node.op == "call_method" and node.target == "__getitem__"
    )


def _is_layout_index(node: fx.Node) -> bool:
    """``parts[i]`` of a split, or an index of full slices, None and ... only (a reshape); not
    ``x[:, 0]`` (a CLS token) nor ``x[:, :4]`` (a selection), which are features of their own."""
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node) and _is_split(src):
        return True
    index = node.args[1] if len(node.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return all(
        i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items
    )


_SPLIT_FUNCTIONS = frozenset({torch.chunk, torch.split, torch.tensor_split, torch.unbind})
_SPLIT_METHODS = frozenset({"chunk", "split", "tensor_split", "unbind"})


def _is_split(node: fx.Node) -> bool:
    """A node that returns the parts of one tensor (walked through to the tensor it splits)."""
    if node.op == "call_function":
        return node.target in _SPLIT_FUNCTIONS
    return node.op == "call_method" and node.target in _SPLIT_METHODS


def _is_glue(node: fx.Node) -> bool:
    if _is_getitem(node):
        return _is_layout_index(node)
    if node.op == "call_function" and node.target is builtins.getattr:
        return len(node.args) >= 2 and node.args[1] in _TRANSPOSE_ATTRS  # x.T, x.mT, x.H
    if node.target in _SHIFTS:
        # 1 + gamma is FiLM's; x + self.pos_embedding belongs to the branch that adds it.
        return node.op in ("call_function", "call_method") and len(nodes_in(node.args)) == 1
    if node.op == "call_function":
        return node.target in _LAYOUT_FUNCTIONS or node.target in _SCALE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS or node.target in _SCALE_METHODS
    return False


_TRANSPOSE_ATTRS = frozenset({"T", "mT", "H", "mH"})

_SHIFTS = frozenset(
    {operator.add, operator.sub, torch.add, torch.sub, "add", "sub", "add_", "sub_"}
)

