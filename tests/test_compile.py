"""regbn.RegBN under torch.compile: one graph in training, no host read, the same numbers as eager.

Compiled with the ``aot_eager`` backend (forward and backward graphs, no code generation) except
one inductor test; the fullgraph-only checks trace with dynamo alone (backend ``eager``).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from reference import reference
from torch import nn

import regbn
from regbn import RegBN
from regbn._graph import NEWTON_STEPS, secular_root_device
from regbn._spectrum import secular_root

OFFICIAL = dict(normalize_input=True, normalize_output=True, affine=True)
pytestmark = pytest.mark.slow  # torch.compile: seconds per test


def make(fs, gs, **kw) -> RegBN:
    return RegBN(fs[0], gs[0], list(fs[1:]), list(gs[1:]), **kw)


def batches(n, B, fs, gs, dtype, seed=0, f_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        f = f_scale * torch.randn(B, *fs, generator=gen, dtype=dtype)
        g = torch.randn(B, *gs, generator=gen, dtype=dtype)
        yield f, g, torch.randn(B, *fs, generator=gen, dtype=dtype), torch.randn(
            B, *gs, generator=gen, dtype=dtype)


def state(layer: RegBN) -> dict[str, torch.Tensor]:
    """Every buffer (running W, Adam moments, counters, λ history, norm statistics) and every
    parameter's gradient."""
    out = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    out.update({f"{k}.grad": p.grad.clone() for k, p in layer.named_parameters()
                if p.grad is not None})
    return out


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- compiled = eager
# (f shape, g shape, B, dtype, layer options): representative configurations.
NUMERIC = {
    "f64-paper-dual": ((16,), (2, 3, 3), 8, torch.float64, {}),
    "f64-official-primal": ((5,), (3,), 12, torch.float64, dict(lambda_rule="official")),
    "f32-official-options": ((2, 4, 4), (3, 4, 4), 6, torch.float32, OFFICIAL),
    "f64-paper-dual-thresholds": ((16,), (2, 3, 3), 8, torch.float64,
                                  dict(sigma_THR=0.6, sigma_MIN=0.3)),
    "f64-channel-thresholds": ((2, 3, 3), (3, 3, 3), 3, torch.float64,
                               dict(projection="channel", sigma_THR=0.5, sigma_MIN=0.3,
                                    normalize_input=True, affine=True)),
}


@pytest.mark.parametrize("name", list(NUMERIC))
def test_compiled_training_matches_eager_over_many_steps(name):
    fs, gs, B, dtype, opts = NUMERIC[name]
    torch.manual_seed(0)
    eager = make(fs, gs, **opts).to(dtype)
    layer = copy.deepcopy(eager)
    ops: set[str] = set()
    compiled = torch.compile(layer, backend=recording_backend(ops), fullgraph=True)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    lams = []
    for f, g, wf, wg in batches(8, B, fs, gs, dtype):
        outs, grads = [], []
        for run in (eager, compiled):
            fl, gl = f.clone().requires_grad_(), g.clone().requires_grad_()
            f_r, g_out = run(fl, gl)
            ((f_r * wf).sum() + (g_out * wg).sum()).backward()
            outs.append((f_r.detach(), g_out.detach()))
            grads.append((fl.grad, gl.grad))
        torch.testing.assert_close(outs[1], outs[0], **tol)
        torch.testing.assert_close(grads[1], grads[0], **tol)
        lams.append(layer.lambda_history[-1].item())
        assert lams[-1] == pytest.approx(eager.last_lambda, rel=1e-5 if dtype == torch.float32
                                         else 1e-11)
    assert layer.num_batches_tracked.item() == 8
    # λ⁺ = 0 on every batch of the channel case (||W(0)||_F ≤ 1 for a 3×2 W), else λ⁺ > 0
    assert all(lam == 0 for lam in lams) if "channel" in name else min(lams) > 0
    want, got = state(eager), state(layer)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **tol, equal_nan=True, msg=key)
    assert int(layer.rejected) == 0
    assert_no_host_read(ops)


