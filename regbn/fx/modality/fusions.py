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
another branch (in argument order). A fusion of three or more branches is described once per pair
of branches, every earlier one normalised with respect to every later one. The
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

import math
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from ...errors import public
from ..shapes.record import is_integral, is_tensor_node, tensor_record
from ..tracing.capture import input_name, is_regbn
from .branches import BranchWalk
from .inputs import build_graph, input_labels, modality_sources
from .kinds import fusion_kind
from .value_flow import value_inputs

# The pipeline's steps live in their own modules: which inputs start a modality
# (modality_inputs), which inputs a node reads the values of (value_flow), what kind a fusion is
# (fusion_kinds) and where each branch ends (branch_tensors). Their public names stay
# importable from here.
__all__ = [
    "Fusion",
    "annotate_modalities",
    "build_graph",
    "detect_fusions",
    "fusion_kind",
    "input_labels",
    "modality_sources",
    "value_inputs",
]


@dataclass(frozen=True)
class Fusion:
    """A node where branches of different modalities meet.

    ``operands``, ``modalities`` and ``shapes`` describe the node's operands (one per branch
    tensor read; see the module docstring); ``operands`` are fx node names and ``labels`` the
    same tensors as `regbn.inspect` shows them. ``pair`` is the ``(f, g)`` that
    ``regbn.insert(..., pairs="auto")`` uses: the branch tensors of two operands from different
    branches (three or more branches give one `Fusion` per pair of them). From
    `regbn.find_fusions`, each name in ``pair`` and ``pooled`` is spelled as users name tensors
    (an input, a module path, a read such as ``text.pooler_output``, a variable of the model's
    forward, else the fx node name), always one ``insert`` accepts; ``pair_nodes`` holds the fx
    node names.
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
    labels: tuple[str, ...] = ()  # the operands as users name them (empty: use ``operands``)

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
            f"{o} ({'+'.join(sorted(m))})"
            for o, m in zip(self.labels or self.operands, self.modalities, strict=True)
        )
        return f"{self.name} [{self.kind}]: {ops} -> pair {self.pair}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython shows a list of fusions (a notebook cell's last value) one line each.
        printer.text(f"Fusion({self})")


@public(name="regbn.fx.annotate_modalities")
def annotate_modalities(
    gm: fx.GraphModule,
    graph: nx.DiGraph | None = None,
    modalities: Any = None,
) -> nx.DiGraph:
    """Set ``node.meta["regbn_modalities"]``, ``["regbn_fusion"]`` and ``["regbn_input"]``.

    ``regbn_input`` is the input name of an input node (None elsewhere). Returns the networkx
    graph used (`build_graph`). A container argument that is also used whole depends on all of
    its entries' modalities, or carries its own name when none of them has one. A bad
    ``modalities`` raises `RegBNValueError` or `RegBNTypeError`.
    """
    graph = build_graph(gm) if graph is None else graph
    sources = modality_sources(gm, modalities, graph)
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
        found = _fusions_at(gm, node, graph, by_name)
        node.meta["regbn_fusion"] = found[0] if found else None
        node.meta["regbn_fusions"] = tuple(found)  # one per pair of operands (three or more)
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
    out: list[Fusion] = []
    for node in gm.graph.nodes:
        first = node.meta.get("regbn_fusion")
        if first:
            out += node.meta.get("regbn_fusions") or [first]
    return out


def _operands(node: fx.Node) -> list[fx.Node]:
    """Value inputs with a modality that are (once shapes are known) floating-point tensors."""
    out = []
    for src in value_inputs(node):
        if not src.meta.get("regbn_modalities") or is_tensor_node(src) is False:
            continue
        if is_integral(src):
            continue  # ids and masks: never features to normalise
        out.append(src)
    return out


def _fusions_at(
    gm: fx.GraphModule, node: fx.Node, graph: nx.DiGraph, nodes: dict[str, fx.Node]
) -> list[Fusion]:
    """The `Fusion` at ``node``, or none where its operands' modalities are not disjoint.

    Operands of three or more modalities give one `Fusion` per pair of them, in operand order,
    the earlier operand normalised with respect to the later (two operands: one, as always):
    every modality then meets every other, and each layer's inputs are well defined, since
    later pairs read what earlier pairs normalised.
    """
    if node.op not in ("call_function", "call_method", "call_module"):
        return []
    if is_regbn(gm, node):
        return _normalised_at(node)
    ops = _operands(node)
    if len(ops) < 2:
        return []
    mods = [op.meta["regbn_modalities"] for op in ops]
    # Operands from the same branch (key and value of one modality) count once.
    groups = list(dict.fromkeys(mods))
    if len(groups) < 2:
        return []
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            if groups[i] & groups[j]:
                return []
    firsts = [next(op for op, m in zip(ops, mods, strict=True) if m == g) for g in groups]
    kind = fusion_kind(gm, node)
    walk = BranchWalk(node, kind, graph, nodes)
    branches = [walk.branch_tensor(op) for op in firsts]
    if kind in ("matmul", "einsum") and _similarity(node, branches[0], branches[1]):
        kind = "similarity"
    out = []
    for i in range(len(branches)):
        for j in range(i + 1, len(branches)):
            f, g = branches[i], branches[j]
            out.append(Fusion(
                name=node.name,
                kind=kind,
                operands=tuple(op.name for op in ops),
                modalities=tuple(mods),
                shapes=tuple(tensor_record(op).shape for op in ops),
                pair=(f.name, g.name),
                pair_nodes=(f.name, g.name),
                module=node.meta.get("regbn_module"),
                output_shape=tensor_record(node).shape,
                pair_shapes=(tensor_record(f).shape, tensor_record(g).shape),
                pooled=(_pooled(gm, f), _pooled(gm, g)),
                pair_itemsize=_itemsize(f, g),
            ))  # fmt: skip
    return out


def _normalised_at(node: fx.Node) -> list[Fusion]:
    """An inserted RegBN layer: the fusion of its f and g, already normalised (kind "regbn"),
    so that `regbn.inspect` lists it and ``pairs="auto"`` leaves it alone."""
    ops = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    mods: list[frozenset[str]] = [op.meta.get("regbn_modalities") or frozenset() for op in ops]
    if len(ops) != 2 or not all(mods):
        return []
    f, g = ops
    return [Fusion(
        name=node.name,
        kind="regbn",
        operands=(f.name, g.name),
        modalities=(mods[0], mods[1]),
        shapes=(tensor_record(f).shape, tensor_record(g).shape),
        pair=(f.name, g.name),
        pair_nodes=(f.name, g.name),
        pair_shapes=(tensor_record(f).shape, tensor_record(g).shape),
        pair_itemsize=_itemsize(f, g),
    )]  # fmt: skip


def _similarity(node: fx.Node, f: fx.Node, g: fx.Node) -> bool:
    """A product of two sets of samples: (N, D) features against (M, D) ones, giving the (N, M)
    matrix of every pair (CLIP's logits, a cosine-similarity matrix), not a fusion of one
    sample's modalities."""
    out, fs, gs = (tensor_record(n).shape for n in (node, f, g))
    if out is None or fs is None or gs is None:
        return False
    return len(out) == len(fs) == len(gs) == 2 and fs[1] == gs[1] and out == (fs[0], gs[0])


def _itemsize(f: fx.Node, g: fx.Node) -> int:
    # RegBN keeps W in float32 unless a float64 model turns it into float64.
    dtypes = {tensor_record(f).dtype, tensor_record(g).dtype}
    return 8 if torch.float64 in dtypes else 4


def _pooled(gm: fx.GraphModule, branch: fx.Node) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(name, shape)`` of 2-D float tensors ``(batch, features)`` of ``branch``'s modalities,
    smaller than ``branch``, largest first (at most three).

    These are the pooled or CLS features of the same branch (a leaf's ``pooler_output``, a mean
    over tokens, ``x[:, 0]``): what to pair when the branch tensor's W is too large.
    """
    shape = tensor_record(branch).shape
    mods = branch.meta.get("regbn_modalities")
    if shape is None or len(shape) < 2:
        return ()
    size = math.prod(shape[1:])
    found: list[tuple[int, int, str, tuple[int, ...]]] = []
    for node in gm.graph.nodes:
        s = tensor_record(node).shape
        if node is branch or s is None or len(s) != 2 or s[0] != shape[0] or not 2 <= s[1] < size:
            continue
        if node.meta.get("regbn_modalities") != mods or is_integral(node):
            continue
        if node.op == "call_module" and is_regbn(gm, node):
            continue
        found.append((-s[1], len(found), node.name, tuple(s)))
    return tuple((name, s) for _, _, name, s in sorted(found)[:3])

