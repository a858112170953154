"""How much of f does g explain? Cross-modal dependence measured at a model's fusions.

The official README (mogvision/regbn) gives one rule for placing RegBN (NeurIPS 2023): it "can be
employed as long as its inputs are not mutually independent". `measure_dependence` checks that
rule on data: it runs the model on the user's batches, records the two tensors of each pair (by
default one pair per fusion, as ``regbn.insert(..., pairs="auto")`` would choose) and reports
the share of f's variance that g explains linearly. `dependence_of` does the same for two
tensors, with no model.

The measure. Over the N pooled samples, F (N×Df) and G (N×Dg) are f and g flattened per sample,
each feature standardised (zero mean, unit variance; a constant feature stays zero), as the
layer's input normalisation does in training. Then

* ``r2``: 1 − ||F − G G⁺ F||² / ||F||², least squares (λ = 0);
* ``r2_at_lambda``: the same at RegBN's W(λ⁺) = (GᵀG + λ⁺I)⁻¹GᵀF, λ⁺ solved exactly on the
  pooled batch by `regbn.solver` under ``lambda_rule`` (what one layer's batch would remove);
* ``r2_shuffled``: ``r2`` with g's rows permuted across samples (seeded, ``permutations``
  draws averaged), the chance level. A wide g explains anything at small N: for independent
  data ``r2`` ≈ rank(G)/N, and it reaches 1 when rank(G) = N − 1;
* ``above_chance`` = ``r2 − r2_shuffled``: the dependence that is really there.

One factorisation of G serves every number: a row permutation P of G permutes its left singular
vectors, so the shuffled R² is ||Uᵀ Pᵀ F||² / ||F||² with the same U.

Where else it runs, on the graph those tools trace anyway (nothing is traced twice):

* ``regbn.inspect(model, ..., batches=...)`` measures the pair of each open fusion
  (`pairs_of_fusions`) and shows it in every view (`regbn.fx.report_dependence`);
* ``regbn.insert(model, pairs, ..., batches=..., min_dependence=x)`` keeps the pairs whose
  ``above_chance`` reaches x and warns which were skipped (`regbn.fx.insert_dependence`);
* ``regbn inspect ... --measure N`` (random batches of the ``--input`` shapes: they measure the
  architecture, not the data) or ``--batches FILE`` (a ``torch.save``'d list of input tuples).

`measure_graph` takes a ``GraphModule`` as `regbn.fx.analysis.analyse` returns it and pairs as
names or nodes of its graph. `DependenceMeter` is the same with batches added over several
calls.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..._progress import progress_bar
from ...errors import (
    RegBNError,
    RegBNTypeError,
    RegBNValueError,
    RegBNWarning,
    context,
    current_entry,
    public,
)
from ..analysis import Analysis, analyse, split_by_projection, trace_options
from ..modality.fusions import Fusion
from ..names import resolve_name
from ..shapes.inputs import arrange_inputs, copy_containers, split_inputs
from ..shapes.propagate import ThawingInterpreter
from ..tracing.capture import in_mode, unwrap
from .core import (
    DEFAULT_MAX_SAMPLES,
    DEFAULT_PERMUTATIONS,
    DependenceReport,
    DependenceRow,
    _check_options,
    check_batch,
    check_batches,
    dependence_of,
    pairs_argument,
)

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "DependenceMeter",
    "DependenceReport",
    "DependenceRow",
    "dependence_of",
    "measure_dependence",
    "measure_fusions",
    "measure_graph",
    "pairs_of_fusions",
]



# ----------------------------------------------------------------------------- recording


class _Stop(Exception):
    """Raised once every wanted tensor of a batch is recorded: the rest of the model is not run."""


class _Recorder(ThawingInterpreter):
    """Runs a traced model and keeps the values of ``wanted`` nodes."""

    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
            if len(self.values) == len(self.wanted):
                raise _Stop
        return result



def _arrange(gm: fx.GraphModule, batch: Any, index: int) -> list[Any]:
    """One batch as the traced forward's arguments (a tuple/list is positional, a dict by
    argument name, anything else the one argument), lined up as shape propagation lines up
    example_inputs; containers are copied (tensors shared), so a forward that updates its input
    dict leaves the caller's batch as it was."""
    positional, named = split_inputs(copy_containers(batch))
    with context(f"batch {index}"):
        return arrange_inputs(gm, positional, named)


