"""Which inputs of a model start a modality, and under which name (step 1 of the modality analysis).

The rules are those of `regbn.fx.modality`: the user's ``modalities`` grouping first; an input
named like a mask, lengths or positions carries none unless a learned layer reads its float
values as data; an input whose values are read as token ids starts one; any other integer or
bool input carries none; every other input starts one named after it. "Read as" follows the
input's users on the networkx graph of the fx graph (`build_graph`) through casts, reshapes and
indexing only.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...errors import RegBNTypeError, RegBNValueError
from ..names import entry_label, is_constant_getitem
from ..shapes.record import is_integral, is_tensor_node, nodes_in, submodule
from ..tracing.capture import input_name, is_regbn

__all__ = ["build_graph", "describe_input_modalities", "input_labels", "modality_sources"]


def build_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph of fx node names; an edge u -> v when v reads u's value."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


_AUX_NAME = re.compile(
    r"(^|_)(mask|masks|length|lengths|lens|seq_len|seq_lens|position_ids|positions|pos_ids|"
    r"token_type_ids|segment_ids)($|_)",
    re.IGNORECASE,
)
_ID_PRESERVING_FUNCTIONS = frozenset({operator.getitem, torch.flatten, torch.reshape,
                                      torch.squeeze, torch.unsqueeze, torch.transpose,
                                      torch.permute, torch.clamp, torch.narrow})  # fmt: skip
_ID_PRESERVING_METHODS = frozenset(
    {"view", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "contiguous",
     "long", "int", "to", "clamp", "clamp_", "narrow", "expand", "repeat", "__getitem__", "t"}
)  # fmt: skip

def input_labels(gm: fx.GraphModule) -> dict[str, str]:
    """Map node name -> input name for every input (see the module docstring), in graph order.

    A container argument read through constant keys gives one input per ``getitem`` (the
    container itself is not listed); any other argument is one input.
    """
    labels: dict[str, str] = {}
    for ph in gm.graph.nodes:
        if ph.op != "placeholder":
            continue
        entries = [u for u in ph.users if is_constant_getitem(u)]
        if entries and is_tensor_node(ph) is not True:
            for u in entries:
                labels[u.name] = entry_label(u)
            continue
        labels[ph.name] = input_name(ph)
    return labels


def _grouping(
    gm: fx.GraphModule, modalities: Any, labels: dict[str, str]
) -> dict[str, str]:
    """Map input name -> modality name from the user's ``modalities``; ValueError on bad names."""
    if modalities is None:
        return {}
    if not isinstance(modalities, dict) or not all(isinstance(k, str) for k in modalities):
        raise RegBNTypeError(
            f"modalities must be a dict of modality name -> input names, e.g. "
            "{'text': ['input_ids', 'attention_mask'], 'image': ['pixel_values']}; got "
            f"{modalities!r}"
        )
    known = list(labels.values())
    containers = {input_name(n) for n in gm.graph.nodes if n.op == "placeholder"}
    out: dict[str, str] = {}
    for modality, names in modalities.items():
        names = [names] if isinstance(names, str) else list(names)
        for raw in names:
            name = _canonical_input(raw)
            if name not in known and name in containers:
                entries = [k for k in known if k.startswith((f"{name}[", f"{name}."))]
                for k in entries or [name]:
                    out.setdefault(k, modality)
                continue
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                did = f"; did you mean {close[0]!r}?" if close else "."
                raise RegBNValueError(
                    f"modalities[{modality!r}]: {raw!r} is not an input of this "
                    f"model; its inputs are {known}{did} modalities= groups inputs only (a "
                    "tensor inside the model takes the modalities of the inputs it depends on): "
                    "name forward arguments, their entries as \"batch['audio']\" or their "
                    "fields as \"batch.image\""
                )
            if name in out and out[name] != modality:
                raise RegBNValueError(
                    f"modalities: input {name!r} is listed under both {out[name]!r} and "
                    f"{modality!r}; give each input one modality"
                )
            out[name] = modality
    return out


def _canonical_input(name: Any) -> str:
    if not isinstance(name, str):
        raise RegBNTypeError(f"modalities: input names must be strings; got {name!r}")
    return name.replace('"', "'")


class _Reach:
    """Reachability along users on the networkx graph of ``gm`` (`build_graph`)."""

    def __init__(self, gm: fx.GraphModule, graph: nx.DiGraph) -> None:
        self.gm = gm
        self.graph = graph
        self.nodes = {n.name: n for n in gm.graph.nodes}

    def __call__(
        self,
        node: fx.Node,
        hit: Callable[[fx.Node, fx.Node], bool],
        follow: Callable[[fx.Node, fx.Node], bool],
    ) -> bool:
        """True when a chain of users from ``node``, each step passing ``follow(user, value)``,
        arrives at a user with ``hit(user, value)``."""
        nodes = self.nodes
        steps = nx.subgraph_view(self.graph, filter_edge=lambda u, v: follow(nodes[v], nodes[u]))
        reached = nx.descendants(steps, node.name) | {node.name}
        return any(
            hit(nodes[user], nodes[name])
            for name in reached
            for user in self.graph.successors(name)
        )


def _reads_ids(node: fx.Node, reach: _Reach, aux: set[fx.Node]) -> bool:
    """True when ``node``'s values reach an embedding's indices or a leaf module's first input
    (masks and other ``aux`` inputs passed before it, ``leaf(attention_mask=m, input_ids=i)``,
    do not count as first)."""
    return reach(
        node,
        hit=lambda user, cur: _indexes_with(user, cur, reach.gm, aux),
        follow=lambda user, cur: _preserves_ids(user) and user.all_input_nodes[:1] == [cur],
    )


