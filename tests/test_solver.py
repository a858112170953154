"""regbn.solver against the independent float64 reference in tests/reference.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import reference, ridge_direct

from regbn.solver import batch_spectrum, secular_root, solve_batch, solve_lambda

# (B, f feature shape, g feature shape): vectors, 1D/2D/3D maps and tokens, B < Dg and B > Dg
SHAPES = {
    "vector_B>Dg": (24, (10,), (6,)),
    "vector_B<Dg": (6, (9,), (20,)),
    "map1d": (8, (3, 7), (2, 9)),
    "map2d": (10, (2, 4, 4), (3, 3, 3)),
    "map3d": (6, (2, 3, 3, 2), (1, 2, 3, 3)),
    "tokens": (5, (4, 6), (3, 5)),
    "seed_like": (12, (32,), (8, 3, 3)),
}


def _data(B, fs, gs, seed=0, g_scale=1.0, f_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    f = f_scale * torch.randn(B, *fs, generator=gen, dtype=torch.float64)
    g = g_scale * torch.randn(B, *gs, generator=gen, dtype=torch.float64)
    return f.reshape(B, -1), g.reshape(B, -1)


def _check(F, G, rule="paper", thr=0.0, smin=0.0, rtol=1e-9):
    sol = solve_batch(F, G, rule, thr, smin)
    ref = reference(F, G, rule, thr, smin)
    assert sol.lam == pytest.approx(ref.lam, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(sol.W.double(), ref.W, rtol=rtol, atol=1e-10)
    torch.testing.assert_close(sol.f_r.double(), ref.f_r, rtol=rtol, atol=1e-10)
    return sol, ref


@pytest.mark.parametrize("rule", ["paper", "official"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_matches_reference(shape, rule):
    B, fs, gs = SHAPES[shape]
    F, G = _data(B, fs, gs, seed=1, g_scale=0.3)
    sol, _ = _check(F, G, rule)
    assert sol.lam > 0
    if rule == "paper":
        assert float(sol.W.square().sum()) == pytest.approx(1.0, abs=1e-9)
    # the closed form agrees with the SVD reference too
    torch.testing.assert_close(sol.W, ridge_direct(F, G, sol.lam), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", ["vector_B>Dg", "vector_B<Dg", "map2d"])
def test_lambda_zero_when_least_norm_solution_is_inside_the_ball(shape):
    B, fs, gs = SHAPES[shape]
    F, G = _data(B, fs, gs, seed=2, g_scale=50.0, f_scale=0.01)
    sol, ref = _check(F, G)
    assert sol.lam == 0.0 and ref.lam == 0.0
    W0 = torch.linalg.pinv(G) @ F
    torch.testing.assert_close(sol.W, W0, rtol=1e-8, atol=1e-12)
    assert float(W0.square().sum()) <= 1.0


@pytest.mark.parametrize("rule", ["paper", "official"])
@pytest.mark.parametrize("B,Dg", [(20, 8), (6, 15)])
def test_rank_deficient_g(B, Dg, rule):
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(B, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, Dg, generator=gen, dtype=torch.float64)
    F = torch.randn(B, 7, generator=gen, dtype=torch.float64)
    spec = batch_spectrum(F, G)
    assert spec.s.numel() == 3  # the zero singular values were recognised as zero
    _check(F, G, rule)


@pytest.mark.parametrize("B,Dg", [(20, 8), (6, 15)])
def test_rank_deficient_g_with_lambda_zero(B, Dg):
    gen = torch.Generator().manual_seed(4)
    G = 30 * torch.randn(B, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, Dg, generator=gen, dtype=torch.float64)
    F = 0.05 * torch.randn(B, 5, generator=gen, dtype=torch.float64)
    sol, ref = _check(F, G)
    assert sol.lam == 0.0
    # f_r keeps exactly the part of F outside the column space of G
    P = G @ torch.linalg.pinv(G)
    torch.testing.assert_close(sol.f_r, F - P @ F, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("rule", ["paper", "official"])
def test_all_zero_g_leaves_f_unchanged(rule):
    F = torch.randn(8, 5, dtype=torch.float64)
    G = torch.zeros(8, 12, dtype=torch.float64)
    sol = solve_batch(F, G, rule)
    assert sol.lam == 0.0
    assert torch.equal(sol.W, torch.zeros(12, 5, dtype=torch.float64))
    torch.testing.assert_close(sol.f_r, F)


@pytest.mark.parametrize("rule", ["paper", "official"])
@pytest.mark.parametrize("thr,smin", [(0.3, 0.0), (0.3, 0.05), (0.5, 0.2)])
@pytest.mark.parametrize("B,Dg", [(20, 8), (6, 15)])
def test_sigma_thresholds(B, Dg, thr, smin, rule):
    gen = torch.Generator().manual_seed(5)
    # a spread spectrum so that the threshold really discards some directions
    U, _ = torch.linalg.qr(torch.randn(B, min(B, Dg), generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(Dg, min(B, Dg), generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -2, min(B, Dg), dtype=torch.float64)
    G = (U * s) @ V.T
    F = 0.5 * torch.randn(B, 6, generator=gen, dtype=torch.float64)
    spec = batch_spectrum(F, G, thr, smin)
    assert not spec.plain
    _check(F, G, rule, thr, smin)


def test_official_rule_depends_on_g_alone_and_misses_the_paper_constraint():
    F, G = _data(50, (512,), (64, 7, 7), seed=0)
    lam = solve_batch(F, G, "official").lam
    assert solve_batch(3 * F + 1, G, "official").lam == pytest.approx(lam, rel=1e-12)
    W = solve_batch(F, G, "official").W
    # on the official README's shapes ||W||² is far below the paper's 1
    assert 0.05 < float(W.square().sum()) < 0.5


def test_float32_constraint_at_the_official_readme_shape():
    gen = torch.Generator().manual_seed(0)
    F = torch.randn(50, 512, generator=gen)
    G = torch.randn(50, 64 * 7 * 7, generator=gen)
    sol = solve_batch(F, G)
    assert sol.W.dtype == torch.float32 and sol.f_r.dtype == torch.float32
    assert abs(float(sol.W.double().square().sum()) - 1) < 1e-3


def test_secular_root_edge_cases():
    assert secular_root(np.array([]), np.array([])) == 0.0
    assert secular_root(np.array([1.0]), np.array([0.5])) == 0.0  # φ(0) = 0.5 ≤ 1
    # one term: a/(d+λ)² = 1  ⇒  λ = sqrt(a) − d
    assert secular_root(np.array([2.0]), np.array([49.0])) == pytest.approx(5.0, rel=1e-15)
    # extremely spread poles still converge to the bisection answer
    d = np.logspace(-12, 6, 40)
    a = np.full(40, 3.0)
    lam = secular_root(d, a)
    assert float(np.sum(a / (d + lam) ** 2)) == pytest.approx(1.0, rel=1e-12)


def test_gram_and_primal_paths_agree():
    # B = Dg + 1 takes the primal path, B = Dg the Gram path; both must match the reference
    for B in (9, 10):
        F, G = _data(B, (4,), (9,), seed=6, g_scale=0.5)
        _check(F, G)
        assert batch_spectrum(F, G).primal == (B > 9)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(2, 12),
    Dg=st.integers(1, 14),
    Df=st.integers(1, 9),
    g_scale=st.floats(0.01, 30.0),
    f_scale=st.floats(0.01, 30.0),
    rule=st.sampled_from(["paper", "official"]),
)
# A small singular value (1e-4 of the largest) carrying most of ‖W(0)‖: its eigenvalue's
# round-off in the Gram moved ‖W‖² by 6.5e-8 on the fast path.
@example(seed=204, B=5, Dg=5, Df=1, g_scale=1.0, f_scale=1.0, rule="paper")
def test_properties(seed, B, Dg, Df, g_scale, f_scale, rule):
    gen = torch.Generator().manual_seed(seed)
    G = g_scale * torch.randn(B, Dg, generator=gen, dtype=torch.float64)
    F = f_scale * torch.randn(B, Df, generator=gen, dtype=torch.float64)
    sol = solve_batch(F, G, rule)
    assert sol.lam >= 0 and math.isfinite(sol.lam)
    if rule == "paper":
        W0 = torch.linalg.pinv(G, rtol=1e-9) @ F
        inside = float(W0.square().sum()) <= 1.0
        assert (sol.lam == 0.0) == inside
        if sol.lam > 0:
            assert abs(float(sol.W.square().sum()) - 1.0) <= 1e-9
        else:
            torch.testing.assert_close(sol.W, W0, rtol=1e-7, atol=1e-9)
    else:
        spec = batch_spectrum(F, G)
        if sol.lam > 0:
            q = (spec.s**2 / (spec.s**2 + sol.lam)) ** 2
            assert abs(float(q.sum()) - 1.0) <= 1e-9
        else:
            assert spec.s.numel() <= 1
    # f_r is always F − G W
    torch.testing.assert_close(sol.f_r, F - G @ sol.W, rtol=1e-7, atol=1e-9)


def test_solve_lambda_matches_solve_batch():
    F, G = _data(10, (5,), (30,), seed=7)
    spec = batch_spectrum(F, G)
    # The general spectrum reads s off ‖Gᵀu‖, the fast path off the eigenvalues: equal to rounding.
    assert solve_lambda(spec, "paper") == pytest.approx(solve_batch(F, G).lam, rel=1e-12)


# ----------------------------------------------------------------------------- gradients
GRAD_CASES = {
    "gram_paper": (6, 4, 9, "paper", 0.0, 0.0, 0.5, 1.0),
    "primal_paper": (9, 4, 3, "paper", 0.0, 0.0, 0.5, 1.0),
    "gram_official": (5, 3, 8, "official", 0.0, 0.0, 1.0, 1.0),
    "primal_official": (9, 3, 4, "official", 0.0, 0.0, 1.0, 1.0),
    "primal_lambda_zero": (9, 3, 3, "paper", 0.0, 0.0, 20.0, 0.05),
    "gram_lambda_zero": (4, 3, 7, "paper", 0.0, 0.0, 20.0, 0.05),
    "thresholded": (7, 3, 5, "paper", 0.4, 0.1, 0.5, 1.0),
    # rows of zeros give exact zero singular values, which the fast path masks out
    "gram_zero_rows": (6, 4, 9, "paper", 0.0, 0.0, 0.5, 1.0),
    "primal_zero_rows": (12, 4, 5, "official", 0.0, 0.0, 1.0, 1.0),
}


@pytest.mark.parametrize("case", list(GRAD_CASES), ids=list(GRAD_CASES))
def test_gradcheck(case):
    B, Df, Dg, rule, thr, smin, g_scale, f_scale = GRAD_CASES[case]
    gen = torch.Generator().manual_seed(11)
    if case == "thresholded":
        U, _ = torch.linalg.qr(torch.randn(B, min(B, Dg), generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(Dg, min(B, Dg), generator=gen, dtype=torch.float64))
        G = (U * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2], dtype=torch.float64)) @ V.T
    else:
        G = g_scale * torch.randn(B, Dg, generator=gen, dtype=torch.float64)
    if "zero_rows" in case:
        G[1] = 0.0
        G[3] = 0.0
        if B > Dg:  # a zero column too, for a zero singular value on the primal side
            G[:, 2] = 0.0
    F = f_scale * torch.randn(B, Df, generator=gen, dtype=torch.float64)
    F.requires_grad_(True)
    G.requires_grad_(True)
    lam = solve_batch(F.detach(), G.detach(), rule, thr, smin).lam
    assert (lam == 0.0) == ("lambda_zero" in case)

    def fn(F, G):
        return solve_batch(F, G, rule, thr, smin).f_r

    assert torch.autograd.gradcheck(fn, (F, G), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradient_includes_dlambda():
    """Freezing λ⁺ gives a different (wrong) gradient: the implicit term matters."""
    gen = torch.Generator().manual_seed(12)
    F = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    G = 0.5 * torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    sol = solve_batch(F, G)
    (gF,) = torch.autograd.grad(sol.f_r.sum(), F)
    lam = sol.lam
    Fd, Gd = F.detach().clone().requires_grad_(), G.detach()
    frozen = lam * torch.linalg.solve(Gd @ Gd.T + lam * torch.eye(6, dtype=torch.float64), Fd)
    (gF_frozen,) = torch.autograd.grad(frozen.sum(), Fd)
    assert not torch.allclose(gF, gF_frozen, atol=1e-6)


def test_no_grad_and_grad_paths_give_the_same_values():
    F, G = _data(8, (5,), (20,), seed=13, g_scale=0.4)
    a = solve_batch(F, G).f_r
    b = solve_batch(F.clone().requires_grad_(), G.clone().requires_grad_()).f_r
    torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


def test_float32_rank_deficient_lambda_zero_is_solved_in_float64():
    """A float32 Gram cannot resolve a λ⁺ near 0; the solver re-forms it in float64.

    Rounding to float32 leaves singular values ~1e-8 of the largest where G had zeros; the
    numerical rank (NumPy's matrix_rank rule in float32) treats them as zero, so λ⁺ is exactly
    0, as in the reference; a reference that keeps them (rtol 1e-9) has λ⁺ ~1e-6, and f_r
    agrees with it to float32 precision all the same.
    """
    gen = torch.Generator().manual_seed(14)
    G64 = 30 * torch.randn(6, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 40, generator=gen, dtype=torch.float64)
    F64 = 0.05 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    sol = solve_batch(F64.float(), G64.float())
    assert sol.lam == 0.0 and reference(F64.float(), G64.float()).lam == 0.0
    ref = reference(F64.float(), G64.float(), rtol=1e-9)
    assert 0.0 < ref.lam < 1e-5
    torch.testing.assert_close(sol.f_r.double(), ref.f_r, rtol=1e-4, atol=1e-5)
    P = G64 @ torch.linalg.pinv(G64)
    torch.testing.assert_close(sol.f_r.double(), F64 - P @ F64, rtol=1e-4, atol=1e-5)


def test_float32_fast_path_matches_float64():
    F, G = _data(50, (64,), (16, 4, 4), seed=15, g_scale=0.5)
    a = solve_batch(F.float(), G.float())
    b = solve_batch(F, G)
    assert a.lam == pytest.approx(b.lam, rel=1e-5)
    torch.testing.assert_close(a.f_r.double(), b.f_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.W.double(), b.W, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- float32 edges
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("B,Dg", [(64, 16), (33, 32), (16, 64)])
def test_float32_near_the_zero_lambda_boundary(B, Dg):
    """λ⁺ ≪ the spectrum: the float32 Gram cannot place the root; the float64 one must."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(B, Dg, generator=gen, dtype=torch.float64)
    F = G @ torch.randn(Dg, 8, generator=gen, dtype=torch.float64)
    F = F + 0.01 * torch.randn(B, 8, generator=gen, dtype=torch.float64)
    F = F / (torch.linalg.pinv(G.float().double()) @ F.float().double()).norm()  # ‖W(0)‖ ≈ 1
    F, G = F.float(), G.float()
    sol, ref = solve_batch(F, G), reference(F, G)
    assert sol.lam == pytest.approx(ref.lam, rel=1e-6, abs=1e-12)
    # f_r is a small residual here: float32 can hold it to ~ε·‖F‖, not to ε·‖f_r‖
    assert float((sol.f_r.double() - ref.f_r).norm()) < 1e-6 * float(F.double().norm())


@pytest.mark.parametrize("B,Dg", [(64, 16), (16, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_singular_value_under_thresholds(B, Dg, dtype):
    """s ≈ 3e-5·max: under the float32 Gram's round-off but above G's own (64·ε·max), so real
    in both dtypes; sigma_MIN must replace it."""
    gen = torch.Generator().manual_seed(0)
    r = min(B, Dg)
    U, _ = torch.linalg.qr(torch.randn(B, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(Dg, r, generator=gen, dtype=torch.float64))
    s = torch.linspace(1, 3, r, dtype=torch.float64)
    s[0] = 1e-4
    G = ((U * s) @ V.T).to(dtype)
    F = torch.randn(B, 8, generator=gen, dtype=torch.float64).to(dtype)
    sol, ref = solve_batch(F, G, "paper", 0.1, 0.5), reference(F, G, "paper", 0.1, 0.5)
    assert sol.lam == pytest.approx(ref.lam, rel=1e-6)
    assert _rel(sol.W, ref.W) < (1e-5 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("B,Dg", [(12, 4), (4, 12)])
def test_mixed_dtypes_and_gradients(B, Dg):
    gen = torch.Generator().manual_seed(1)
    F = torch.randn(B, 3, generator=gen, dtype=torch.float64).requires_grad_()
    G = (0.3 * torch.randn(B, Dg, generator=gen)).requires_grad_()
    sol = solve_batch(F, G)
    assert sol.lam > 0
    assert sol.f_r.dtype == torch.float64 and sol.W.dtype == torch.float32
    sol.f_r.sum().backward()
    assert F.grad.dtype == torch.float64 and G.grad.dtype == torch.float32
    # the float64 output is as accurate as float64 allows, whichever of F or G is narrower
    ref = reference(F.detach(), G.detach())
    torch.testing.assert_close(sol.f_r.detach(), ref.f_r, rtol=1e-12, atol=1e-13)
    sol = solve_batch(F.detach().float(), G.detach().double())
    ref = reference(F.detach().float(), G.detach().double())
    torch.testing.assert_close(sol.W, ref.W, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("B,Dg", [(32, 8), (8, 32)])
def test_float32_gram_overflow_falls_back_to_float64(B, Dg):
    gen = torch.Generator().manual_seed(2)
    F, G = torch.randn(B, 3, generator=gen), 1e20 * torch.randn(B, Dg, generator=gen)
    sol = solve_batch(F, G)
    assert bool(torch.isfinite(sol.f_r).all()) and bool(torch.isfinite(sol.W).all())
    torch.testing.assert_close(sol.f_r.double(), reference(F, G).f_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["fast", "thresholds", "zero_lambda"])
@pytest.mark.parametrize("B,Dg", [(6, 9), (9, 4)])
def test_double_backward_raises_rather_than_lies(B, Dg, path):
    F, G = _data(B, (3,), (Dg,), seed=4, g_scale=0.5 if path != "zero_lambda" else 50.0)
    thr, smin = (0.9, 0.1) if path == "thresholds" else (0.0, 0.0)
    F.requires_grad_()
    G.requires_grad_()
    sol = solve_batch(F, G, "paper", thr, smin)
    assert (sol.lam == 0.0) == (path == "zero_lambda")
    with pytest.raises(RuntimeError, match="second derivatives .* are refused"):
        torch.autograd.grad(sol.f_r.square().sum(), (F, G), create_graph=True)
    # a constant incoming gradient, where once_differentiable would let a wrong value through
    with pytest.raises(RuntimeError, match="exact to first order only"):
        torch.autograd.grad((sol.f_r * 2.0).sum(), (F, G), create_graph=True)
    gF, gG = torch.autograd.grad(sol.f_r.square().sum(), (F, G))  # first order still works
    assert gF.shape == F.shape and gG.shape == G.shape


@pytest.mark.parametrize("need_grad", [False, True])
def test_float32_retry_forms_W_in_float64(need_grad):
    """A rank-one G plus noise: the float32 Gram is rejected and W = GᵀX must not be formed from
    a float32 X (about 2e-3 off before)."""
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(16, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen,
                                                                          dtype=torch.float64)
    G = (10 * torch.outer(u, v) + 1e-3 * torch.randn(16, 64, generator=gen, dtype=torch.float64))
    G, F = G.float(), torch.randn(16, 8, generator=gen)
    sol, ref = solve_batch(F, G, need_grad=need_grad), reference(F, G)
    assert sol.W.dtype == torch.float32 and sol.f_r.dtype == torch.float32
    assert _rel(sol.W, ref.W) < 1e-6
    assert _rel(sol.f_r, ref.f_r) < 1e-6


def test_float32_retry_keeps_a_well_conditioned_W_in_float32():
    """Non-centred (post-ReLU) features fail the float32 Gram's test, yet their W = GᵀX is well
    conditioned: the retry forms it with a float32 GEMM (a float64 one costs three) and loses
    nothing measurable."""
    gen = torch.Generator().manual_seed(2)
    G = torch.relu(torch.randn(50, 3136, generator=gen) + 0.5)
    F = 10 * torch.relu(torch.randn(50, 64, generator=gen))
    e = torch.linalg.eigvalsh(G.double() @ G.double().T)
    assert float(e.min()) < 100 * 3136 * torch.finfo(torch.float32).eps * float(e.max())
    sol, ref = solve_batch(F, G), reference(F, G)
    assert sol._factors[1].dtype == torch.float32
    assert _rel(sol.W, ref.W) < 1e-6 and _rel(sol.f_r, ref.f_r) < 1e-6


def test_no_grad_residual_subtracts_in_the_solve_dtype():
    """λ⁺ = 0 and f_r a small difference of large terms: no float32 subtraction (1e-4 before)."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(33, 32, generator=gen, dtype=torch.float64)
    F = G @ torch.randn(32, 8, generator=gen, dtype=torch.float64)
    F = F + 0.01 * torch.randn(33, 8, generator=gen, dtype=torch.float64)
    F, G = (F / (torch.linalg.pinv(G) @ F).norm() * 0.99).float(), G.float()
    ref = reference(F, G)
    for need_grad in (False, True):
        sol = solve_batch(F, G, need_grad=need_grad)
        assert sol.lam == 0.0
        assert _rel(sol.f_r, ref.f_r) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Dg", [(6, 9), (12, 4)])
def test_half_precision_inputs(B, Dg, dtype):
    """No half eigh exists: the solve runs in float32 or float64 and answers in the input dtype."""
    gen = torch.Generator().manual_seed(3)
    F = torch.randn(B, 3, generator=gen).to(dtype).requires_grad_()
    G = (0.5 * torch.randn(B, Dg, generator=gen)).to(dtype).requires_grad_()
    sol = solve_batch(F, G)
    assert sol.f_r.dtype == dtype and sol.W.dtype == dtype
    sol.f_r.square().sum().backward()
    assert F.grad.dtype == dtype and G.grad.dtype == dtype
    ref = reference(F.detach(), G.detach())
    assert sol.lam == pytest.approx(ref.lam, rel=1e-5)
    assert _rel(sol.f_r, ref.f_r) < 1e-2


@pytest.mark.parametrize("which", ["both", "f_only"])
@pytest.mark.parametrize("scale", [1e-20, 1e-15, 1e17, 3e19])
@pytest.mark.parametrize("B,Dg", [(8, 12), (12, 5)])
def test_float32_inputs_at_extreme_scales(B, Dg, scale, which):
    """The Gram, or ‖UᵀF‖², of such inputs under- or overflows float32; the answer must not."""
    gen = torch.Generator().manual_seed(5)
    F = scale * torch.randn(B, 5, generator=gen)
    G = (scale if which == "both" else 1.0) * torch.randn(B, Dg, generator=gen)
    ref = reference(F, G)
    for need_grad in (False, True):
        sol = solve_batch(F.requires_grad_(need_grad), G)
        assert bool(torch.isfinite(sol.f_r).all()) and bool(torch.isfinite(sol.W).all())
        assert sol.lam == pytest.approx(ref.lam, rel=1e-5)
        # f_r may be all round-off (F inside the range of G, λ⁺ = 0): measured against F
        f_err = float((sol.f_r.detach().double() - ref.f_r).norm())
        assert f_err <= 1e-5 * max(float(ref.f_r.norm()), 1e-2 * float(F.detach().double().norm()))
        assert _rel(sol.W, ref.W) < 1e-5


@pytest.mark.parametrize("third", [0.0, 3e-7])
@pytest.mark.parametrize("thr,smin", [(0.0, 0.0), (0.1, 0.5)])
def test_float32_rank_deficiency_follows_the_matrix_rank_rule(thr, smin, third):
    """A rank-2 G rounded to float32 has singular values of ~1e-8·max, and a third one of
    3e-7·max sits under max(B, Dg)·ε₃₂: both are zero by NumPy's matrix_rank rule, not
    directions that thresholds turn into sigma_MIN ones (a float64 G keeps the third)."""
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 3, generator=gen, dtype=torch.float64))
    G64 = (U * torch.tensor([1.0, 0.5, third], dtype=torch.float64)) @ V.T
    G, F = G64.float(), 0.3 * torch.randn(8, 3, generator=gen)
    assert float(torch.linalg.svdvals(G.double())[2]) > 0  # full rank as stored
    assert batch_spectrum(F, G, thr, smin).s.numel() == 2
    assert batch_spectrum(F, G64, thr, smin).s.numel() == (3 if third else 2)
    sol = solve_batch(F, G, "paper", thr, smin)
    Vh = torch.linalg.svd(G.double())[2]
    assert float((Vh[2:] @ sol.W.double()).norm()) < 1e-5 * float(sol.W.norm())
    _check(F, G, "paper", thr, smin, rtol=1e-5)
