"""Pure functions that solve the RegBN ridge problem exactly.

For a batch F (B×Df) and G (B×Dg) the projection is the ridge solution

    W(λ) = argmin_W ||F − G W||²_F + λ ||W||²_F = Gᵀ (GGᵀ + λI)⁻¹ F,

and the multiplier λ⁺ ≥ 0 is the root of a scalar, strictly decreasing secular function:

    paper:    ||W(λ)||²_F      = Σ_i s̃_i² ||c_i||² / (s̃_i² + λ)² = 1
    official: Σ_i (s̃_i² / (s̃_i² + λ))²                          = 1

where G = U S Vᵀ, c_i are the rows of UᵀF and s̃ are the thresholded singular values. Both have
the form Σ a_i / (d_i + λ)² = 1 and are solved by :func:`secular_root`.

Nothing here holds state; :class:`regbn.RegBN` calls these functions and owns the buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LAMBDA_RULES",
    "Spectrum",
    "batch_spectrum",
    "secular_root",
    "secular_weights",
    "solve_lambda",
    "projection_from_spectrum",
    "residual",
    "solve_batch",
    "BatchSolution",
]

LAMBDA_RULES = ("paper", "official")


def solve_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the B×B (or Dg×Dg) solve: float64, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class Spectrum:
    """The part of the batch's spectral decomposition that the solve needs (all detached).

    Only numerically non-zero singular values are kept: a zero singular value contributes
    nothing to W, to the residual or to either secular equation.
    """

    basis: Tensor  # U_r, B×r: left singular vectors of G (solve dtype)
    s: Tensor  # r true singular values of G (solve dtype)
    s_eff: Tensor  # r thresholded singular values s̃ (solve dtype)
    coeffs: Tensor  # C_r = U_rᵀ F, r×Df (solve dtype)
    primal: bool  # True when factorised through GᵀG (B > Dg), False for the Gram GGᵀ
    plain: bool  # True when the thresholds changed no non-zero singular value


def _threshold(evals: Tensor, n: int, sigma_THR: float, sigma_MIN: float):
    """Split the eigenvalues of a Gram matrix into kept directions with true and thresholded s."""
    evals = evals.clamp_min(0)
    top = evals.max() if evals.numel() else evals.new_zeros(())
    # Eigenvalues at the round-off level of the Gram are zero singular values.
    tol = top * n * torch.finfo(evals.dtype).eps
    nonzero = evals > tol
    s = evals[nonzero].sqrt()
    smax = top.sqrt()
    kept = s > sigma_THR * smax
    s_eff = torch.where(kept, s, torch.full_like(s, sigma_MIN))
    # An s̃ of 0 contributes nothing; keep those out of every later sum.
    live = s_eff > 0
    plain = bool(kept.all())
    return nonzero, s, s_eff, live, plain


def batch_spectrum(F: Tensor, G: Tensor, sigma_THR: float = 0.0, sigma_MIN: float = 0.0) -> Spectrum:
    """Decompose one batch: the B×B Gram GGᵀ when B ≤ Dg, else the Dg×Dg matrix GᵀG.

    Args:
        F: (B, Df) features to normalise.
        G: (B, Dg) features whose linear effect is removed.
        sigma_THR: singular values at or below ``sigma_THR * max(s)`` are replaced by ``sigma_MIN``.
        sigma_MIN: the replacement value (0 drops the direction).
    """
    dt = solve_dtype(F.device)
    F64, G64 = F.detach().to(dt), G.detach().to(dt)
    B, Dg = G64.shape
    n = max(B, Dg)
    primal = B > Dg
    if primal:
        evals, V = torch.linalg.eigh(G64.T @ G64)
        nonzero, s, s_eff, live, plain = _threshold(evals, n, sigma_THR, sigma_MIN)
        V = V[:, nonzero][:, live]
        s, s_eff = s[live], s_eff[live]
        # U_r = G V_r S_r⁻¹ is defined for every kept (non-zero) direction.
        U = (G64 @ V) / s
    else:
        evals, U = torch.linalg.eigh(G64 @ G64.T)
        nonzero, s, s_eff, live, plain = _threshold(evals, n, sigma_THR, sigma_MIN)
        U = U[:, nonzero][:, live]
        s, s_eff = s[live], s_eff[live]
    return Spectrum(U, s, s_eff, U.T @ F64, primal, plain)


def secular_weights(spec: Spectrum, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (d, a) with the secular function Σ a_i / (d_i + λ)² for the given λ rule."""
    d = spec.s_eff.square()
    if rule == "paper":
        a = d * spec.coeffs.square().sum(dim=1)
    elif rule == "official":
        a = d.square()
    else:
        raise ValueError(f"lambda_rule must be one of {LAMBDA_RULES}; got {rule!r}")
    return d.cpu().double().numpy(), a.cpu().double().numpy()


