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
import inspect
import operator
import warnings
from typing import Any

import torch.fx as fx
from torch import nn

from ...errors import RegBNTypeError, RegBNValueError, RegBNWarning, public
from ...layer import RegBN
from ..analysis import Analysis, analyse, auto_pairs, capture_options, trace_options
from ..modality.fusions import Fusion
from ..modality.inputs import input_labels
from ..names import is_ambiguous, resolve_name
from ..shapes.propagate import ShapeFailure
from ..shapes.record import is_integral, tensor_record
from ..shapes.verify import python_state, restore_python_state, verify_training
from ..shapes.verify import verify as verify_graphs
from ..tracing.capture import TraceError, is_regbn, same_trace, trace_graph
from ..tracing.mode_graph import ModeGraphModule, in_mode
from ..tracing.module_state import carry_missing_state
from ..tracing.patched import added_names, build_patched, is_patched, unpatched
from .checks import check_regbn_kwargs, unwrapped, var_args_hint, warn_existing_layers
from .dependence import check_dependence_args, keep_dependent
from .modes import eval_plans, mode_result, warn_mixed_modes
from .plan import Plan, build_layers, check_order, normalise_pairs, resolve_pairs
from .splice import finish, next_layer_index, reorder_topologically, splice, without_layers

# The steps of insert live in their own modules: its argument checks (insert_checks), the pairs
# resolved and checked (pair_plan), the graph edits (splice), the handling of training and
# eval mode (insert_modes) and the pairs kept by their measured dependence (insert_dependence).
__all__ = ["insert", "remove", "resolve_name", "is_ambiguous"]

# Names of the RegBN submodules insert added: in gm.meta (kept by deepcopy) and as an attribute of
# the same name (kept by pickle, which rebuilds meta empty).
ADDED = "regbn_inserted"