def recording_backend(ops: set[str]):
    """aot_eager that also records the aten ops of the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, _):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def assert_no_host_read(ops: set[str]) -> None:
    """No .item(), .tolist(), .cpu() or data-dependent branch in the compiled graphs: such a
    read is aten._local_scalar_dense (or a data-dependent shape: nonzero, masked_select) in the
    traced graph, and dynamo would break the graph at it."""
    assert "aten._linalg_eigh.default" in ops or "aten.linalg_eigh.default" in ops, ops
    reads = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.tolist",
             "aten._assert_async", "aten.masked_select")
    assert not {op for op in ops if op.startswith(reads)}


@pytest.mark.parametrize("rule,B", [("paper", 4), ("official", 10), ("paper", 10)])
def test_compiled_step_matches_the_float64_reference(rule, B):
    # λ⁺ and f_r against the float64 formulas of tests/reference.py (no output norm), in the
    # Gram case (B ≤ Dg) and the primal case (B > Dg).
    fs, gs = (12,), (5,)
    layer = make(fs, gs, normalize_output=False, lambda_rule=rule).double()
    f, g, _, _ = next(batches(1, B, fs, gs, torch.float64, seed=B))
    with torch.no_grad():  # forward graph only
        f_r, _ = torch.compile(layer, backend="aot_eager", fullgraph=True)(f, 0.5 * g)
    ref = reference(f, 0.5 * g, rule)
    assert ref.lam > 0
    torch.testing.assert_close(f_r.reshape(B, -1), ref.f_r, rtol=1e-9, atol=1e-10)
    assert layer.last_lambda == pytest.approx(ref.lam, rel=1e-9)


def test_inductor_matches_eager():
    # The training step's forward under inductor's generated code (the masked buffer writes,
    # the unrolled Newton steps); its backward is checked above with aot_eager.
    fs, gs, B = (32,), (4, 3, 3), 12
    eager = make(fs, gs, **OFFICIAL)
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True)  # inductor
    with torch.no_grad():
        for f, g, _, _ in batches(3, B, fs, gs, torch.float32):
            torch.testing.assert_close(compiled(f, g), eager(f, g), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.W, eager.W, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lambda_history, eager.lambda_history, rtol=1e-5,
                               atol=0, equal_nan=True)
    torch.testing.assert_close(layer.norm_g.running_var, eager.norm_g.running_var)
    assert layer.num_batches_tracked.item() == 3


# ----------------------------------------------------------------------------- one graph
# Every rule, norm setting and projection; each dtype with half of them (the graph's ops are
# the same in both dtypes, the numeric tests above run both).
FULLGRAPH = [
    (rule, norms, projection, (torch.float32, torch.float64)[i % 2])
    for i, (rule, norms, projection) in enumerate(itertools.product(
        ["paper", "official"], ["plain", "norms", "official"], ["full", "channel"]))
]


@pytest.mark.parametrize("rule,norms,projection,dtype", FULLGRAPH,
                         ids=["-".join(map(str, c)).replace("torch.", "") for c in FULLGRAPH])
def test_training_step_is_one_graph(rule, norms, projection, dtype):
    opts = {"plain": dict(normalize_output=False), "norms": {}, "official": OFFICIAL}[norms]
    layer = make((2, 3, 3), (3, 3, 3), lambda_rule=rule, projection=projection, **opts).to(dtype)
    f = torch.randn(4, 2, 3, 3, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 3, 3, 3, dtype=dtype)
    explain = torch._dynamo.explain(layer)(f, g)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


# ----------------------------------------------------------------------------- the λ solve
def test_the_fixed_newton_steps_reach_float64_precision():
    # Across spectra much wider than the tests' batches: poles over 24 decades, weights over
    # 30, many terms and one, roots near a pole and far from all.
    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(400):
        r = int(rng.integers(1, 60))
        d = 10.0 ** rng.uniform(-12, 12, r)
        a = 10.0 ** rng.uniform(-15, 15, r) * rng.integers(0, 2, r)  # some terms absent
        if trial % 4 == 0:
            d[:] = d[0]  # one repeated pole
        want = secular_root(d, a)
        got, _ = secular_root_device(torch.from_numpy(d), torch.from_numpy(a))
        if want == 0.0:
            assert got.item() == 0.0
            continue
        worst = max(worst, abs(got.item() - want) / want)
        # the root itself: φ(λ) = 1 to round-off
        phi = float(np.sum(a[d > 0] / (d[d > 0] + got.item()) ** 2))
        assert abs(phi - 1) < 1e-12, (trial, phi)
    assert worst < 1e-13, worst
    # structured spectra: thousands of clustered poles, one dominant weight, a root near 0
    for d, a in ((np.linspace(1.0, 1.0 + 1e-9, 4096), np.full(4096, 1e-3)),
                 (np.logspace(-8, 8, 1000), np.r_[1e30, np.full(999, 1e-20)]),
                 (np.array([1.0, 2.0]), np.array([1.0 + 1e-12, 0.0]))):
        want = secular_root(d, a)
        got, _ = secular_root_device(torch.from_numpy(d), torch.from_numpy(a))
        assert got.item() == pytest.approx(want, rel=1e-13, abs=1e-300)
    assert NEWTON_STEPS <= 32


# ----------------------------------------------------------------------------- rejected batches
def test_a_rejected_compiled_batch_changes_nothing_and_the_next_eager_call_raises():
    layer = make((6,), (2, 2, 2), **OFFICIAL)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    f, g = torch.randn(8, 6), torch.randn(8, 2, 2, 2)
    compiled(f, g)
    before = state(layer)
    bad = f.clone()
    bad[3, 2] = float("nan")
    compiled(bad, g)  # no host read: it cannot raise, it records
    after = state(layer)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, equal_nan=True,
                                   msg=key)
    assert int(layer.rejected) == 1
    compiled(f, g)  # a good batch after a bad one trains, and the record stays
    assert layer.num_batches_tracked.item() == 2
    with pytest.raises(ValueError, match="non-finite values.*no buffer changed"):
        layer(f, g)  # the next eager call
    assert int(layer.rejected) == 0
    layer(f, g)  # the record is cleared once raised
    assert layer.num_batches_tracked.item() == 3


def test_an_overflowing_scale_is_a_clear_error_in_eager_and_rejected_when_compiled():
    f = torch.randn(8, 4, dtype=torch.float64) * 1e200
    g = torch.randn(8, 30, dtype=torch.float64) * 1e200
    for dg in (30, 3):  # the Gram case and the primal case
        layer = RegBN(4, dg, [], []).double()
        with pytest.raises(ValueError, match="scale overflows the solve.*no buffer changed"):
            layer(f, g[:, :dg])
        assert layer.num_batches_tracked.item() == 0 and not layer.W.any()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(f, g[:, :dg])
    assert layer.num_batches_tracked.item() == 0 and not layer.W.any()
    assert torch.isnan(layer.lambda_history).all()
    with pytest.raises(ValueError, match="not finite although its inputs were"):
        layer.check_status()
    layer.check_status()  # cleared


# ----------------------------------------------------------------------------- a patched model
class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gray = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 8))
        self.color = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6))
        self.head = nn.Linear(14, 3)

    def forward(self, gray, color):
        return self.head(torch.cat([self.gray(gray), self.color(color)], dim=1))


def test_a_patched_model_compiles_to_one_graph_and_trains_like_eager():
    torch.manual_seed(0)
    model = TwoBranch()
    gray, color = torch.randn(10, 1, 6, 6), torch.randn(10, 3, 6, 6)
    torch.compile(model, backend="eager", fullgraph=True)(gray, color)  # the model alone
    patched = regbn.insert(model, pairs=[("gray.4", "color.4")], example_inputs=(gray, color),
                           **OFFICIAL)
    eager = copy.deepcopy(patched)
    patched.train()
    eager.train()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(10, 1, 6, 6, generator=gen), torch.randn(10, 3, 6, 6, generator=gen)
        want, got = eager(x, y), compiled(x, y)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        want.square().sum().backward()
        got.square().sum().backward()
    layer, ref = patched.regbn_0, eager.regbn_0
    assert layer.num_batches_tracked.item() == 3
    torch.testing.assert_close(layer.W, ref.W, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(patched.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
