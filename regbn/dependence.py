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

How it plugs into the rest of regbn (for ``inspect``, ``insert`` and the command line):

* ``regbn.inspect(model, ..., batches=...)``: analyse as now, then call
  ``measure_graph(analysis.gm, pairs, batches)`` with ``pairs = pairs_of_fusions(fusions)``
  (the trace, the shapes and the names are those of the analysis; nothing is traced twice) and
  show each fusion's row (``report.row_for(fusion.name)``) beside it.
* ``regbn.insert(model, pairs, ..., batches=..., min_dependence=x)``: after pairs are resolved
  (``"auto"`` or explicit), measure them on the training graph with `measure_graph`, keep the
  pairs whose ``above_chance >= x`` and warn, once, which were skipped and their numbers
  (``row.summary()``); with no pair left, refuse as ``pairs="auto"`` does with no fusion.
* CLI ``regbn inspect ... --measure N``: N random batches of the ``--input`` shapes (random
  inputs measure what the architecture does to unrelated inputs, not the data; say so in the
  output), and ``--batches FILE``: a ``torch.save``'d list of input tuples (or dicts), passed
  as ``batches``.

`measure_graph` takes a ``GraphModule`` as `regbn.fx.analysis.analyse` returns it and pairs as
names or nodes of its graph. `DependenceMeter` is the same with batches added over several
calls.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from .errors import RegBNTypeError, RegBNValueError
from .fx.analysis import analyse, split_by_projection
from .fx.modality import Fusion
from .fx.names import resolve_name
from .fx.shapes import _arrange_inputs, _copy_containers, _split, _thaw
from .fx.tracing import TraceError, in_mode, unwrap
from .solver import LAMBDA_RULES, Spectrum, batch_spectrum, residual, solve_lambda

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "DependenceMeter",
    "DependenceReport",
    "DependenceRow",
    "dependence_of",
    "measure_dependence",
    "measure_graph",
    "pairs_of_fusions",
]