class _TrainingCheck:
    """insert's training-mode check, run where the analysis propagates real shapes: its graph
    side records them, so a checked insert runs the graph once less (`verify_training`)."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model, self.example_inputs = model, example_inputs
        self.output: Any = None

    def __call__(self, gm: fx.GraphModule) -> ShapeFailure | None:
        self.output, failure = verify_training(self.model, gm, self.example_inputs)
        return failure


def _analyse(
    model: nn.Module,
    example_inputs: Any,
    options: dict,
    mode: str,
    check: _TrainingCheck | None = None,
) -> Analysis:
    """`analyse` for insert: a shape failure, or an input error of a ``forward(*args)`` model
    (with how to patch one), is refused."""
    try:
        result = analyse(model, example_inputs, shapes=check, compare=False, **options)
    except TraceError:
        raise
    except ValueError as e:
        hint = var_args_hint(model, example_inputs)
        if not hint:
            raise
        raise RegBNValueError(f"{e}{hint}") from e  # `public` names regbn.insert
    if result.failure is not None:
        raise RegBNValueError(
            f"cannot infer RegBN dims{mode}, {result.failure}. Check example_inputs/"
            "input_shapes against the model's forward, or run regbn.inspect(model, ...) to see "
            f"the shapes up to that node{var_args_hint(model, example_inputs)}"
        )
    return result


def _analyse_modes(
    model: nn.Module, example_inputs: Any, options: dict, check: _TrainingCheck | None = None
) -> tuple[Analysis, Analysis | None]:
    """The analysis of the training graph, and of the eval graph where it differs."""
    tracing = capture_options(model, example_inputs, options)
    with in_mode(model, True):
        train = _analyse(model, example_inputs, options, "", check)
    with in_mode(model, False):
        # The graph alone: no GraphModule (no code compiled) unless eval mode needs its own.
        traced = trace_graph(model, **tracing)
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
        gm=analysis.gm,
    )
    for message in skipped:
        warnings.warn(message, RegBNWarning, stacklevel=1)
    return pairs


# Over 60 lines only by its docstring, which documents the public API; the body is ~50.
@public
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
    verify: bool = True,
    batches: Any = None,
    min_dependence: float | None = None,
    **regbn_kwargs: Any,
) -> nn.Module:
    """Return ``model`` with a `regbn.RegBN` layer spliced in per pair.

    The result is an object of the model's own class (see docs/surgery.md, "What insert
    returns"). It shares the model's parameters and buffers (``copy=True`` for an independent
    copy), keeps every ``state_dict`` key, and has the model's training mode;
    ``train()``/``eval()`` give the model's behaviour in that mode, with the layers (see the
    module docstring). A ``torch.compile`` d or ``(Distributed)DataParallel`` model is patched
    through the module it wraps, with a warning: wrap the result again. The model itself is
    never modified; nothing is touched unless every pair is valid.

    Args:
        model: the ``nn.Module`` to patch (or an already traced ``GraphModule``).
        pairs: a list of ``(f, g)`` names, "normalise f with respect to g", applied in order
            (a tensor normalised by an earlier pair enters later pairs normalised), or
            ``"auto"``: one layer per pair of `find_fusions` (a fusion's first tensor operand
            normalised with respect to its second; with three or more branches, every earlier
            branch with respect to every later one; similarity products skipped). A name is an
            input (``"gray"``, ``"batch['audio']"``), a dotted module path (the output of that
            call), or an fx node name of the training-mode graph (as `regbn.inspect` lists
            them); prefix ``input:``, ``module:`` or ``node:`` to pick one when a name is
            ambiguous.
        example_inputs: real inputs (a tuple, a dict of keyword arguments, possibly holding
            dicts of tensors) that the shapes come from.
        input_shapes: shapes instead of ``example_inputs`` (fake tensors; no memory).
        input_dtypes: dtypes for ``input_shapes`` (e.g. ``torch.int64`` for token ids).
        modalities: groups inputs into modalities for ``pairs="auto"``, as in `find_fusions`.
        concrete_args: tracing option, as in torch.fx.
        leaf_modules: module classes or dotted paths to keep as one call.
        autowrap_functions: functions to keep as one call.
        copy: patch an independent copy of the model's parameters and buffers.
        verify: check the traced graph against the model (outputs, dtypes, gradients, buffer
            updates, in training and eval mode) before splicing.
        batches: a few batches, each like ``example_inputs``, to measure the dependence on
            (with ``min_dependence``).
        min_dependence: insert only where the branches depend: each pair, ``"auto"`` or
            explicit alike, is measured as `regbn.measure_dependence` measures it (on the raw
            tensors, every module in eval mode) and kept when its dependence above chance,
            ``r2 - r2_shuffled``, reaches ``min_dependence``; a ``UserWarning`` names the
            pairs skipped and their numbers.
        **regbn_kwargs: passed to every layer (an unknown keyword is a ``TypeError``).

    Returns:
        The patched model. Layers are named ``regbn_0``, ``regbn_1``, ... (continuing after
        existing ones).

    Raises:
        RegBNValueError: a name that is not a tensor of the model (the message lists close
            matches), a pair whose f feeds g, dims that cannot be inferred, a failed verify
            (`regbn.fx.VerifyError`), or no pair reaching ``min_dependence``.
        RegBNTypeError: a model that is not an ``nn.Module``, or a bad argument type.
        TraceError: the model cannot be traced; names the module and the source line.

    Example:
        >>> patched = regbn.insert(model, pairs=[("gray_net.fc", "colored_net.fc")],
        ...                        example_inputs=(gray, colored))
        >>> patched = regbn.insert(model, pairs="auto", example_inputs=(gray, colored))
    """
    if not isinstance(model, nn.Module):
        raise RegBNTypeError(
            f"expects an nn.Module as model; got {type(model).__name__}"
        )
    own = [n for n in inspect.signature(insert).parameters if n != "regbn_kwargs"]
    check_regbn_kwargs(regbn_kwargs, own)
    wanted = normalise_pairs(pairs)
    check_dependence_args(batches, min_dependence)
    if example_inputs is None and input_shapes is None:
        raise RegBNValueError(
            "needs example_inputs (real tensors) or input_shapes (e.g. "
            "[(8, 1, 28, 28), (8, 3, 28, 28)]) to infer each RegBN layer's dims"
        )
    model = unwrapped(model)
    if copy:
        model = copy_module.deepcopy(model)
    saved = python_state(model)  # tracing and verifying run the model's Python
    try:
        return _insert(model, wanted, example_inputs, input_shapes, input_dtypes, verify, batches,
                       min_dependence, trace_options(locals()), regbn_kwargs)
    finally:
        restore_python_state(model, saved)


def _insert(
    model: nn.Module,
    wanted: Any,
    example_inputs: Any,
    input_shapes: Any,
    input_dtypes: Any,
    verify: bool,
    batches: Any,
    min_dependence: float | None,
    options: dict[str, Any],
    regbn_kwargs: dict[str, Any],
) -> nn.Module:
    """`insert` after its arguments are checked."""
    verify = verify and not isinstance(model, fx.GraphModule)  # a GraphModule is its graph
    check = _TrainingCheck(model, example_inputs) if verify and example_inputs is not None else None
    train, ev = _analyse_modes(model, example_inputs, options, check)
    output = None
    if check is not None:  # training mode was checked while shapes were propagated
        verify_graphs(model, {False: (ev or train).gm}, example_inputs)
        output = check.output
    elif verify:
        output = verify_graphs(
            model,
            {True: train.gm, False: (ev or train).gm},
            example_inputs,
            input_shapes=input_shapes,
            input_dtypes=input_dtypes,
        )
    if isinstance(wanted, str):  # "auto", the only string normalise_pairs returns
        wanted = _auto_pairs(train, regbn_kwargs)
    warn_existing_layers(model)  # once there is something to insert
    plans = resolve_pairs(train.gm, wanted, model)
    _warn_similarity_pairs(plans, train.fusions)
    if regbn_kwargs.get("projection", "full") == "full":
        _warn_sequence_dims(plans, train.gm)
    if min_dependence is not None:  # each pair's own checks first, in insert's words
        plans = keep_dependent(train.gm, plans, batches, min_dependence, model)
    check_order(plans, train.graph)  # on the pairs kept: a dropped pair is not spliced
    per_mode = [(train.gm, plans)]
    if ev is not None:
        ev_plans = eval_plans(plans, train.gm, ev.gm)
        check_order(ev_plans, ev.graph, " (eval-mode graph)")
        per_mode.append((ev.gm, ev_plans))
        warn_mixed_modes(model, train.gm, ev.gm)
    layers = build_layers(plans, regbn_kwargs)  # may raise: still before any edit
    names = _splice_layers(per_mode, layers, model.training)
    _warn_new_parameters(layers, names)
    added = [*added_layers(model), *names]
    if isinstance(model, fx.GraphModule):  # a graph traced by the user stays a GraphModule
        out = mode_result(model, train.gm, ev.gm if ev else None)
        _record(out, added)
        return out
    return build_patched(model, {True: train.gm, False: (ev or train).gm}, added, output)


def _warn_similarity_pairs(plans: list[Plan], fusions: list[Fusion]) -> None:
    """A pair of the two sets a similarity product compares works, but only on paired sets."""
    sets = {fu.name: set(fu.pair_nodes or fu.pair) for fu in fusions if fu.kind == "similarity"}
    for plan in plans:
        i = plan.index
        for name, nodes in sets.items():
            if {plan.f.name, plan.g.name} == nodes:
                warnings.warn(
                    f"pair {i}: ({plan.f_name!r}, {plan.g_name!r}) are the two sets "
                    f"the similarity product {name!r} compares; RegBN normalises them row by "
                    "row, so every call of the patched model, eval included, needs the two sets "
                    "paired sample by sample, in equal numbers (zero-shot calls with other "
                    "counts are refused)",
                    RegBNWarning,
                    stacklevel=1,
                )


def _warn_sequence_dims(plans: list[Plan], gm: fx.GraphModule) -> None:
    """A full W is sized by every dim of its tensors: a token dimension (as long as a token-id
    input of the same modality) fixes the layer to the example's sequence length."""
    labels = input_labels(gm)
    ids = {}
    for node in gm.graph.nodes:
        shape = tensor_record(node).shape
        if node.name in labels and shape and len(shape) >= 2 and is_integral(node):
            ids[labels[node.name]] = set(shape[1:])
    for plan in plans:
        i = plan.index
        for node, name in ((plan.f, plan.f_name), (plan.g, plan.g_name)):
            shape = tensor_record(node).shape or ()
            mods = node.meta.get("regbn_modalities", ())
            lengths = set().union(*(ids.get(m, set()) for m in mods))
            token_dims = [d for d in shape[1:-1] if d in lengths]
            if len(shape) >= 3 and token_dims:
                warnings.warn(
                    f"pair {i}: {name!r} has shape {tuple(shape)}, whose dimension "
                    f"{token_dims[0]} is the sequence length of its token ids; the layer's W is "
                    "sized by it, so batches of another length are refused. Pair pooled or CLS "
                    "tensors of the same branches instead (regbn.inspect lists them), or pad "
                    "every batch to this length",
                    RegBNWarning,
                    stacklevel=1,
                )


