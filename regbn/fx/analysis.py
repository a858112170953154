"""The one analysis pipeline behind `regbn.inspect`, `regbn.find_fusions` and `regbn.insert`.

`analyse` traces the model, propagates shapes (real or fake tensors), tags every node with the
modalities its value depends on and finds the fusions. It never writes into the caller's model:
an ``nn.Module`` is traced into a new ``GraphModule``, and a ``GraphModule`` passed in is analysed
on a copy of its graph (its nodes' ``meta`` stay as they were).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch.fx as fx
from torch import nn

from ..errors import RegBNTypeError, RegBNValueError, RegBNWarning, public
from ..layer import RegBN
from .modality.fusions import Fusion, annotate_modalities, detect_fusions
from .modality.inputs import describe_input_modalities, input_labels
from .modality.value_flow import value_inputs
from .names import display_names, expression
from .shapes.propagate import ShapeFailure, propagate_shapes
from .shapes.verify import check_forward
from .tracing.capture import is_regbn, trace_graph
from .tracing.module_state import carry_missing_state
from .tracing.regions import global_hooks

__all__ = [
    "DEFAULT_MAX_PROJECTION_BYTES",
    "Analysis",
    "analyse",
    "auto_pairs",
    "find_fusions",
    "split_by_projection",
    "trace_options",
]

# The layer's own default, so that "auto" skips exactly what the layer would refuse.
DEFAULT_MAX_PROJECTION_BYTES: int = (
    inspect.signature(RegBN).parameters["max_projection_bytes"].default
)


@dataclass
class Analysis:
    """What `analyse` found.

    ``gm``: the annotated ``GraphModule`` (never the caller's object); ``fusions``: its fusions in
    graph order, pairs spelled as `regbn.insert` resolves them; ``failure``: where shape
    propagation stopped (None when shapes were not asked for or all succeeded); ``graph``: the
    networkx DiGraph of node names the modality analysis used (an edge u -> v when v reads u);
    ``names``: node name -> the name users see (`names.display_names`).
    """

    gm: fx.GraphModule
    fusions: list[Fusion]
    failure: ShapeFailure | None
    graph: nx.DiGraph
    names: dict[str, str] = field(default_factory=dict)


# The keywords every public entry point (find_fusions, insert, inspect, measure_dependence) takes
# for tracing and shapes, and passes on here unchanged.
TRACE_OPTIONS = (
    "input_shapes",
    "input_dtypes",
    "modalities",
    "concrete_args",
    "leaf_modules",
    "autowrap_functions",
)


def trace_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """The `TRACE_OPTIONS` among a public function's arguments (its ``locals()``), for `analyse`.

    The public signatures list these keywords one by one, so that users and type checkers see
    them; this keeps the forwarding in one place.
    """
    return {name: arguments[name] for name in TRACE_OPTIONS if name in arguments}


def capture_options(model: nn.Module, example_inputs: Any, options: dict[str, Any]) -> dict:
    """`trace_graph`'s keywords for the public entry points: the user's tracing options, the
    argument names the example holds (``given``), and automatic leaves."""
    out = {k: options.get(k) for k in ("concrete_args", "leaf_modules", "autowrap_functions")}
    out["given"] = _given_names(model, example_inputs, options.get("input_shapes"))
    out["auto_leaves"] = True
    return out


def _given_names(model: nn.Module, example_inputs: Any, input_shapes: Any) -> list[str] | None:
    """The forward arguments the example inputs (or shapes) hold, by name; None when unknown."""
    inputs = example_inputs if example_inputs is not None else input_shapes
    if inputs is None:
        return None
    if isinstance(inputs, dict):
        return [str(k) for k in inputs]
    one_shape = input_shapes is not None and _is_one_shape(inputs)
    if not isinstance(inputs, (tuple, list)) or one_shape:
        inputs = (inputs,)
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[: len(inputs)] if len(inputs) <= len(positional) else None


def _is_one_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(d, int) for d in value)


def analyse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    shapes: Callable[[fx.GraphModule], ShapeFailure | None] | None = None,
    compare: bool = True,
    **options: Any,
) -> Analysis:
    """Trace, propagate shapes, annotate modalities and detect fusions, in that order.

    ``example_inputs`` (real tensors) or ``input_shapes`` (+ ``input_dtypes``, fake tensors) give
    shapes; with neither, the analysis is structural (every operand with a modality counts).
    ``modalities`` groups inputs into named modalities (see `regbn.fx.modality`). Tracing options
    are those of `regbn.fx.tracing.trace`. A trace failure raises `TraceError`; a shape failure is
    returned in ``failure`` and the modalities still hold for every node. ``shapes``: what
    propagates real shapes instead of `propagate_shapes` (`regbn.insert`'s check).
    ``compare``: warn where the graph computes otherwise than the model on ``example_inputs``
    (`regbn.insert` verifies in its own way, or is told not to).
    """
    unknown = sorted(set(options) - set(TRACE_OPTIONS))
    if unknown:
        raise RegBNTypeError(
            f"unexpected tracing keywords {unknown}; the known ones are {TRACE_OPTIONS}"
        )
    input_shapes, input_dtypes = options.get("input_shapes"), options.get("input_dtypes")
    modalities = options.get("modalities")
    tracing = capture_options(model, example_inputs, options)
    found = trace_graph(model, **tracing)
    if found.auto_leaves:
        warnings.warn(
            f"torch.fx cannot trace inside {'; '.join(found.auto_leaves)}, so every "
            "instance of these classes is kept as one call (a leaf): it runs as written, and "
            "tensors inside it cannot be named. Pass leaf_modules=[...] yourself to choose "
            "other leaves",
            RegBNWarning,
            stacklevel=1,
        )
    if found.effects:
        warnings.warn(
            f"the model's forward prints or logs ({'; '.join(found.effects[:3])}); "
            "tracing ran those lines once, and the patched model does not run them. Make the "
            "module that prints a leaf (leaf_modules=[...]) to keep them",
            RegBNWarning,
            stacklevel=1,
        )
    kinds = global_hooks()
    inlined = sorted({str(p) for n in found.graph.nodes
                      for p, _ in n.meta.get("regbn_module_calls", ()) if n.op != "call_module"})
    if kinds and inlined:
        warnings.warn(
            f"global module hooks ({', '.join(kinds)}) are registered; the patched "
            "model runs them for itself and for every module it calls as one call (leaves, "
            f"RegBN layers), but not for the modules traced through ({', '.join(inlined[:4])}"
            f"{' ...' if len(inlined) > 4 else ''}). Make those leaves if the hooks must see them",
            RegBNWarning,
            stacklevel=1,
        )
    traced = found.graph_module()
    gm = private_copy(traced) if traced is model else traced
    failure = None
    if shapes is not None and example_inputs is not None:
        failure = shapes(gm)  # insert's training-mode check, which propagates shapes as well
    elif example_inputs is not None or input_shapes is not None:
        failure = propagate_shapes(
            gm, example_inputs, input_shapes=input_shapes, input_dtypes=input_dtypes
        )
    if compare and example_inputs is not None and failure is None and (
        traced is not model  # a GraphModule passed in is its own graph
    ):
        differences = check_forward(model, gm, example_inputs)
        if differences:
            warnings.warn(
                f"the traced graph does not compute what the model computes on "
                f"example_inputs ({'; '.join(differences[:3])}), so the shapes, modalities and "
                "fusions shown here may not be the model's; regbn.insert would refuse this graph "
                "and its message says how to proceed",
                RegBNWarning,
                stacklevel=1,
            )
    # Modalities are structural: they hold for every node, even past a shape failure.
    graph = annotate_modalities(gm, modalities=modalities)
    names = display_names(gm)
    fusions = [with_pair_names(gm, f, names) for f in detect_fusions(gm)]
    _warn_hidden_fusions(gm, {f.name for f in fusions})
    return Analysis(gm, fusions, failure, graph, names)


def _warn_hidden_fusions(gm: fx.GraphModule, fusions: set[str]) -> None:
    """A leaf that reads inputs of two or more modalities (token ids of one, features of
    another) may fuse them inside, where no fusion can be seen or patched: say so."""
    hidden = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.name in fusions or is_regbn(gm, node):
            continue
        groups = list(dict.fromkeys(
            src.meta["regbn_modalities"] for src in value_inputs(node)
            if src.meta.get("regbn_modalities")
        ))  # fmt: skip
        disjoint = len(groups) >= 2 and all(
            not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:]
        )
        if disjoint:
            module = type(gm.get_submodule(str(node.target))).__name__
            mods = " and ".join(", ".join(sorted(g)) for g in groups)
            hidden.append(f"{node.target!r} ({module}) reads {mods}")
    if hidden:
        warnings.warn(
            f"{'; '.join(hidden)}: the branches may fuse inside, where a leaf cannot "
            "be seen into, so no fusion is reported there. Pair tensors of each branch before "
            "they enter it, or make it traceable (drop it from leaf_modules)",
            RegBNWarning,
            stacklevel=1,
        )


def private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A ``GraphModule`` over a copy of ``gm``'s graph that shares its submodules and tensors.

    Node ``meta`` dicts are copied too, so annotating the copy leaves ``gm`` as it was.
    """
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph, type(gm).__name__)
    carry_missing_state(gm, out)
    out.meta.update(getattr(gm, "meta", {}))
    out.training = gm.training
    return out


@public
def find_fusions(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    input_shapes: Any = None,
    input_dtypes: Any = None,
    modalities: dict[str, Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Any = None,
    autowrap_functions: Any = None,
) -> list[Fusion]:
    """Trace ``model`` and list the nodes where its modality branches fuse, in graph order.

    Args:
        model: the ``nn.Module`` to analyse.
        example_inputs: real inputs; with them (or ``input_shapes``) the fusions carry shapes
            and only floating-point tensor operands count; without, every operand with a
            modality counts.
        input_shapes: shapes instead of ``example_inputs`` (fake tensors).
        input_dtypes: dtypes for ``input_shapes``.
        modalities: groups inputs, e.g.
            ``{"text": ["input_ids", "attention_mask"], "image": ["pixel_values"]}``.
        concrete_args: tracing option, as in torch.fx.
        leaf_modules: module classes or dotted paths to keep as one call.
        autowrap_functions: functions to keep as one call.

    Returns:
        A list of `Fusion`, each with ``.name``, ``.kind``, ``.operands``, ``.modalities``,
        ``.shapes`` and the ``pair`` that `regbn.insert` would use (see `Fusion`).

    Raises:
        RegBNValueError: a shape-propagation failure, naming the node.
        TraceError: the model cannot be traced.

    Example:
        >>> fusions = regbn.find_fusions(model, example_inputs=(gray, colored))
        >>> [(f.name, f.kind) for f in fusions]
        [('cat', 'cat')]
    """
    result = analyse(
        model, example_inputs, **trace_options(locals())
    )
    if result.failure is not None:
        raise RegBNValueError(
            f"{result.failure}. Check example_inputs/input_shapes against the "
            "model's forward, or run regbn.inspect(model, ...) to see the shapes up to that node"
        )
    return result.fusions


def with_pair_names(
    gm: fx.GraphModule, fusion: Fusion, names: dict[str, str] | None = None
) -> Fusion:
    """``fusion`` with its operands, pair and pooled tensors named as users name them
    (`names.display_names`: an input, a module path, a read such as ``text.pooler_output``, a
    variable of forward, else the fx node name), each a name `regbn.insert` accepts back."""
    names = names if names is not None else display_names(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    pooled = tuple(tuple((names[n], s) for n, s in side) for side in fusion.pooled)
    raw = [*fusion.pair, *(n for side in fusion.pooled for n, _ in side)]
    expressions = tuple(
        (names[n], expr)
        for n in dict.fromkeys(raw)
        if (expr := expression(by_name[n])) != n and names[n] != expr
    )
    return replace(
        fusion,
        labels=tuple(names[o] for o in fusion.operands),
        pair=(names[fusion.pair[0]], names[fusion.pair[1]]),
        pooled=pooled,
        expressions=expressions,
    )


def auto_pairs(
    fusions: list[Fusion],
    max_projection_bytes: int | None = None,
    projection: str = "full",
    gm: fx.GraphModule | None = None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """The pairs ``regbn.insert(..., pairs="auto")`` uses, and a message per fusion it skips.

    One pair per fusion (its ``pair``; a pair already taken is not repeated), except where the
    RegBN layer's W would pass ``max_projection_bytes`` (default: the layer's, 2**30): Df·Dg·4
    bytes for ``projection="full"``, Cf·Cg·4 for ``"channel"`` (8 per entry for float64). Those
    are skipped, typically token-level fusions of two transformer towers, and the message names
    the pooled or CLS tensors of the same branches to pair instead. Names are those
    `find_fusions` shows (``node:``-prefixed fx node names for fusions without them).
    Raises ``ValueError`` when no fusion is left (none found, or every one skipped); with the
    annotated ``gm``, the message of "none found" lists each input's modalities (or why it has
    none), since one input left without a modality is the usual reason.
    """
    similarity = [f for f in fusions if f.kind == "similarity"]
    normalised = [f for f in fusions if f.kind == "regbn"]
    kept, skipped = split_by_projection(
        [f for f in fusions if f.kind not in ("similarity", "regbn")],
        max_projection_bytes,
        projection,
    )
    skipped += [_similarity_message(f) for f in similarity]
    pairs: list[tuple[str, str]] = []
    for fusion in kept:
        # find_fusions' names resolve to the pair's nodes in this graph (with_pair_names);
        # bare node names from detect_fusions get the node: prefix.
        nodes = fusion.pair if fusion.labels else fusion.pair_nodes or fusion.pair
        pair = nodes if fusion.labels else (_node_name(nodes[0]), _node_name(nodes[1]))
        if pair not in pairs:
            pairs.append(pair)
    if normalised:
        done = ", ".join(f"{f.name} on {f.pair!r}" for f in normalised)
        if not pairs:
            raise RegBNValueError(
                f"pairs='auto': every fusion of this model is already normalised by "
                f"its RegBN layer ({done}), so there is nothing to insert. To add layers "
                "elsewhere, name the pairs: regbn.insert(patched, pairs=[(f, g)], ...); "
                "regbn.inspect(patched, ...) lists the tensors"
            )
        skipped.append(f"pairs='auto' left the fusions already normalised alone: {done}")
    if not pairs:
        if skipped:
            raise RegBNValueError(
                "pairs='auto': every fusion was skipped, so there is nowhere to "
                "insert RegBN. " + " ".join(skipped)
            )
        inputs = f" Inputs: {describe_input_modalities(gm)}." if gm is not None else ""
        raise RegBNValueError(
            "pairs='auto': found no fusion (no node whose tensor operands come from "
            f"disjoint sets of inputs), so there is nowhere to insert RegBN.{inputs} Group the "
            f"inputs into modalities with modalities={_grouping_example(gm)}, or name the pairs "
            "explicitly; run regbn.inspect(model, ...) to list the tensors"
        )
    return pairs, skipped


def _grouping_example(gm: fx.GraphModule | None) -> str:
    """A ``modalities=`` argument written with this model's own inputs (one modality each)."""
    names = list(input_labels(gm).values()) if gm is not None else []
    names = list(dict.fromkeys(names))
    if len(names) < 2:
        return "{'text': ['input_ids', 'attention_mask'], 'image': ['pixel_values']}"
    return "{" + ", ".join(f"'m{i}': [{n!r}]" for i, n in enumerate(names)) + "}"


def _similarity_message(fusion: Fusion) -> str:
    f, g = fusion.pair
    return (
        f"skipped the similarity product {fusion.name!r} ({f} against {g}, every sample of one "
        "set against every sample of the other): RegBN normalises one sample's modalities "
        "against each other, row by row, and a similarity matrix is no such fusion. To "
        f"normalise the per-sample features anyway, pair them: pairs=[({f!r}, {g!r})] (then "
        "every call, eval too, needs the two sets paired sample by sample, in equal numbers)."
    )


def split_by_projection(
    fusions: list[Fusion], max_projection_bytes: int | None = None, projection: str = "full"
) -> tuple[list[Fusion], list[str]]:
    """The fusions whose RegBN W fits ``max_projection_bytes`` (default: the layer's), and a
    message for each one that does not (see `auto_pairs`)."""
    limit = DEFAULT_MAX_PROJECTION_BYTES if max_projection_bytes is None else max_projection_bytes
    kept: list[Fusion] = []
    skipped: list[str] = []
    for fusion in fusions:
        nbytes = _projection_bytes(fusion, projection)
        if nbytes is not None and nbytes > limit:
            skipped.append(_skip_message(fusion, nbytes, limit, projection))
        else:
            kept.append(fusion)
    return kept, skipped


def _node_name(name: str) -> str:
    # Names from find_fusions may carry a prefix already; bare ones are fx node names.
    return name if name.partition(":")[0] in ("input", "module", "node") else f"node:{name}"


def _features(shape: tuple[int, ...], projection: str) -> int:
    return shape[1] if projection == "channel" else math.prod(shape[1:])


def _projection_bytes(fusion: Fusion, projection: str) -> int | None:
    f, g = fusion.pair_shapes
    if f is None or g is None or len(f) < 2 or len(g) < 2:
        return None
    return _features(f, projection) * _features(g, projection) * fusion.pair_itemsize


def _skip_message(fusion: Fusion, nbytes: int, limit: int, projection: str) -> str:
    f_shape, g_shape = fusion.pair_shapes
    if f_shape is None or g_shape is None:  # nbytes was computed from both shapes
        raise AssertionError(f"fusion {fusion.name!r} has no pair shapes")
    df, dg = _features(f_shape, projection), _features(g_shape, projection)
    exprs = dict(fusion.expressions)
    what = ", ".join(exprs.get(n, n) for n in fusion.pair)
    text = (
        f"pairs='auto' skipped fusion {fusion.name!r} [{fusion.kind}]: a RegBN layer on "
        f"{fusion.pair!r} ({what}; shapes {tuple(f_shape)} and {tuple(g_shape)}) would hold a W of "
        f"Df·Dg·{fusion.pair_itemsize} = {df}·{dg}·{fusion.pair_itemsize} bytes "
        f"({nbytes / 2**20:.1f} MiB), more than max_projection_bytes={limit} "
        f"({limit / 2**20:.1f} MiB)."
    )
    better = _smaller_pair(fusion, (f_shape, g_shape), limit)
    if better is not None:
        where = [f"{n} = {exprs[n]}" for n in better if n in exprs]
        text += f" Pair pooled or CLS features instead, e.g. pairs=[{better!r}]"
        text += f" ({', '.join(where)})," if where else ","
    else:
        sides = [
            repr(name) for name, side in zip(fusion.pair, fusion.pooled, strict=True) if not side
        ]
        text += (
            f" No pooled tensor of the branch of {' or '.join(sides)} was found: pool it first "
            "(x.mean(1) or the CLS token x[:, 0]) and pair that,"
        )
    return text + " or raise max_projection_bytes."


def _smaller_pair(
    fusion: Fusion, shapes: tuple[tuple[int, ...], tuple[int, ...]], limit: int
) -> tuple[str, str] | None:
    """The pair of pooled/CLS tensors with the largest W that fits ``limit``; pooled on both
    sides where possible, else one side pooled and the other kept (``shapes``: the pair's)."""
    f_kept = (fusion.pair[0], shapes[0])
    g_kept = (fusion.pair[1], shapes[1])
    for f_options, g_options in (
        (fusion.pooled[0], fusion.pooled[1]),
        ((f_kept, *fusion.pooled[0]), (g_kept, *fusion.pooled[1])),
    ):
        best: tuple[int, tuple[str, str]] | None = None
        for f_name, f_shape in f_options:
            for g_name, g_shape in g_options:
                size = math.prod(f_shape[1:]) * math.prod(g_shape[1:]) * fusion.pair_itemsize
                if size <= limit and (best is None or size > best[0]):
                    best = (size, (f_name, g_name))
        if best is not None:
            return best[1]
    return None