def _features(value: Any, name: str, node: fx.Node) -> Tensor:
    if not isinstance(value, Tensor):
        raise RegBNValueError(
            f"{name!r} (node {node.name}) is a {type(value).__name__}, not a tensor; "
            "name one tensor (an entry of it, e.g. its output's [0]). Run regbn.inspect(model, "
            "...) to list them"
        )
    if not value.is_floating_point() or value.dim() == 0:
        raise RegBNValueError(
            f"{name!r} (node {node.name}) holds {value.dtype} of shape "
            f"{tuple(value.shape)}; the measure needs floating-point features shaped (batch, "
            "...), e.g. an embedding output rather than token ids"
        )
    flat = value.detach().reshape(value.shape[0], -1)
    return flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat


@dataclass
class _Pair:
    f: fx.Node
    g: fx.Node
    names: tuple[str, str]
    fusion: str | None
    f_parts: list[Tensor] = field(default_factory=list)
    g_parts: list[Tensor] = field(default_factory=list)


class DependenceMeter:
    """Pools the pairs' tensors over batches (first ``max_samples`` samples), then measures.

    ``gm`` is a traced model (as `regbn.fx.analysis.analyse` returns it); ``pairs`` are
    ``(f, g)`` names (input, module path or node name, as `regbn.insert` takes them) or nodes
    of its graph; ``fusions`` optionally names the fusion of each pair. The model runs in eval
    mode under ``torch.no_grad()``, and only up to the last node a pair needs; every module's
    training flag is restored afterwards. Samples past ``max_samples`` are not used (first-N,
    so a loader need not be exhausted; shuffle it when its order matters).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        pairs: Sequence[tuple[str | fx.Node, str | fx.Node]],
        *,
        fusions: Sequence[str | None] | None = None,
        model: nn.Module | None = None,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        permutations: int = DEFAULT_PERMUTATIONS,
        seed: int = 0,
        lambda_rule: str = "paper",
        skipped: Sequence[str] = (),
    ) -> None:
        _check_options(lambda_rule, permutations)
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
            raise RegBNValueError(
                f"max_samples must be an int >= 2 (the pooled samples kept); got "
                f"{max_samples!r}"
            )
        self.gm, self.max_samples, self.permutations = gm, max_samples, permutations
        self.seed, self.lambda_rule, self.skipped = seed, lambda_rule, tuple(skipped)
        self.n_samples = 0
        self._pairs: list[_Pair] = []
        names = list(fusions) if fusions is not None else [None] * len(pairs)
        for i, ((f, g), fusion) in enumerate(zip(pairs, names, strict=True)):
            with context(f"pair {i}"):
                nodes = [x if isinstance(x, fx.Node) else resolve_name(self.gm, x, model)
                         for x in (f, g)]
            if nodes[0] is nodes[1]:
                raise RegBNValueError(
                    f"pair {i}: f and g are the same tensor (node {nodes[0].name}); name two "
                    "tensors from different branches"
                )
            label = tuple(x.name if isinstance(x, fx.Node) else x for x in (f, g))
            self._pairs.append(_Pair(nodes[0], nodes[1], (label[0], label[1]), fusion))

    @property
    def full(self) -> bool:
        return self.n_samples >= self.max_samples

    def update(
        self, batches: Iterable[Any], progress: bool = False, total: int | None = None
    ) -> DependenceMeter:
        """Run the model on ``batches`` (an iterable of batches) and pool the pairs' tensors;
        ``progress`` shows a bar of the batches run (tqdm, when installed), out of ``total``
        (default: ``len(batches)`` where it has one)."""
        if total is None and isinstance(batches, Sized):
            total = len(batches)
        batches = check_batches(batches)
        wanted = {n for p in self._pairs for n in (p.f, p.g)}
        bar = progress_bar(total, f"{current_entry()}: batches", "batch", progress)
        try:
            with in_mode(self.gm, False), torch.no_grad():
                for i, batch in enumerate(batches):
                    if self.full:
                        break
                    self._record(self._run(batch, i, wanted), i)
                    bar.update(1)
        finally:
            bar.close()
        return self

    def _run(self, batch: Any, index: int, wanted: set[fx.Node]) -> dict[fx.Node, Any]:
        check_batch(batch, index)
        args = _arrange(self.gm, batch, index)
        recorder = _Recorder(self.gm, wanted)
        try:
            recorder.run(*args)
        except _Stop:
            pass
        except Exception as e:
            text = str(e).split("\n")[0]
            raise RegBNValueError(
                f"batch {index}: the model failed on it ({type(e).__name__}: {text}). "
                "Each batch must be valid input of the model's forward, like example_inputs"
            ) from e
        return recorder.values

    def _record(self, values: dict[fx.Node, Any], index: int) -> None:
        room = self.max_samples - self.n_samples
        taken = None
        for pair in self._pairs:
            f = _features(values[pair.f], pair.names[0], pair.f)
            g = _features(values[pair.g], pair.names[1], pair.g)
            if f.shape[0] != g.shape[0]:
                raise RegBNValueError(
                    f"batch {index}: {pair.names[0]!r} has {f.shape[0]} samples and "
                    f"{pair.names[1]!r} {g.shape[0]}; the measure pairs samples, so pair tensors "
                    "that share the batch dimension"
                )
            if taken is not None and f.shape[0] != taken[0]:
                raise RegBNValueError(
                    f"batch {index}: the pairs' tensors hold different sample counts "
                    f"({taken[0]} and {f.shape[0]}); measure them in separate calls"
                )
            taken = (f.shape[0],)
            pair.f_parts.append(f[:room].cpu())
            pair.g_parts.append(g[:room].cpu())
        if taken is not None:
            self.n_samples += min(taken[0], room)

    def report(self) -> DependenceReport:
        """Measure every pair on the samples pooled so far."""
        if self.n_samples < 2:
            raise RegBNValueError(
                f"{self.n_samples} samples pooled; the measure needs at least 2 (and "
                "far more than g has features). Pass more batches"
            )
        rows = [
            dependence_of(
                torch.cat(p.f_parts),
                torch.cat(p.g_parts),
                lambda_rule=self.lambda_rule,
                permutations=self.permutations,
                seed=self.seed,
                pair=p.names,
                fusion=p.fusion,
            )
            for p in self._pairs
        ]
        return DependenceReport(
            tuple(rows),
            self.lambda_rule,
            self.permutations,
            self.seed,
            self.max_samples,
            self.skipped,
        )


def pairs_of_fusions(
    fusions: Sequence[Fusion], max_projection_bytes: int | None = None, projection: str = "full"
) -> tuple[list[tuple[str, str]], list[str | None], list[str]]:
    """The pairs ``pairs="auto"`` measures: (pairs, the fusion of each, skipped messages).

    One pair per fusion, as `regbn.insert` chooses it (a pair already taken is not repeated),
    and a message per fusion whose RegBN W would pass ``max_projection_bytes``.
    """
    kept, skipped = split_by_projection(list(fusions), max_projection_bytes, projection)
    pairs: list[tuple[str, str]] = []
    names: list[str | None] = []
    seen: set[tuple[str, str]] = set()
    for fusion in kept:
        nodes = fusion.pair_nodes or fusion.pair
        if nodes not in seen:
            seen.add(nodes)
            pairs.append(fusion.pair)  # spelled as insert takes it: a module path where it can
            names.append(fusion.name)
    return pairs, names, skipped


def measure_graph(
    gm: fx.GraphModule,
    pairs: Sequence[tuple[str | fx.Node, str | fx.Node]],
    batches: Iterable[Any],
    *,
    progress: bool = False,
    **options: Any,
) -> DependenceReport:
    """`DependenceMeter` ``(gm, pairs, **options)`` over ``batches``, reported: for callers
    that have traced and analysed the model already (``inspect``, ``insert``)."""
    return DependenceMeter(gm, pairs, **options).update(batches, progress).report()


# ----------------------------------------------------------------------------- public API


@public
def measure_dependence(
    model: nn.Module,
    batches: Iterable[Any],
    pairs: Any = "auto",
    *,
    modalities: dict[str, Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Any = None,
    autowrap_functions: Any = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    lambda_rule: str = "paper",
    max_projection_bytes: int | None = None,
    progress: bool = True,
) -> DependenceReport:
    """How much of f does g explain, at each fusion of ``model`` (or each named pair)?

    The model runs in eval mode under ``no_grad`` on the first ``max_samples`` samples; its
    parameters, buffers and training flags are left as they were. See the module docstring
    for the numbers.

    Args:
        model: the ``nn.Module`` to measure.
        batches: an iterable of batches, each like ``example_inputs`` (a tuple of input
            tensors, a dict of keyword inputs, or one tensor).
        pairs: ``"auto"`` (one pair per fusion, as ``regbn.insert(..., pairs="auto")`` would
            choose) or a list of ``(f, g)`` names as `regbn.insert` takes them, resolved in
            the eval-mode graph.
        modalities: groups inputs for ``pairs="auto"``.
        concrete_args: tracing option, as in `regbn.insert`.
        leaf_modules: tracing option, as in `regbn.insert`.
        autowrap_functions: tracing option, as in `regbn.insert`.
        max_samples: the samples measured, from the first batches.
        permutations: shuffles for the chance baseline.
        seed: seeds the shuffles (the global random state is not touched).
        lambda_rule: the layer's rule for λ⁺, ``"paper"`` or ``"official"``.
        max_projection_bytes: with ``pairs="auto"``, leave out a fusion whose W would pass
            it (None: the layer's default).
        progress: show a bar of the batches run (tqdm, when installed).

    Returns:
        A `DependenceReport`: one `DependenceRow` per pair.

    Raises:
        RegBNValueError: no batch, a batch unlike the model's inputs, an unknown name, or a
            bad option value.
        RegBNTypeError: an argument of the wrong type.
        TraceError: the model cannot be traced.

    Example:
        >>> report = regbn.measure_dependence(model, batches=[(gray, colored)])
        >>> print(report)
    """
    if not isinstance(model, nn.Module):
        raise RegBNTypeError(f"model must be an nn.Module; got {type(model).__name__}")
    model, _ = unwrap(model)
    total = len(batches) if isinstance(batches, Sized) else None
    it = check_batches(batches)
    first = next(it, None)
    if first is None:
        raise RegBNValueError(
            "batches is empty; pass at least one batch, e.g. batches=[(x1, x2)]"
        )
    check_batch(first, 0)
    wanted = pairs_argument(pairs)
    tracing = trace_options(locals())
    with in_mode(model, False):
        analysis = _analysis(model, first, tracing)
        fusions: list[str | None] | None = None
        skipped: list[str] = []
        if isinstance(wanted, str):  # "auto"
            chosen, fusions, skipped = _auto(analysis.fusions, max_projection_bytes)
        else:
            chosen = wanted
        meter = DependenceMeter(
            analysis.gm,
            chosen,
            fusions=fusions,
            model=model,
            max_samples=max_samples,
            permutations=permutations,
            seed=seed,
            lambda_rule=lambda_rule,
            skipped=skipped,
        )
        meter.update(_chain(first, it), progress, total)
    return meter.report()


def _analysis(model: nn.Module, first: Any, tracing: dict[str, Any]) -> Analysis:
    """`analyse` on the first batch (eval mode is the caller's), errors in this API's words."""
    try:
        analysis = analyse(model, first, **tracing)
    except RegBNError:
        raise
    except ValueError as e:  # a model's own refusal of the batch, in regbn's class
        raise RegBNValueError(str(e)) from e
    if analysis.failure is not None:
        raise RegBNValueError(
            f"the model failed on batch 0, {analysis.failure}. Each batch must be "
            "valid input of the model's forward"
        )
    return analysis


def _auto(
    fusions: list[Fusion], max_projection_bytes: int | None
) -> tuple[list[tuple[str, str]], list[str | None], list[str]]:
    """`pairs_of_fusions`, with a warning per skipped fusion and an error when none is left."""
    chosen, names, skipped = pairs_of_fusions(fusions, max_projection_bytes)
    for message in skipped:
        warnings.warn(message, RegBNWarning, stacklevel=1)
    if not chosen:
        raise RegBNValueError(
            "pairs='auto' found no fusion to measure (no node whose tensor operands "
            "come from disjoint sets of inputs" + ("; every one was skipped" if skipped else "")
            + "). Name the pairs explicitly; run regbn.inspect(model, ...) to list the tensors"
        )
    return chosen, names, skipped


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def measure_fusions(
    gm: fx.GraphModule,
    fusions: Sequence[Fusion],
    batches: Iterable[Any],
    model: nn.Module,
    progress: bool = True,
) -> DependenceReport:
    """The dependence at each of ``fusions`` (those not at an inserted RegBN layer), measured
    on ``batches`` through ``gm``, the report's traced graph; a fusion whose RegBN W would pass
    the layer's ``max_projection_bytes`` is left out, as ``pairs="auto"`` leaves it out."""
    pairs, names, skipped = pairs_of_fusions(fusions)
    if not pairs:
        # Still run the batches' checks, so a bad argument is refused with or without fusions.
        list(_checked(batches))
        return DependenceReport((), skipped=tuple(skipped))
    report = measure_graph(gm, pairs, batches, progress=progress, fusions=names, model=model)
    return DependenceReport(
        report.rows,
        report.lambda_rule,
        report.permutations,
        report.seed,
        report.max_samples,
        tuple(skipped),
    )


def _checked(batches: Iterable[Any]) -> Iterable[Any]:
    for i, batch in enumerate(check_batches(batches)):
        check_batch(batch, i)
        yield batch