def _warn_new_parameters(layers: list[RegBN], names: list[str]) -> None:
    """RegBN's own parameters (``affine=True``) are new: an optimizer built before insert does
    not hold them."""
    names = [n for n, layer in zip(names, layers, strict=True) if list(layer.parameters())]
    if names:
        warnings.warn(
            f"the new layers {names} have learnable parameters (affine=True), which an "
            "optimizer built before insert does not hold. The model's own parameters keep their "
            "order, so its optimizer state still fits them; add the layers' as a group: "
            "optimizer.add_param_group({'params': [p for n, p in patched.named_parameters() "
            "if n.startswith('regbn_')]})",
            RegBNWarning,
            stacklevel=1,
        )


def _splice_layers(
    per_mode: list[tuple[fx.GraphModule, list[Plan]]], layers: list[RegBN], training: bool
) -> list[str]:
    """Splice ``layers`` into the graph of every mode (one module object for all graphs, so the
    state_dict keys are shared); returns their names."""
    for layer in layers:
        layer.train(training)
    start = next_layer_index(per_mode[0][0])
    names = [f"regbn_{start + i}" for i in range(len(layers))]
    for gm, mode_plans in per_mode:
        for plan, layer in zip(mode_plans, layers, strict=True):
            plan.layer = layer
        splice(gm, mode_plans, names)
        reorder_topologically(gm)
        finish(gm)
    return names


