"""Modality analysis and fusion detection on an annotated fx graph, with networkx.

**Inputs.** An *input* is a tensor argument of ``forward`` (``"gray"``), or one entry of an
argument that holds several tensors, read with a constant key (``"batch['audio']"``, ``"x[0]"``).

**Modalities, as the user means them.** ``modalities={"text": ["input_ids", "attention_mask"],
"image": ["pixel_values"]}`` names them: every listed input carries its group's name. An input not
listed follows these rules, in order:

1. An input whose name has a word for a mask, lengths, positions or token types (``attention_mask``,
   ``key_padding_mask``, ``lengths``, ``seq_lens``, ``position_ids``, ``token_type_ids``,
   ``segment_ids``) carries no modality of its own, unless it holds floating-point values that
   a learned layer reads as its data (through reshapes and casts, the first tensor of a
   ``nn.Linear``, ``nn.Conv2d``, ... or of ``F.linear``/``F.conv2d``): a segmentation mask fed
   to its own encoder is a modality like any image.
2. An input whose values are read as token ids starts a modality named after it: through casts,
   reshapes and indexing it reaches the indices of an embedding lookup (``nn.Embedding``,
   ``nn.EmbeddingBag``, ``F.embedding``, ``self.table[ids]``, ``torch.index_select`` of a
   parameter, ``F.one_hot``) or the first tensor given to a leaf module (a tower kept
   whole, ``BertModel(input_ids, attention_mask)``). Two id inputs are two modalities.
3. Any other integer or bool input (a mask, lengths, labels: known once shapes were propagated)
   carries no modality.
4. Every other input (floating-point features; any input when dtypes are unknown) starts a
   modality named after it.

An input without a modality joins what it gates: a node takes the modalities of its other
operands, so an attention mask neither makes a fusion nor hides one.

**Flow.** A node's modalities (``node.meta["regbn_modalities"]``) are the union of those of the
operands whose *values* it reads. Shape reads carry none: ``x.shape``, ``x.size()``, ``x.dtype``,
``x.device``, ``x.dim()``, the ``self`` of ``x.new_ones(...)`` and the other ``new_*``, the first
argument of ``torch.zeros_like`` and the other ``*_like``, and the second tensor of
``view_as``/``reshape_as``/``expand_as``/``type_as``/``to``. So ``torch.zeros((x.shape[0], 4))``
and a CLS token ``expand``-ed to the batch size belong to no modality.

**Fusion.** A *fusion* (``node.meta["regbn_fusion"]``) is a node whose operands depend on
pairwise disjoint, non-empty sets of modalities: where separate branches meet. Operands are the
tensors whose values the node reads, with a modality and (once shapes are known) a floating-point
dtype: masks, ids, constants and parameters are not operands, so ``mul(1, x)``, ``x * self.scale``,
``masked_fill(mask, 0)`` and a residual add inside one modality are not fusions. Operands with
identical sets (the key and value of one modality in attention) are one branch.

**Pair.** Each fusion suggests the pair ``(f, g)`` that ``regbn.insert(..., pairs="auto")`` uses:
the branch tensor of its first operand, normalised with respect to that of the first operand from
another branch (in argument order; a fusion with more than two operands gets one layer). The
*branch tensor* of an operand is the last tensor its branch produced, found by walking back past
the fusion's own ops, the nodes whose every use leads into the fusion (or past it):

- layout ops: views, reshapes, transposes, permutes, (un)squeezes, head splits, ``chunk`` and
  ``split`` parts, ``expand``, ``contiguous``, dtype casts, dropout, a scale by a constant
  (``q * self.scale``), a shift by a literal (``1 + gamma``; ``x + self.pos_embedding`` stays
  in the branch), a concatenation with constants only (a CLS token in front, the column of
  ones of a tensor-fusion network);
- gate functions: ``sigmoid``, ``tanh``, ``softmax``, ``hardsigmoid`` (``sigmoid(a) * b``);
- for an elementwise fusion (mul, add, sub, div), one linear projection when it or its input
  feeds the fusion along two or more paths: FiLM's γ and β, split from one projection or
  projected separately from one conditioning tensor.

Attention's q/k/v projections and a branch's own last layer are kept (they are features a user
would name), so ``q @ k.transpose(-2, -1)`` pairs the q and k projections.
"""

from __future__ import annotations

import builtins
import math
import operator
import re
from collections.abc import Callable
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
    "input_labels",
    "modality_sources",
    "value_inputs",
]