def secular_root(d: np.ndarray, a: np.ndarray, max_iter: int = 100) -> float:
    """The λ ≥ 0 with φ(λ) = Σ a_i / (d_i + λ)² = 1, or 0 when φ(0) ≤ 1.

    φ is strictly decreasing and 1/sqrt(φ) is concave on λ > −min(d), so Newton's method on
    ψ(λ) = 1 − 1/sqrt(φ(λ)) started left of the root climbs to it monotonically and
    quadratically (the secular equation of trust-region solvers, Moré & Sorensen 1983). A bracket
    [lo, hi] with φ(lo) > 1 ≥ φ(hi) guards every step; a step leaving it bisects instead.

    Args:
        d: (r,) positive poles, s̃_i².
        a: (r,) non-negative weights.
    """
    d = np.asarray(d, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    live = (a > 0) & (d > 0)
    d, a = d[live], a[live]
    if d.size == 0 or float(np.sum(a / d**2)) <= 1.0:
        return 0.0
    lo, hi = 0.0, math.sqrt(float(a.sum()))  # φ(hi) ≤ Σ a / hi² = 1
    lam = lo
    for _ in range(max_iter):
        q = a / (d + lam) ** 2
        phi = float(q.sum())
        if phi == 1.0:
            return lam
        if phi > 1.0:
            lo = lam
        else:
            hi = lam
        dphi = -2.0 * float(np.sum(q / (d + lam)))
        # ψ = 1 − φ^{-1/2};  ψ' = ½ φ^{-3/2} φ'
        step = -(1.0 - phi**-0.5) / (0.5 * phi**-1.5 * dphi)
        new = lam + step
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - lam) <= 4 * np.finfo(np.float64).eps * max(new, 1e-300):
            return new
        lam = new
    return lam


def solve_lambda(spec: Spectrum, rule: str = "paper") -> float:
    """λ⁺ for one batch under ``rule`` ("paper": ||W||_F = 1; "official": Σ(s̃²/(s̃²+λ))² = 1)."""
    return secular_root(*secular_weights(spec, rule))


def projection_from_spectrum(G: Tensor, spec: Spectrum, lam: float) -> Tensor:
    """W(λ) = V diag(s̃ / (s̃² + λ)) C, a (Dg, Df) matrix in G's dtype (no autograd).

    In the Gram case V_r = Gᵀ U_r S_r⁻¹, so the only Dg×Df product is one Gᵀ Z.
    """
    s, se = spec.s, spec.s_eff
    scale = se / (se.square() + lam)
    if spec.primal:
        G64 = G.detach().to(spec.basis.dtype)
        V = (G64.T @ spec.basis) / s
        return ((V * scale) @ spec.coeffs).to(G.dtype)
    Z = spec.basis @ ((scale / s)[:, None] * spec.coeffs)
    return G.detach().T @ Z.to(G.dtype)


def residual(F: Tensor, spec: Spectrum, lam: float) -> Tensor:
    """f_r = F − G W(λ) = F − U diag(s s̃ / (s̃² + λ)) C, without autograd."""
    w = spec.s * spec.s_eff / (spec.s_eff.square() + lam)
    return F - (spec.basis @ (w[:, None] * spec.coeffs)).to(F.dtype)


@dataclass
class BatchSolution:
    """The training-mode result for one batch."""

    f_r: Tensor  # (B, Df), differentiable in F and G, in F's dtype
    W: Tensor  # (Dg, Df), detached, in G's dtype
    lam: float  # λ⁺