def _indexes_with(user: fx.Node, src: fx.Node, gm: fx.GraphModule, aux: set[fx.Node]) -> bool:
    if user.op == "call_function":
        if user.target is F.embedding:
            return _first_node(user, aux) is src
        if user.target is torch.embedding:  # torch.embedding(weight, indices)
            return len(user.args) > 1 and user.args[1] is src
        if user.target is F.one_hot:  # class labels as one-hot features
            return _first_node(user, aux) is src
        if user.target is operator.getitem and len(user.args) == 2:  # self.table[labels]
            table, index = user.args
            return isinstance(table, fx.Node) and table.op == "get_attr" and src in nodes_in(
                (index,)
            )
        if user.target is torch.index_select and len(user.args) == 3:
            table, index = user.args[0], user.args[2]
            return isinstance(table, fx.Node) and table.op == "get_attr" and index is src
        return False
    if user.op != "call_module" or is_regbn(gm, user):
        return False
    module = submodule(gm, user)
    if module is None:
        return False
    builtin = type(module).__module__.startswith("torch.nn")
    if builtin and not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    return _first_node(user, aux) is src


def _first_node(node: fx.Node, aux: set[fx.Node]) -> fx.Node | None:
    found = [n for n in nodes_in((node.args, node.kwargs)) if n not in aux]
    return found[0] if found else None


_FEATURE_FUNCTIONS = frozenset({F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d,
                                F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                                torch.conv1d, torch.conv2d, torch.conv3d})  # fmt: skip
_FLOAT_CASTS = frozenset({"float", "double", "half", "bfloat16", "type_as"})


def _reads_features(node: fx.Node, reach: _Reach) -> bool:
    """True when ``node``'s values, through reshapes and casts, are the data (first tensor) of a
    learned layer: a built-in ``torch.nn`` module with parameters other than an embedding, or
    ``F.linear``/``F.conv*d``. What a mask does not do: a mask gates another tensor."""

    def is_data_of(user: fx.Node, cur: fx.Node) -> bool:
        return _first_node(user, set()) is cur

    def learned(user: fx.Node, cur: fx.Node) -> bool:
        if not is_data_of(user, cur):
            return False
        if user.op == "call_function":
            return user.target in _FEATURE_FUNCTIONS
        if user.op != "call_module" or is_regbn(reach.gm, user):
            return False
        module = submodule(reach.gm, user)
        return (
            module is not None
            and type(module).__module__.startswith("torch.nn")
            and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))
            and any(True for _ in module.parameters())
        )

    def passes(user: fx.Node, cur: fx.Node) -> bool:
        return is_data_of(user, cur) and (
            _preserves_ids(user) or (user.op == "call_method" and user.target in _FLOAT_CASTS)
        )

    return reach(node, hit=learned, follow=passes)


def _preserves_ids(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ID_PRESERVING_FUNCTIONS
    return node.op == "call_method" and node.target in _ID_PRESERVING_METHODS


def _own_name(label: str) -> str:
    # batch['attention_mask'] is judged by its key, x[0] by its argument name.
    m = re.search(r"\[['\"](.+?)['\"]\]$", label)
    return m.group(1) if m else label.split("[", 1)[0]


def modality_sources(
    gm: fx.GraphModule,
    modalities: Any = None,
    graph: nx.DiGraph | None = None,
) -> dict[str, str]:
    """Map node name -> modality name for every input that carries a modality (module docstring).

    ``modalities`` is the user's grouping (modality name -> input names); it is checked here.
    ``graph``: the
    `build_graph` of ``gm``, built when not given.
    """
    labels = input_labels(gm)
    grouping = _grouping(gm, modalities, labels)
    reach = _Reach(gm, build_graph(gm) if graph is None else graph)
    sources: dict[str, str] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    aux = {by_name[n] for n, label in labels.items() if _AUX_NAME.search(_own_name(label))}
    # A "mask" that a learned layer reads as data is features (a segmentation mask's encoder).
    aux -= {n for n in aux if not is_integral(n) and _reads_features(n, reach)}
    for name, label in labels.items():
        node = by_name[name]
        if label in grouping:
            sources[name] = grouping[label]
        elif node in aux:
            continue
        elif _reads_ids(node, reach, aux):
            sources[name] = label
        elif not is_integral(node):
            sources[name] = label
    return sources



def describe_input_modalities(gm: fx.GraphModule) -> str:
    """Each input of an annotated ``gm`` with its modalities, or why it carries none, on one line.

    For messages that must say why no fusion was found: a token-id input that a model version
    feeds to its tower in a way the rules above do not follow shows up as "none" here.
    """
    parts = []
    for node in gm.graph.nodes:
        label = node.meta.get("regbn_input")
        if label is None:
            continue
        mods = node.meta.get("regbn_modalities") or frozenset()
        if mods:
            parts.append(f"{label}: {', '.join(sorted(mods))}")
        elif _AUX_NAME.search(_own_name(label)):
            parts.append(f"{label}: none (named as a mask, lengths or positions)")
        else:
            parts.append(
                f"{label}: none (integer values that reach no embedding lookup and are not the "
                "first tensor given to a leaf module)"
            )
    return "; ".join(parts)
