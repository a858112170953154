"""The dependence measure itself and its result types (see `regbn.dependence`).

`dependence_of` measures two tensors; `DependenceRow` and `DependenceReport` hold and print the
results. Kept apart from the model-running half so that each module stays short.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...errors import RegBNTypeError, RegBNValueError, public
from ...solver import LAMBDA_RULES, Spectrum, batch_spectrum, residual, solve_lambda

__all__ = [
    "DependenceReport",
    "DependenceRow",
    "check_batch",
    "check_batches",
    "dependence_of",
    "pairs_argument",
]

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
        pairs = f"{len(self.rows)} pair" + ("" if len(self.rows) == 1 else "s")
        return f"<regbn DependenceReport: {pairs}, {self.lambda_rule} rule>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython without HTML (a terminal console) shows the table, not the one-line repr.
        printer.text(str(self))

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
            f"lambda_rule must be one of {LAMBDA_RULES}; got {lambda_rule!r}"
        )
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise RegBNValueError(
            f"permutations must be a positive int (the shuffled baseline averages that "
            f"many draws); got {permutations!r}"
        )


def _check_pair(f: Any, g: Any) -> None:
    """Both tensors of floating-point features over the same samples, else a clear error."""
    named = {"f": f, "g": g}
    not_tensors = [name for name, x in named.items() if not isinstance(x, Tensor)]
    if not_tensors:
        name = not_tensors[0]
        raise RegBNTypeError(
            f"{name} must be a torch.Tensor of N samples; got {type(named[name]).__name__}"
        )
    # Booleans count as features (a mask that a fusion reads as data).
    features = [x.dim() > 0 and (x.is_floating_point() or x.dtype == torch.bool) for x in (f, g)]
    for (name, x), ok in zip(named.items(), features, strict=True):
        if not ok:
            raise RegBNValueError(
                f"{name} must hold floating-point features shaped (N, ...); got "
                f"{x.dtype} of shape {tuple(x.shape)}. Measure features, not token ids"
            )
    n_f, n_g = f.shape[0], g.shape[0]
    if n_f != n_g:
        raise RegBNValueError(
            f"f and g must hold the same samples; f has {n_f} (shape "
            f"{tuple(f.shape)}), g has {n_g} (shape {tuple(g.shape)}). Pair tensors that "
            "share the batch dimension"
        )


@public
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
    _check_pair(f, g)
    n = f.shape[0]
    if n < 2:
        raise RegBNValueError(
            f"need at least 2 samples to standardise features; got {n}. Give more "
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


# ----------------------------------------------------------------------------- arguments


def check_batch(batch: Any, index: int) -> None:
    def visit(value: Any) -> None:
        if isinstance(value, Tensor) or value is None:
            return
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):  # a dataclass batch, read field by field
                visit(getattr(value, f.name))
        else:
            raise RegBNTypeError(
                f"batch {index} holds a {type(value).__name__}, not a tensor; each "
                "batch is a tuple of input tensors (or a dict of keyword inputs, one tensor, or "
                "dataclasses and NamedTuples of them), like example_inputs. Convert it with "
                "torch.as_tensor"
            )

    visit(batch)


def check_batches(batches: Any) -> Iterator[Any]:
    if isinstance(batches, (Tensor, dict)) or not isinstance(batches, Iterable):
        raise RegBNTypeError(
            f"batches must be an iterable of batches (a list, a DataLoader), each a "
            f"tuple of inputs like example_inputs; got {type(batches).__name__}. For one batch "
            "write batches=[(x1, x2)]"
        )
    return iter(batches)


def pairs_argument(pairs: Any) -> list[tuple[str, str]] | str:
    if pairs == "auto" and isinstance(pairs, str):
        return "auto"
    bad = RegBNTypeError(
        f"pairs must be 'auto' or a list of (f, g) names, f measured against g; got "
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
        raise RegBNValueError("pairs is empty; give at least one (f, g) or 'auto'")
    return out