@dataclass(frozen=True)
class Fusion:
    """A node where branches of different modalities meet.

    ``operands``, ``modalities`` and ``shapes`` describe the node's operands (one per branch
    tensor read; see the module docstring). ``pair`` is the ``(f, g)`` that
    ``regbn.insert(..., pairs="auto")`` uses: the branch tensors of the first operand and of the
    first operand from another branch. A fusion with more than two operands therefore gets one
    RegBN layer; pass explicit pairs to normalise the others. Each name is an fx node name
    (from `regbn.find_fusions`: the module path for the last op of a module traced through),
    prefixed only where the bare name would be ambiguous for ``insert``; ``pair_nodes`` holds
    the node names.
    ``pair_shapes`` are the shapes of the pair's tensors; ``pooled`` lists, for each of them,
    ``(name, shape)`` of smaller 2-D tensors ``(batch, features)`` of the same branch (pooled or
    CLS features, largest first) to pair instead when the projection W would be too large
    (`projection_bytes`).
    """

    name: str
    kind: str
    operands: tuple[str, ...]
    modalities: tuple[frozenset[str], ...]
    shapes: tuple[tuple[int, ...] | None, ...]
    pair: tuple[str, str]
    module: str | None = None
    output_shape: tuple[int, ...] | None = None
    pair_shapes: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = (None, None)
    pooled: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...] = ((), ())
    pair_itemsize: int = 4
    pair_nodes: tuple[str, str] | None = None  # the pair's fx node names (``pair`` may be paths)
    # (name, expression) for names of pair and pooled that read an output: text.pooler_output
    expressions: tuple[tuple[str, str], ...] = ()

    @property
    def projection_bytes(self) -> int | None:
        """Bytes of the W (Dg×Df) a RegBN layer at ``pair`` holds: Df·Dg·itemsize (float32: 4).

        ``None`` when shapes are unknown. Df and Dg are the per-sample sizes of f and g.
        """
        f, g = self.pair_shapes
        if f is None or g is None:
            return None
        return math.prod(f[1:]) * math.prod(g[1:]) * self.pair_itemsize

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


# ------------------------------------------------------------------------------- value flow

_SHAPE_ATTRS = frozenset(
    {"shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_sparse", "is_quantized",
     "is_meta", "requires_grad", "names"}
)  # fmt: skip
_SHAPE_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "get_device", "element_size", "stride",
     "is_floating_point", "is_complex", "is_contiguous", "data_ptr", "storage_offset"}
)  # fmt: skip
_NEW_METHODS = frozenset(
    {"new_ones", "new_zeros", "new_empty", "new_full", "new_tensor", "new_empty_strided"}
)
# Methods whose tensor arguments after self lend only their shape, dtype or device.
_AS_METHODS = frozenset({"view_as", "reshape_as", "expand_as", "type_as", "to", "type"})
_LIKE_FUNCTIONS = frozenset(
    {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
     torch.randn_like, torch.randint_like}
)  # fmt: skip
_SHAPE_FUNCTIONS = frozenset({torch.numel, builtins.len})


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return list(dict.fromkeys(found))


def value_inputs(node: fx.Node) -> list[fx.Node]:
    """The input nodes whose values ``node`` reads (shape, dtype and device reads left out)."""
    op, target, args = node.op, node.target, node.args
    if op == "call_function":
        if target is builtins.getattr and len(args) >= 2 and args[1] in _SHAPE_ATTRS:
            return []
        if target in _SHAPE_FUNCTIONS:
            return []
        if target in _LIKE_FUNCTIONS:
            return _nodes_in((args[1:], node.kwargs))
    if op == "call_method":
        if target in _SHAPE_METHODS:
            return []
        if target in _NEW_METHODS:
            return _nodes_in((args[1:], node.kwargs))
        if target in _AS_METHODS:
            return _nodes_in(args[:1])
    return list(node.all_input_nodes)


# ------------------------------------------------------------------------------- inputs

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
        if entries and _is_tensor_node(ph) is not True:
            for u in entries:
                labels[u.name] = entry_name(ph, u.args[1])
            continue
        labels[ph.name] = input_name(ph)
    return labels