def added_layers(model: nn.Module) -> list[str]:
    """Names of the RegBN submodules `insert` added to ``model`` (``[]`` for any other model)."""
    if is_patched(model):
        return added_names(model)
    meta = getattr(model, "meta", None)
    found = meta.get(ADDED) if isinstance(meta, dict) else None
    return list(found if found is not None else getattr(model, ADDED, ()))


def _record(gm: fx.GraphModule, names: list[str]) -> None:
    """Record ``names`` as the layers insert added to ``gm`` (see ``ADDED``)."""
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


def _warn_kept(patched: nn.Module, names: set[str]) -> None:
    kept = [p for p, m in patched.named_modules() if isinstance(m, RegBN) and p not in names]
    if kept:
        warnings.warn(
            f"regbn.remove: kept the RegBN layers {kept}, which regbn.insert did not add (the "
            "model had them before); delete them by hand if they should go",
            RegBNWarning,
            stacklevel=1,
        )


@public
def remove(patched: nn.Module) -> nn.Module:
    """Return ``patched`` without the RegBN layers `insert` added.

    Uses of each layer's outputs read the layer's inputs again, and those ``regbn_*``
    submodules are gone. ``patched`` itself is not modified; the result shares its other
    modules and tensors and, for a `ModeGraphModule`, keeps one graph per mode.

    Args:
        patched: a model returned by `regbn.insert`.

    Returns:
        The model without the added layers: an object of the model's class that runs the
        model's own ``forward``. RegBN layers the model had before `insert` stay, with a
        ``UserWarning`` naming them.

    Raises:
        RegBNTypeError: ``patched`` is not an ``nn.Module``.

    Example:
        >>> patched = regbn.insert(model, pairs="auto", example_inputs=(gray, colored))
        >>> original = regbn.remove(patched)
    """
    if is_patched(patched):
        _warn_kept(patched, set(added_names(patched)))
        return unpatched(patched)
    if not isinstance(patched, fx.GraphModule):
        raise RegBNTypeError(
            "regbn.remove: expects a model returned by regbn.insert; got "
            f"{type(patched).__name__}, which regbn.insert did not make"
        )
    graphs = patched.mode_graphs if isinstance(patched, ModeGraphModule) else {None: patched.graph}
    names = {str(n.target) for g in graphs.values() for n in _recorded_layers(patched, g)}
    _warn_kept(patched, names)
    edited = {mode: without_layers(g, names) for mode, g in graphs.items()}
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
