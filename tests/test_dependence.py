"""regbn.dependence: the measure against closed forms, the model left untouched, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from regbn.errors import RegBNTypeError, RegBNValueError
from regbn.fx.analysis import analyse, find_fusions
from regbn.fx.dependence import (
    DependenceMeter,
    DependenceReport,
    dependence_of,
    measure_dependence,
    measure_graph,
    pairs_of_fusions,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- closed forms


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.double().reshape(len(x), -1)
    x = x - x.mean(0)
    sd = x.pow(2).mean(0).sqrt()
    return x / torch.where(sd > 0, sd, torch.ones_like(sd))


def _r2_by_hand(f: torch.Tensor, g: torch.Tensor, lam: float = 0.0) -> float:
    """1 - ||F - G W||² / ||F||² with W the least-squares (lam = 0) or ridge solution."""
    F, G = _standardise(f), _standardise(g)
    if lam == 0.0:
        W = torch.linalg.pinv(G) @ F
    else:
        W = torch.linalg.solve(G.T @ G + lam * torch.eye(G.shape[1], dtype=G.dtype), G.T @ F)
    return float(1 - (F - G @ W).pow(2).sum() / F.pow(2).sum())


def _population_r2(A: torch.Tensor, sigma: float) -> float:
    """f ~ N(0, I), g = f A + sigma ε: the share of f's variance the best linear map of g
    explains, tr(A (AᵀA + σ²I)⁻¹ Aᵀ) / Df."""
    A = A.double()
    inner = A.T @ A + sigma**2 * torch.eye(A.shape[1], dtype=A.dtype)
    return float(torch.trace(A @ torch.linalg.solve(inner, A.T)) / A.shape[0])


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.5, 4.0])
def test_known_dependence_matches_the_closed_form(sigma):
    gen = torch.Generator().manual_seed(1)
    n, df, dg = 4000, 4, 8
    f = torch.randn(n, df, generator=gen, dtype=torch.float64)
    A = torch.randn(df, dg, generator=gen, dtype=torch.float64)
    g = f @ A + sigma * torch.randn(n, dg, generator=gen, dtype=torch.float64)
    row = dependence_of(f, g)
    # In sample, exactly the least-squares fit written out by hand.
    assert row.r2 == pytest.approx(_r2_by_hand(f, g), abs=1e-9)
    assert row.r2_at_lambda == pytest.approx(_r2_by_hand(f, g, row.lam), abs=1e-9)
    # In the population: the noise level sets how much g explains (a measure blind to the noise
    # would give one value for every sigma and fail here).
    assert row.r2 == pytest.approx(_population_r2(A, sigma), abs=0.02)
    # λ⁺ is the paper's: ||W(λ⁺)||_F = 1 when the least-squares W is larger.
    F, G = _standardise(f), _standardise(g)
    if row.lam > 0:
        W = torch.linalg.solve(G.T @ G + row.lam * torch.eye(dg, dtype=G.dtype), G.T @ F)
        assert float(W.norm()) == pytest.approx(1.0, rel=1e-6)
        assert row.r2_at_lambda <= row.r2
    # Shuffling g breaks the dependence: chance is about rank/N.
    assert row.rank == dg and row.n_samples == n
    assert row.r2_shuffled == pytest.approx(dg / n, abs=0.006)
    assert row.above_chance == pytest.approx(row.r2 - row.r2_shuffled)


def test_the_noise_ranks_the_dependence():
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(1000, 3, generator=gen)
    A = torch.randn(3, 6, generator=gen)
    noise = [s * torch.randn(1000, 6, generator=gen) for s in (0.1, 1, 10)]
    r2 = [dependence_of(f, f @ A + e).r2 for e in noise]
    assert r2[0] > 0.95 and r2[0] > r2[1] > r2[2] and r2[2] < 0.2


@pytest.mark.parametrize("dg", [5, 40])
def test_independent_pairs_sit_at_chance(dg):
    gen = torch.Generator().manual_seed(3)
    n = 600
    f = torch.randn(n, 6, generator=gen)
    g = torch.randn(n, dg, generator=gen)
    row = dependence_of(f, g, permutations=8)
    # For independent Gaussian data the in-sample R² of Dg regressors is about Dg/(N-1).
    assert row.r2 == pytest.approx(_r2_by_hand(f, g), abs=1e-9)
    assert row.r2 == pytest.approx(dg / (n - 1), abs=0.02)
    assert row.r2_shuffled == pytest.approx(dg / (n - 1), abs=0.015)
    assert abs(row.above_chance) < 0.02


def test_wide_g_saturates_and_the_baseline_says_so():
    gen = torch.Generator().manual_seed(4)
    f, g = torch.randn(50, 3, generator=gen), torch.randn(50, 80, generator=gen)
    row = dependence_of(f, g)
    assert row.saturated and row.rank == 49
    assert row.r2 == pytest.approx(1.0) and row.r2_shuffled == pytest.approx(1.0)
    assert abs(row.above_chance) < 1e-9
    assert "saturated" in row.summary()


def test_constant_features_and_shapes():
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(300, 2, 3, 3, generator=gen)
    f[:, 0, 0, 0] = 7.0  # a constant feature carries no variance to explain
    g = f[:, :1].mean((2, 3)) + 0.01 * torch.randn(300, 1, generator=gen)
    row = dependence_of(f, g, lambda_rule="official")
    assert row.f_features == 18 and row.g_features == 1 and row.rank == 1
    assert row.r2 == pytest.approx(_r2_by_hand(f, g), abs=1e-9)
    assert row.r2_shuffled == dependence_of(f, g, lambda_rule="official").r2_shuffled  # seeded
    assert row.r2_shuffled != dependence_of(f, g, seed=1).r2_shuffled


# ----------------------------------------------------------------------------- models


class TwoBranch(nn.Module):
    """Two branches with BatchNorm and dropout, concatenated: one fusion."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.right = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5))
        self.head = nn.Linear(13, 2)

    def forward(self, x, y):
        return self.head(torch.cat([self.left(x), self.right(y)], 1))