def _grouping(gm: fx.GraphModule, modalities: Any, labels: dict[str, str]) -> dict[str, str]:
    """Map input name -> modality name from the user's ``modalities``; ValueError on bad names."""
    if modalities is None:
        return {}
    if not isinstance(modalities, dict) or not all(isinstance(k, str) for k in modalities):
        raise TypeError(
            "modalities must be a dict of modality name -> input names, e.g. "
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
                entries = [k for k in known if k.startswith(f"{name}[")]
                for k in entries or [name]:
                    out.setdefault(k, modality)
                continue
            if name not in known:
                raise ValueError(
                    f"modalities[{modality!r}]: {raw!r} is not an input of this model; its "
                    f"inputs are {known}. Name forward arguments, or entries as "
                    "\"batch['audio']\""
                )
            if name in out and out[name] != modality:
                raise ValueError(
                    f"modalities: input {name!r} is listed under both {out[name]!r} and "
                    f"{modality!r}; give each input one modality"
                )
            out[name] = modality
    return out


def _canonical_input(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"modalities: input names must be strings; got {name!r}")
    return name.replace('"', "'")


def _reads_ids(node: fx.Node, gm: fx.GraphModule, aux: set[fx.Node]) -> bool:
    """True when ``node``'s values reach an embedding's indices or a leaf module's first input
    (masks and other ``aux`` inputs passed before it, ``leaf(attention_mask=m, input_ids=i)``,
    do not count as first)."""
    return _reaches(
        node,
        hit=lambda user, cur: _indexes_with(user, cur, gm, aux),
        follow=lambda user, cur: _preserves_ids(user) and user.all_input_nodes[:1] == [cur],
    )


def _reaches(
    node: fx.Node,
    hit: Callable[[fx.Node, fx.Node], bool],
    follow: Callable[[fx.Node, fx.Node], bool],
) -> bool:
    """True when a chain of users from ``node``, each step passing ``follow(user, value)``,
    arrives at a user with ``hit(user, value)``. Iterative: graphs can be thousands deep."""
    seen = {node}
    stack = [node]
    while stack:
        cur = stack.pop()
        for user in cur.users:
            if hit(user, cur):
                return True
            if user not in seen and follow(user, cur):
                seen.add(user)
                stack.append(user)
    return False


def _submodule(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls; None when ``gm`` does not hold it."""
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


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
            return isinstance(table, fx.Node) and table.op == "get_attr" and src in _nodes_in(
                (index,)
            )
        if user.target is torch.index_select and len(user.args) == 3:
            table, index = user.args[0], user.args[2]
            return isinstance(table, fx.Node) and table.op == "get_attr" and index is src
        return False
    if user.op != "call_module" or is_regbn(gm, user):
        return False
    module = _submodule(gm, user)
    if module is None:
        return False
    builtin = type(module).__module__.startswith("torch.nn")
    if builtin and not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    return _first_node(user, aux) is src


def _first_node(node: fx.Node, aux: set[fx.Node]) -> fx.Node | None:
    found = [n for n in _nodes_in((node.args, node.kwargs)) if n not in aux]
    return found[0] if found else None


_FEATURE_FUNCTIONS = frozenset({F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d,
                                F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                                torch.conv1d, torch.conv2d, torch.conv3d})  # fmt: skip
_FLOAT_CASTS = frozenset({"float", "double", "half", "bfloat16", "type_as"})


def _reads_features(node: fx.Node, gm: fx.GraphModule) -> bool:
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
        if user.op != "call_module" or is_regbn(gm, user):
            return False
        module = _submodule(gm, user)
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

    return _reaches(node, hit=learned, follow=passes)


def _preserves_ids(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ID_PRESERVING_FUNCTIONS
    return node.op == "call_method" and node.target in _ID_PRESERVING_METHODS


def _is_integral(node: fx.Node) -> bool:
    dtype = node.meta.get("regbn_dtype")
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex


def _own_name(label: str) -> str:
    # batch['attention_mask'] is judged by its key, x[0] by its argument name.
    m = re.search(r"\[['\"](.+?)['\"]\]$", label)
    return m.group(1) if m else label.split("[", 1)[0]


def modality_sources(gm: fx.GraphModule, modalities: Any = None) -> dict[str, str]:
    """Map node name -> modality name for every input that carries a modality (module docstring).

    ``modalities`` is the user's grouping (modality name -> input names); it is checked here.
    """
    labels = input_labels(gm)
    grouping = _grouping(gm, modalities, labels)
    sources: dict[str, str] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    aux = {by_name[n] for n, label in labels.items() if _AUX_NAME.search(_own_name(label))}
    # A "mask" that a learned layer reads as data is features (a segmentation mask's encoder).
    aux -= {n for n in aux if not _is_integral(n) and _reads_features(n, gm)}
    for name, label in labels.items():
        node = by_name[name]
        if label in grouping:
            sources[name] = grouping[label]
        elif node in aux:
            continue
        elif _reads_ids(node, gm, aux):
            sources[name] = label
        elif not _is_integral(node):
            sources[name] = label
    return sources


# ------------------------------------------------------------------------------- annotation


def annotate_modalities(
    gm: fx.GraphModule, graph: nx.DiGraph | None = None, modalities: Any = None
) -> nx.DiGraph:
    """Set ``node.meta["regbn_modalities"]``, ``["regbn_fusion"]`` and ``["regbn_input"]``.

    ``regbn_input`` is the input name of an input node (None elsewhere). Returns the networkx
    graph used (`build_graph`). A container argument that is also used whole depends on all of
    its entries' modalities, or carries its own name when none of them has one.
    """
    graph = build_graph(gm) if graph is None else graph
    sources = modality_sources(gm, modalities)
    labels = input_labels(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    deps: dict[str, frozenset[str]] = {}
    # A source starts afresh rather than inheriting from its container placeholder, so two
    # entries of one dict count as two modalities.
    for name in nx.topological_sort(graph):
        node = by_name[name]
        node.meta["regbn_input"] = labels.get(name)
        if name in sources:
            deps[name] = frozenset({sources[name]})
        elif name in labels:
            deps[name] = frozenset()  # an input without a modality (a mask): none
        elif node.op == "placeholder":
            deps[name] = _container_modalities(node, sources, labels)
        else:
            deps[name] = frozenset().union(*(deps[p.name] for p in value_inputs(node)))
    for name, mods in deps.items():
        by_name[name].meta["regbn_modalities"] = mods
    _mark_constants(gm, labels)
    for node in gm.graph.nodes:
        node.meta["regbn_fusion"] = _fusion_at(gm, node)
    return graph


def _mark_constants(gm: fx.GraphModule, labels: dict[str, str]) -> None:
    """``node.meta["regbn_constant"]``: no input's value reaches the node (parameters, literals,
    shapes: a CLS token expanded to the batch size, a column of ones)."""
    for node in gm.graph.nodes:
        node.meta["regbn_constant"] = (
            node.op != "placeholder"
            and node.name not in labels
            and all(src.meta.get("regbn_constant", False) for src in value_inputs(node))
        )


def _container_modalities(
    ph: fx.Node, sources: dict[str, str], labels: dict[str, str]
) -> frozenset[str]:
    entries = [u.name for u in ph.users if u.name in labels and u is not ph]
    mods = frozenset(sources[e] for e in entries if e in sources)
    if mods or not any(u.name not in labels for u in ph.users):
        return mods
    # Used whole, and no entry read on its own carries a modality: the container is one input.
    return frozenset({input_name(ph)})


def detect_fusions(gm: fx.GraphModule) -> list[Fusion]:
    """The fusions of an annotated graph, in graph order."""
    return [n.meta["regbn_fusion"] for n in gm.graph.nodes if n.meta.get("regbn_fusion")]


def _operands(node: fx.Node) -> list[fx.Node]:
    """Value inputs with a modality that are (once shapes are known) floating-point tensors."""
    out = []
    for src in value_inputs(node):
        if not src.meta.get("regbn_modalities") or _is_tensor_node(src) is False:
            continue
        if _is_integral(src):
            continue  # ids and masks: never features to normalise
        out.append(src)
    return out


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
    kind = fusion_kind(gm, node)
    walk = _BranchWalk(node, kind)
    f, g = walk.branch_tensor(ops[0]), walk.branch_tensor(second)
    return Fusion(
        name=node.name,
        kind=kind,
        operands=tuple(op.name for op in ops),
        modalities=tuple(mods),
        shapes=tuple(op.meta.get("regbn_shape") for op in ops),
        pair=(f.name, g.name),
        pair_nodes=(f.name, g.name),
        module=node.meta.get("regbn_module"),
        output_shape=node.meta.get("regbn_shape"),
        pair_shapes=(f.meta.get("regbn_shape"), g.meta.get("regbn_shape")),
        pooled=(_pooled(gm, f), _pooled(gm, g)),
        pair_itemsize=_itemsize(f, g),
    )


def _itemsize(f: fx.Node, g: fx.Node) -> int:
    # RegBN keeps W in float32 unless a float64 model turns it into float64.
    dtypes = {f.meta.get("regbn_dtype"), g.meta.get("regbn_dtype")}
    return 8 if torch.float64 in dtypes else 4


def _pooled(gm: fx.GraphModule, branch: fx.Node) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(name, shape)`` of 2-D float tensors ``(batch, features)`` of ``branch``'s modalities,
    smaller than ``branch``, largest first (at most three).

    These are the pooled or CLS features of the same branch (a leaf's ``pooler_output``, a mean
    over tokens, ``x[:, 0]``): what to pair when the branch tensor's W is too large.
    """
    shape = branch.meta.get("regbn_shape")
    mods = branch.meta.get("regbn_modalities")
    if shape is None or len(shape) < 2:
        return ()
    size = math.prod(shape[1:])
    found = []
    for node in gm.graph.nodes:
        s = node.meta.get("regbn_shape")
        if node is branch or s is None or len(s) != 2 or s[0] != shape[0] or not 2 <= s[1] < size:
            continue
        if node.meta.get("regbn_modalities") != mods or _is_integral(node):
            continue
        if node.op == "call_module" and is_regbn(gm, node):
            continue
        found.append((-s[1], len(found), node.name, tuple(s)))
    return tuple((name, s) for _, _, name, s in sorted(found)[:3])


# ------------------------------------------------------------------------------- branch tensors

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
_ELEMENTWISE_KINDS = frozenset({"mul", "add", "sub", "div"})


class _BranchWalk:
    """Walks back from a fusion's operands to their branch tensors (see the module docstring)."""

    def __init__(self, fusion: fx.Node, kind: str) -> None:
        self.fusion = fusion
        self.kind = kind
        self.region = _descendants(fusion) | {fusion}
        self._own: dict[fx.Node, bool] = {}

    def branch_tensor(self, operand: fx.Node) -> fx.Node:
        node = self._past_glue(operand)
        if self.kind in _ELEMENTWISE_KINDS and self._is_projection(node) and self.own(node):
            source = _single_value_input(node)
            if (
                source is not None
                and _is_tensor_node(source) is not False
                and (self._entries(source) >= 2 or self._entries(node) >= 2)
            ):
                node = self._past_glue(source)
        return node

    def _past_glue(self, node: fx.Node) -> fx.Node:
        while _is_glue(node) and self.own(node):
            source = _single_value_input(node)
            if source is None or _is_integral(source):
                break  # never onto ids or masks
            if _is_tensor_node(source) is False and not _is_split(source):
                break  # nor onto a tuple or dict (a leaf's whole output)
            node = source
        return node

    def own(self, node: fx.Node) -> bool:
        """True when every use of ``node`` leads into the fusion (or past it)."""
        memo, region = self._own, self.region
        # Post-order over users, without recursion (graphs can be thousands of nodes deep).
        stack = [(node, False)]
        while stack:
            cur, expanded = stack.pop()
            if cur in region or cur in memo:
                continue
            if not expanded:
                stack.append((cur, True))
                stack.extend((u, False) for u in cur.users if u not in region and u not in memo)
                continue
            users = list(cur.users)
            memo[cur] = bool(users) and all(u in region or memo.get(u, False) for u in users)
        return node in region or memo[node]

    def _entries(self, node: fx.Node) -> int:
        """How many nodes of the fusion region read ``node`` or what it feeds the fusion."""
        entries: set[fx.Node] = set()
        seen: set[fx.Node] = set()
        stack = [node]
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            for user in cur.users:
                if user in self.region:
                    entries.add(user)
                elif self.own(user):
                    stack.append(user)
        return len(entries)

    @staticmethod
    def _is_projection(node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target is F.linear
        if node.op != "call_module":
            return False
        return isinstance(_submodule(node.graph.owning_module, node), nn.Linear)


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        cur = stack.pop()
        if cur not in seen:
            seen.add(cur)
            stack.extend(cur.users)
    return seen


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
    if node.target in _SHIFTS:
        # 1 + gamma is FiLM's; x + self.pos_embedding belongs to the branch that adds it.
        return node.op in ("call_function", "call_method") and len(_nodes_in(node.args)) == 1
    if node.op == "call_function":
        return node.target in _LAYOUT_FUNCTIONS or node.target in _SCALE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS or node.target in _SCALE_METHODS
    return False


_SHIFTS = frozenset(
    {operator.add, operator.sub, torch.add, torch.sub, "add", "sub", "add_", "sub_"}
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
    torch.outer: "outer",
    torch.ger: "outer",
    torch.kron: "outer",
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
    "outer": "outer",
    "ger": "outer",
}


def fusion_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """cat, stack, add, sub, mul, div, matmul, einsum, outer, attention, bilinear or other."""
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target, "other")
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, "other")
    module = _submodule(gm, node)
    if module is None:
        return "other"
    if isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        return "attention"
    if isinstance(module, nn.Bilinear):
        return "bilinear"
    return "other"