WHERE = "regbn.measure_dependence"
DEFAULT_MAX_SAMPLES = 4096
DEFAULT_PERMUTATIONS = 5


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DependenceRow:
    """The dependence of f on g for one pair (see the module docstring for each number).

    ``pair``: the names (f, g); ``fusion``: the fusion node the pair came from (``None`` for an
    explicit pair); ``rank``: the rank of the standardised G; ``lam``: λ⁺ on the pooled batch;
    ``f_features``, ``g_features``: Df and Dg.
    """

    pair: tuple[str, str]
    r2: float
    r2_at_lambda: float
    r2_shuffled: float
    n_samples: int
    rank: int
    lam: float
    f_features: int
    g_features: int
    fusion: str | None = None

    @property
    def above_chance(self) -> float:
        """``r2 − r2_shuffled``: what g explains of f beyond what any g of its rank would."""
        return self.r2 - self.r2_shuffled

    @property
    def saturated(self) -> bool:
        """True when G spans every centred direction (rank ≥ N − 1): ``r2`` is 1 whatever the
        data, and only more samples (or a smaller g, e.g. pooled) can tell."""
        return self.rank >= self.n_samples - 1

    def summary(self) -> str:
        """One line: ``'a' by 'b': r2 0.912 (chance 0.031, above 0.881), N 512, rank 16``."""
        return (
            f"{self.pair[0]!r} by {self.pair[1]!r}: r2 {self.r2:.3f} (chance "
            f"{self.r2_shuffled:.3f}, above {self.above_chance:.3f}), N {self.n_samples}, "
            f"rank {self.rank}" + (" (saturated: rank >= N-1)" if self.saturated else "")
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pair"] = list(self.pair)
        out["above_chance"] = self.above_chance
        out["saturated"] = self.saturated
        return out


_HEAD = ("f", "g", "fusion", "r2", "r2 at λ⁺", "r2 shuffled", "above chance", "N", "rank", "λ⁺")


@dataclass(frozen=True)
class DependenceReport:
    """One `DependenceRow` per pair, with the settings that produced them.

    ``skipped``: a message per fusion that ``pairs="auto"`` left out (W past
    ``max_projection_bytes``, as `regbn.insert` skips it).
    """

    rows: tuple[DependenceRow, ...]
    lambda_rule: str = "paper"
    permutations: int = DEFAULT_PERMUTATIONS
    seed: int = 0
    max_samples: int = DEFAULT_MAX_SAMPLES
    skipped: tuple[str, ...] = field(default=())

    def row_for(self, name: str) -> DependenceRow | None:
        """The row of fusion ``name``, else of the pair whose f or g is ``name``; else None."""
        for row in self.rows:
            if row.fusion == name:
                return row
        return next((row for row in self.rows if name in row.pair), None)

    def _cells(self, row: DependenceRow) -> list[str]:
        return [
            row.pair[0],
            row.pair[1],
            row.fusion or "",
            f"{row.r2:.3f}",
            f"{row.r2_at_lambda:.3f}",
            f"{row.r2_shuffled:.3f}",
            f"{row.above_chance:+.3f}",
            str(row.n_samples),
            f"{row.rank}" + ("*" if row.saturated else ""),
            f"{row.lam:.3g}",
        ]

    def _notes(self) -> list[str]:
        notes = [
            f"r2: share of f's variance g explains linearly (features standardised); shuffled: g's "
            f"rows permuted, mean of {self.permutations}; λ⁺ by the {self.lambda_rule!r} rule."
        ]
        if any(row.saturated for row in self.rows):
            notes.append(
                "*: rank(G) >= N-1, so g explains all of f at any data; measure more samples "
                "than g has features, or pair a pooled g."
            )
        return notes + list(self.skipped)

    def __str__(self) -> str:
        table = [list(_HEAD)] + [self._cells(row) for row in self.rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(_HEAD))]
        lines = [
            "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in
                      enumerate(zip(r, widths, strict=True))).rstrip()
            for r in table
        ]  # fmt: skip
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [""] + self._notes())

    def __repr__(self) -> str:
        return f"<regbn DependenceReport: {len(self.rows)} pairs, {self.lambda_rule} rule>"

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table, then the notes."""

        def cell(value: str) -> str:
            return value.replace("|", "\\|").replace("\n", " ")

        out = ["| " + " | ".join(_HEAD) + " |", "|---|---|---|" + "--:|" * (len(_HEAD) - 3)]
        for row in self.rows:
            cells = self._cells(row)
            cells[:3] = [f"`{c}`" if c else "" for c in cells[:3]]
            out.append("| " + " | ".join(cell(c) for c in cells) + " |")
        return "\n".join(out + [""] + [cell(n) for n in self._notes()])

    def _repr_html_(self) -> str:
        """A table for notebooks (every value escaped)."""
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h in _HEAD)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in self._cells(row)) + "</tr>"
            for row in self.rows
        )
        notes = "".join(f"<p>{esc(n)}</p>" for n in self._notes())
        return (
            f'<div class="regbn-dependence"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>{notes}</div>"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists, strings, numbers, None only)."""
        return {
            "rows": [row.to_dict() for row in self.rows],
            "lambda_rule": self.lambda_rule,
            "permutations": self.permutations,
            "seed": self.seed,
            "max_samples": self.max_samples,
            "skipped": list(self.skipped),
        }


# ----------------------------------------------------------------------------- the measure


def _standardise(x: Tensor) -> Tensor:
    """Each column to zero mean and unit variance over the rows; a constant column to zeros."""
    x = x - x.mean(dim=0, keepdim=True)
    std = x.square().mean(dim=0, keepdim=True).sqrt()
    return x / torch.where(std > 0, std, torch.ones_like(std))


def _explained(coeffs: Tensor, total: float) -> float:
    return float(coeffs.square().sum()) / total if total > 0 else 0.0


def _check_options(lambda_rule: str, permutations: int) -> None:
    if lambda_rule not in LAMBDA_RULES:
        raise RegBNValueError(
            f"{WHERE}: lambda_rule must be one of {LAMBDA_RULES}; got {lambda_rule!r}"
        )
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise RegBNValueError(
            f"{WHERE}: permutations must be a positive int (the shuffled baseline averages that "
            f"many draws); got {permutations!r}"
        )