def _closed_form(F: Tensor, G: Tensor, spec: Spectrum, lam: float, rule: str):
    """(f_r, h) with autograd in the closed form; h = secular function − 1 at fixed λ.

    Used when λ > 0 and the thresholds did not alter the spectrum, so that
    f_r = λ (K + λI)⁻¹ F (Gram case) or F − G (GᵀG + λI)⁻¹ GᵀF (primal case) exactly.
    """
    dt = spec.basis.dtype
    Fd, Gd = F.to(dt), G.to(dt)
    if spec.primal:
        M = Gd.T @ Gd
        A = M + lam * torch.eye(M.shape[0], dtype=dt, device=M.device)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            return None
        P = Gd.T @ Fd
        Wd = torch.cholesky_solve(P, L)
        h = Wd.square().sum() if rule == "paper" else torch.cholesky_solve(M, L).square().sum()
        # dW/dλ = −A⁻¹W, so the λ-sensitivity of f_r = F − G W is + G A⁻¹ W.
        sens = Gd.detach() @ torch.cholesky_solve(Wd.detach(), L.detach())
        return Fd - Gd @ Wd, h - 1.0, sens
    K = Gd @ Gd.T
    A = K + lam * torch.eye(K.shape[0], dtype=dt, device=K.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return None
    X = torch.cholesky_solve(Fd, L)
    if rule == "paper":
        h = (X * (K @ X)).sum()  # ||GᵀX||² = tr(Xᵀ K X)
    else:
        h = torch.cholesky_solve(K, L).square().sum()  # ||A⁻¹K||² = Σ (s²/(s²+λ))²
    # f_r = λ X(λ) and dX/dλ = −A⁻¹X: the λ-sensitivity is X − λ A⁻¹X.
    Xd = X.detach()
    sens = Xd - lam * torch.cholesky_solve(Xd, L.detach())
    return lam * X, h - 1.0, sens


def _spectral(F: Tensor, G: Tensor, spec: Spectrum, lam: float, rule: str, sigma_THR: float,
              sigma_MIN: float):
    """(f_r, h, sens) with autograd through the eigendecomposition, for the general case."""
    dt = spec.basis.dtype
    Fd, Gd = F.to(dt), G.to(dt)
    B, Dg = Gd.shape
    if spec.primal:
        evals, V = torch.linalg.eigh(Gd.T @ Gd)
    else:
        evals, U = torch.linalg.eigh(Gd @ Gd.T)
    nonzero, _, _, _, _ = _threshold(evals.detach(), max(B, Dg), sigma_THR, sigma_MIN)
    evals = evals[nonzero]
    s = evals.clamp_min(0).sqrt()
    smax = evals.detach().max().clamp_min(0).sqrt()
    kept = s.detach() > sigma_THR * smax
    s_eff = torch.where(kept, s, torch.full_like(s, sigma_MIN))
    live = s_eff.detach() > 0
    s, s_eff = s[live], s_eff[live]
    if spec.primal:
        U = (Gd @ V[:, nonzero][:, live]) / s
    else:
        U = U[:, nonzero][:, live]
    C = U.T @ Fd
    d = s_eff.square()
    w = s * s_eff / (d + lam)
    f_r = Fd - U @ (w[:, None] * C)
    if rule == "paper":
        h = (d * C.square().sum(dim=1) / (d + lam) ** 2).sum()
    else:
        h = (d.square() / (d + lam) ** 2).sum()
    # d f_r / dλ = U diag(s s̃ / (s̃² + λ)²) C
    sens = (U @ ((s * s_eff / (d + lam) ** 2)[:, None] * C)).detach()
    return f_r, h - 1.0, sens


def solve_batch(F: Tensor, G: Tensor, rule: str = "paper", sigma_THR: float = 0.0,
                sigma_MIN: float = 0.0, need_grad: bool | None = None) -> BatchSolution:
    """Solve one training batch exactly: λ⁺, the residual f_r and the batch projection W.

    Gradients of ``f_r`` are exact, including the dependence of λ⁺ on F and G: λ⁺ is solved
    without autograd, then re-entered as λ⁺ − (h − h̄)/h'(λ⁺), where h is the secular function
    evaluated with autograd at the fixed λ⁺ and h̄ its detached value. The value is λ⁺ exactly
    and, by the implicit function theorem, its gradient is dλ⁺ = −∂h / h'.

    Args:
        F: (B, Df) features to normalise.
        G: (B, Dg) features whose linear effect is removed.
        rule: "paper" or "official", see the module docstring.
        sigma_THR, sigma_MIN: singular-value thresholding, see :func:`batch_spectrum`.
        need_grad: build the autograd graph; default: when grad mode is on and F or G needs it.
    """
    if rule not in LAMBDA_RULES:
        raise ValueError(f"lambda_rule must be one of {LAMBDA_RULES}; got {rule!r}")
    if need_grad is None:
        need_grad = torch.is_grad_enabled() and (F.requires_grad or G.requires_grad)
    spec = batch_spectrum(F, G, sigma_THR, sigma_MIN)
    d, a = secular_weights(spec, rule)
    lam = secular_root(d, a)
    W = projection_from_spectrum(G, spec, lam)
    if not need_grad:
        return BatchSolution(residual(F, spec, lam), W, lam)

    out = _closed_form(F, G, spec, lam, rule) if (spec.plain and lam > 0) else None
    if out is None:
        out = _spectral(F, G, spec, lam, rule, sigma_THR, sigma_MIN)
    f_r, h, sens = out
    if lam > 0:
        live = (a > 0) & (d > 0)
        dphi = -2.0 * float(np.sum(a[live] / (d[live] + lam) ** 3))
        # δ has value 0 and carries dλ⁺ = −∂h / φ'(λ⁺).
        delta = -(h - h.detach()) / dphi
        f_r = f_r + delta * sens
    return BatchSolution(f_r.to(F.dtype), W, lam)