def _batches(n_batches: int = 6, size: int = 32, coupled: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(size, 6, generator=gen)
        noise = torch.randn(size, 4, generator=gen)
        y = x[:, :4] + 0.2 * noise if coupled else noise
        out.append((x, y))
    return out


def _snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return state, [(n, m.training) for n, m in model.named_modules()]


def test_model_is_left_bit_identical():
    torch.manual_seed(0)
    model = TwoBranch()
    model(*_batches(1)[0])  # BatchNorm statistics that are not the defaults
    model.train()
    state, flags = _snapshot(model)
    rng = torch.get_rng_state()
    report = measure_dependence(model, _batches(), pairs=[("x", "y"), ("left", "right")])
    after, flags_after = _snapshot(model)
    assert flags_after == flags and model.training
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert len(report.rows) == 2


def test_auto_finds_the_fusion_and_measures_it():
    torch.manual_seed(0)
    model = TwoBranch()
    coupled = measure_dependence(model, _batches())
    (row,) = coupled.rows
    (fusion,) = find_fusions(model, _batches(1)[0])
    assert row.fusion == fusion.name == "cat" and row.pair == fusion.pair  # what insert pairs
    assert row.n_samples == 6 * 32 and row.f_features == 8 and row.g_features == 5
    independent = measure_dependence(model, _batches(coupled=False)).rows[0]
    assert row.above_chance > 0.3 > independent.above_chance
    assert abs(independent.above_chance) < 0.1
    # The eval-mode features, by hand: the measure equals dependence_of on them.
    model.eval()
    with torch.no_grad():
        batches = _batches()
        f = torch.cat([model.left(x) for x, _ in batches])
        g = torch.cat([model.right(y) for _, y in batches])
    by_hand = dependence_of(f, g, pair=row.pair, fusion="cat")
    assert by_hand.r2 == pytest.approx(row.r2, abs=1e-6)
    assert by_hand.r2_shuffled == pytest.approx(row.r2_shuffled, abs=1e-6)


def test_explicit_pairs_names_and_dict_batches():
    torch.manual_seed(0)
    model = TwoBranch()
    batches = [{"x": x, "y": y} for x, y in _batches()]
    report = measure_dependence(model, iter(batches), pairs=("input:x", "module:right"))
    (row,) = report.rows
    assert row.pair == ("input:x", "module:right") and row.fusion is None
    assert report.row_for("module:right") is row


def test_samples_are_capped_and_pooled_across_calls():
    torch.manual_seed(0)
    model = TwoBranch()
    capped = measure_dependence(model, _batches(), max_samples=70)
    assert capped.rows[0].n_samples == 70 and capped.max_samples == 70

    def endless():
        while True:
            yield from _batches()

    assert measure_dependence(model, endless(), max_samples=100).rows[0].n_samples == 100
    analysis = analyse(model, _batches(1)[0])
    pairs, fusions, skipped = pairs_of_fusions(analysis.fusions)
    assert pairs == [find_fusions(model, _batches(1)[0])[0].pair]
    assert fusions == ["cat"] and skipped == []
    meter = DependenceMeter(analysis.gm, pairs, fusions=fusions)
    meter.update(_batches()[:2]).update(_batches()[2:])
    whole = measure_graph(analysis.gm, pairs, _batches(), fusions=fusions)
    assert meter.report() == whole
    assert whole.rows[0].r2 == pytest.approx(measure_dependence(model, _batches()).rows[0].r2)


def test_bad_inputs_are_refused_clearly():
    model = TwoBranch()
    prefix = r"^regbn\.measure_dependence: "
    of = r"^regbn\.dependence_of: "  # each entry names itself
    with pytest.raises(RegBNValueError, match=prefix + "batches is empty"):
        measure_dependence(model, [])
    with pytest.raises(RegBNTypeError, match=prefix + "batches must be an iterable of batches"):
        measure_dependence(model, torch.randn(4, 6))
    with pytest.raises(RegBNTypeError, match=prefix + r"batch 0 holds a ndarray, not a tensor"):
        measure_dependence(model, [(np.zeros((4, 6)), np.zeros((4, 4)))])
    with pytest.raises(RegBNValueError, match=prefix + r"pair 0: 'lefft' is not a tensor.*'left'"):
        measure_dependence(model, _batches(), pairs=[("lefft", "right")])
    with pytest.raises(RegBNTypeError, match=prefix + "pairs must be 'auto'"):
        measure_dependence(model, _batches(), pairs="everything")
    with pytest.raises(RegBNValueError, match=prefix + "pair 0: f and g are the same tensor"):
        measure_dependence(model, _batches(), pairs=[("left", "left")])
    with pytest.raises(RegBNValueError, match=prefix + "batch 1: the model failed on it"):
        measure_dependence(model, [_batches()[0], (torch.randn(4, 5), torch.randn(4, 4))])
    with pytest.raises(RegBNValueError, match=of + "f and g must hold the same samples"):
        dependence_of(torch.randn(10, 2), torch.randn(11, 2))
    with pytest.raises(RegBNValueError, match=of + "f must hold floating-point features"):
        dependence_of(torch.ones(10, 2, dtype=torch.int64), torch.randn(10, 2))
    with pytest.raises(RegBNValueError, match=of + "need at least 2 samples"):
        dependence_of(torch.randn(1, 2), torch.randn(1, 2))
    with pytest.raises(RegBNValueError, match=of + "lambda_rule must be one of"):
        dependence_of(torch.randn(9, 2), torch.randn(9, 2), lambda_rule="ridge")
    with pytest.raises(RegBNTypeError, match=prefix + "model must be an nn.Module"):
        measure_dependence(lambda x, y: x, _batches())


# ----------------------------------------------------------------------------- the report


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self._in = False

    def handle_starttag(self, tag, attrs):
        self._in = tag in ("td", "th")
        if self._in:
            self.cells.append("")

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


def test_report_formats_hold_every_row():
    torch.manual_seed(0)
    model = TwoBranch()
    report = measure_dependence(model, _batches(), pairs=[("x", "y")])
    wide = dependence_of(torch.randn(40, 3), torch.randn(40, 50), pair=("a|<b>", "c"))
    rows = [*report.rows, wide]
    report = DependenceReport(tuple(rows), skipped=("a fusion was skipped",))
    text, md = str(report), report.to_markdown()
    parser = _Cells()
    parser.feed(report._repr_html_())
    for row in report.rows:
        for name in row.pair:
            assert name in text and name.replace("|", "\\|") in md and name in parser.cells
        assert f"{row.r2:.3f}" in text and f"{row.r2:.3f}" in md and f"{row.r2:.3f}" in parser.cells
    assert "<b>" not in report._repr_html_()  # escaped
    assert "a fusion was skipped" in text and "saturated" not in text  # the note says rank >= N-1
    assert "rank(G) >= N-1" in text
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 1 + len(rows)
    data = json.loads(json.dumps(report.to_dict()))
    assert [r["pair"] for r in data["rows"]] == [list(r.pair) for r in rows]
    assert data["rows"][1]["saturated"] and "above_chance" in data["rows"][0]


# ----------------------------------------------------------------------------- the example


@pytest.mark.slow
def test_dependence_example_quick(tmp_path):
    out = tmp_path / "dependence.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dependence.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "| model | data | f by g |" in done.stdout
    assert {"colored_digits", "config"} <= set(data)


def test_exported_from_regbn():
    import regbn
    import regbn.fx.dependence as dependence

    for name in ("measure_dependence", "dependence_of", "DependenceReport", "DependenceRow"):
        assert name in regbn.__all__ and getattr(regbn, name) is getattr(dependence, name)


def test_a_progress_bar_counts_the_samples_unless_turned_off(capsys):
    pytest.importorskip("tqdm")
    from regbn.fx.report import inspect

    measure_dependence(TwoBranch(), _batches())
    shown = capsys.readouterr().err
    assert "regbn.measure_dependence: batches" in shown and "/6 [" in shown
    measure_dependence(TwoBranch(), _batches(), progress=False)
    inspect(TwoBranch(), _batches()[0], batches=_batches(), progress=False)
    assert capsys.readouterr().err == ""
    inspect(TwoBranch(), _batches()[0], batches=_batches())
    assert "batches" in capsys.readouterr().err