def dependence_of(
    f: Tensor,
    g: Tensor,
    *,
    lambda_rule: str = "paper",
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    pair: tuple[str, str] = ("f", "g"),
    fusion: str | None = None,
) -> DependenceRow:
    """The dependence of ``f`` on ``g``: tensors of N samples each, flattened per sample.

    See the module docstring for the numbers. Computed in float64 on the tensors' device; the
    shuffled baseline draws its permutations from a ``torch.Generator`` seeded with ``seed``
    (the global random state is not touched).
    """
    for name, x in (("f", f), ("g", g)):
        if not isinstance(x, Tensor):
            raise RegBNTypeError(
                f"{WHERE}: {name} must be a torch.Tensor of N samples; got {type(x).__name__}"
            )
        if x.dim() == 0 or not (x.is_floating_point() or x.dtype == torch.bool):
            raise RegBNValueError(
                f"{WHERE}: {name} must hold floating-point features shaped (N, ...); got "
                f"{x.dtype} of shape {tuple(x.shape)}. Measure features, not token ids"
            )
    if f.shape[0] != g.shape[0]:
        raise RegBNValueError(
            f"{WHERE}: f and g must hold the same samples; f has {f.shape[0]} (shape "
            f"{tuple(f.shape)}), g has {g.shape[0]} (shape {tuple(g.shape)}). Pair tensors that "
            "share the batch dimension"
        )
    n = f.shape[0]
    if n < 2:
        raise RegBNValueError(
            f"{WHERE}: need at least 2 samples to standardise features; got {n}. Give more "
            "batches (far more samples than g has features, for a meaningful r2)"
        )
    _check_options(lambda_rule, permutations)
    F = _standardise(f.detach().reshape(n, -1).to(torch.float64))
    G = _standardise(g.detach().reshape(n, -1).to(torch.float64))
    total = float(F.square().sum())
    spec: Spectrum = batch_spectrum(F, G)
    lam = solve_lambda(spec, lambda_rule)
    r2_lam = 1.0 - float(residual(F, spec, lam).square().sum()) / total if total > 0 else 0.0
    gen = torch.Generator(device=F.device).manual_seed(seed)
    shuffled = []
    for _ in range(permutations):
        # G[perm] = P G has left singular vectors P U: its fit of F is ||Uᵀ Pᵀ F||.
        perm = torch.randperm(n, generator=gen, device=F.device)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n, device=F.device)
        shuffled.append(_explained(spec.basis.mT @ F[inverse], total))
    return DependenceRow(
        pair=(str(pair[0]), str(pair[1])),
        r2=_explained(spec.coeffs, total),
        r2_at_lambda=r2_lam,
        r2_shuffled=sum(shuffled) / len(shuffled),
        n_samples=n,
        rank=int(spec.s.numel()),
        lam=float(lam),
        f_features=F.shape[1],
        g_features=G.shape[1],
        fusion=fusion,
    )


# ----------------------------------------------------------------------------- recording


class _Stop(Exception):
    """Raised once every wanted tensor of a batch is recorded: the rest of the model is not run."""


class _Recorder(fx.Interpreter):
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

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # Plain dicts and lists, as in eager mode (see ShapeInterpreter).
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _thaw(args), _thaw(kwargs)


def _check_batch(batch: Any, index: int) -> None:
    def visit(value: Any) -> None:
        if isinstance(value, Tensor) or value is None:
            return
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        else:
            raise RegBNTypeError(
                f"{WHERE}: batch {index} holds a {type(value).__name__}, not a tensor; each "
                "batch is a tuple of input tensors (or a dict of keyword inputs, or one "
                "tensor), like example_inputs. Convert it with torch.as_tensor"
            )

    visit(batch)


def _features(value: Any, name: str, node: fx.Node) -> Tensor:
    if not isinstance(value, Tensor):
        raise RegBNValueError(
            f"{WHERE}: {name!r} (node {node.name}) is a {type(value).__name__}, not a tensor; "
            "name one tensor (an entry of it, e.g. its output's [0]). Run regbn.inspect(model, "
            "...) to list them"
        )
    if not value.is_floating_point() or value.dim() == 0:
        raise RegBNValueError(
            f"{WHERE}: {name!r} (node {node.name}) holds {value.dtype} of shape "
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
                f"{WHERE}: max_samples must be an int >= 2 (the pooled samples kept); got "
                f"{max_samples!r}"
            )
        self.gm, self.max_samples, self.permutations = gm, max_samples, permutations
        self.seed, self.lambda_rule, self.skipped = seed, lambda_rule, tuple(skipped)
        self.n_samples = 0
        self._pairs: list[_Pair] = []
        names = list(fusions) if fusions is not None else [None] * len(pairs)
        for i, ((f, g), fusion) in enumerate(zip(pairs, names, strict=True)):
            where = f"{WHERE}: pair {i}"
            nodes = [
                x if isinstance(x, fx.Node) else self._resolve(x, where, model) for x in (f, g)
            ]
            if nodes[0] is nodes[1]:
                raise RegBNValueError(
                    f"{where}: f and g are the same tensor (node {nodes[0].name}); name two "
                    "tensors from different branches"
                )
            label = tuple(x.name if isinstance(x, fx.Node) else x for x in (f, g))
            self._pairs.append(_Pair(nodes[0], nodes[1], (label[0], label[1]), fusion))

    def _resolve(self, name: str, where: str, model: nn.Module | None) -> fx.Node:
        try:
            return resolve_name(self.gm, name, where, model)
        except (ValueError, TypeError) as e:
            cls = RegBNTypeError if isinstance(e, TypeError) else RegBNValueError
            raise cls(str(e)) from e

    @property
    def full(self) -> bool:
        return self.n_samples >= self.max_samples

    def update(self, batches: Iterable[Any]) -> DependenceMeter:
        """Run the model on ``batches`` (an iterable of batches) and pool the pairs' tensors."""
        batches = _check_batches(batches)
        wanted = {n for p in self._pairs for n in (p.f, p.g)}
        with in_mode(self.gm, False), torch.no_grad():
            for i, batch in enumerate(batches):
                if self.full:
                    break
                self._record(self._run(batch, i, wanted), i)
        return self

    def _run(self, batch: Any, index: int, wanted: set[fx.Node]) -> dict[fx.Node, Any]:
        _check_batch(batch, index)
        positional, named = _split(_copy_containers(batch))
        try:
            args = _arrange_inputs(self.gm, positional, named)
        except ValueError as e:
            raise RegBNValueError(f"{WHERE}: batch {index}: {e}") from e
        recorder = _Recorder(self.gm, wanted)
        try:
            recorder.run(*args)
        except _Stop:
            pass
        except Exception as e:
            text = str(e).split("\n")[0]
            raise RegBNValueError(
                f"{WHERE}: batch {index}: the model failed on it ({type(e).__name__}: {text}). "
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
                    f"{WHERE}: batch {index}: {pair.names[0]!r} has {f.shape[0]} samples and "
                    f"{pair.names[1]!r} {g.shape[0]}; the measure pairs samples, so pair tensors "
                    "that share the batch dimension"
                )
            if taken is not None and f.shape[0] != taken[0]:
                raise RegBNValueError(
                    f"{WHERE}: batch {index}: the pairs' tensors hold different sample counts "
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
                f"{WHERE}: {self.n_samples} samples pooled; the measure needs at least 2 (and "
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


def _check_batches(batches: Any) -> Iterator[Any]:
    if isinstance(batches, (Tensor, dict)) or not isinstance(batches, Iterable):
        raise RegBNTypeError(
            f"{WHERE}: batches must be an iterable of batches (a list, a DataLoader), each a "
            f"tuple of inputs like example_inputs; got {type(batches).__name__}. For one batch "
            "write batches=[(x1, x2)]"
        )
    return iter(batches)


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
    **options: Any,
) -> DependenceReport:
    """`DependenceMeter` ``(gm, pairs, **options)`` over ``batches``, reported: for callers
    that have traced and analysed the model already (``inspect``, ``insert``)."""
    return DependenceMeter(gm, pairs, **options).update(batches).report()


# ----------------------------------------------------------------------------- public API


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
) -> DependenceReport:
    """How much of f does g explain, at each fusion of ``model`` (or each named pair)?

    ``batches``: an iterable of batches, each like ``example_inputs`` (a tuple of input
    tensors, a dict of keyword inputs, or one tensor). ``pairs``: ``"auto"`` (one pair per
    fusion, as ``regbn.insert(..., pairs="auto")`` would choose; ``modalities`` groups inputs)
    or a list of ``(f, g)`` names as `regbn.insert` takes them, resolved in the eval-mode graph.
    Tracing options are `regbn.insert`'s. The model runs in eval mode under ``no_grad`` on the
    first ``max_samples`` samples; its parameters, buffers and training flags are left as they
    were. See the module docstring for the numbers and `DependenceReport` for the result.
    """
    if not isinstance(model, nn.Module):
        raise RegBNTypeError(f"{WHERE}: model must be an nn.Module; got {type(model).__name__}")
    model, _ = unwrap(model)
    it = _check_batches(batches)
    first = next(it, None)
    if first is None:
        raise RegBNValueError(
            f"{WHERE}: batches is empty; pass at least one batch, e.g. batches=[(x1, x2)]"
        )
    _check_batch(first, 0)
    wanted = _pairs_argument(pairs)
    with in_mode(model, False):
        try:
            analysis = analyse(
                model,
                first,
                modalities=modalities,
                concrete_args=concrete_args,
                leaf_modules=leaf_modules,
                autowrap_functions=autowrap_functions,
            )
        except TraceError:
            raise
        except ValueError as e:
            raise RegBNValueError(f"{WHERE}: {e}") from e
        if analysis.failure is not None:
            raise RegBNValueError(
                f"{WHERE}: the model failed on batch 0, {analysis.failure}. Each batch must be "
                "valid input of the model's forward"
            )
        fusions: list[str | None] | None = None
        skipped: list[str] = []
        if wanted == "auto":
            wanted, fusions, skipped = pairs_of_fusions(analysis.fusions, max_projection_bytes)
            for message in skipped:
                warnings.warn(f"{WHERE}: {message}", UserWarning, stacklevel=2)
            if not wanted:
                raise RegBNValueError(
                    f"{WHERE}: pairs='auto' found no fusion to measure (no node whose tensor "
                    "operands come from disjoint sets of inputs"
                    + ("; every one was skipped" if skipped else "")
                    + "). Name the pairs explicitly; run regbn.inspect(model, ...) to list "
                    "the tensors"
                )
        meter = DependenceMeter(
            analysis.gm,
            wanted,
            fusions=fusions,
            model=model,
            max_samples=max_samples,
            permutations=permutations,
            seed=seed,
            lambda_rule=lambda_rule,
            skipped=skipped,
        )
        meter.update(_chain(first, it))
    return meter.report()


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _pairs_argument(pairs: Any) -> list[tuple[str, str]] | str:
    if pairs == "auto" and isinstance(pairs, str):
        return "auto"
    bad = RegBNTypeError(
        f"{WHERE}: pairs must be 'auto' or a list of (f, g) names, f measured against g; got "
        f"{pairs!r}. Example: pairs=[('gray_net.fc', 'colored_net.fc')]"
    )
    if isinstance(pairs, str) or not isinstance(pairs, Iterable):
        raise bad
    items = list(pairs)
    if len(items) == 2 and all(isinstance(p, str) for p in items):
        items = [tuple(items)]  # one pair given bare
    out: list[tuple[str, str]] = []
    for pair in items:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise bad
        if not all(isinstance(p, str) for p in pair):
            raise bad
        out.append((pair[0], pair[1]))
    if not out:
        raise RegBNValueError(f"{WHERE}: pairs is empty; give at least one (f, g) or 'auto'")
    return out
