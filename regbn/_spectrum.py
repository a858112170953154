"""The spectral maths of one RegBN batch (RegBN, NeurIPS 2023): the Gram's eigendecomposition,
which singular values count as zero, thresholded or live (:func:`classify`, the one place
that decides it), and the secular equation for λ⁺.

:mod:`regbn.solver` builds the training step's solution from these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._autograd import Gram
from .errors import RegBNValueError

__all__ = [
    "LAMBDA_RULES",
    "NonFiniteGuard",
    "Spectrum",
    "bound_of_fast_path",
    "read_spectrum",
    "batch_spectrum",
    "gram",
    "projection_from_spectrum",
    "residual",
    "secular_root",
    "secular_weights",
    "slope",
    "solve_dtype",
    "solve_lambda",
    "classify",
]

LAMBDA_RULES = ("paper", "official")

def solve_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the B×B (or Dg×Dg) solve: float64, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _input_eps(dtype: torch.dtype) -> float:
    """The machine epsilon of the precision G came in (at least float32's: eigh needs it)."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def _zero_tol(top, n: int, gram_dtype: torch.dtype, in_dtype: torch.dtype):
    """The eigenvalue of the Gram at or below which a singular value of G counts as zero.

    Two floors, the larger wins: the round-off of the Gram itself (n·ε·max e in the precision
    it was formed in), and NumPy's ``matrix_rank`` rule on G, s ≤ n·ε·max s in the precision G
    came in, so that a float32 G of rank r is treated as rank r whatever precision solves it.
    """
    return top * max(n * torch.finfo(gram_dtype).eps, (n * _input_eps(in_dtype)) ** 2)


@dataclass
class Classified:
    """The verdict on a Gram's eigenvalues: which singular values of G count as zero, which the
    thresholds replace, and which stay live (s̃ > 0). Masks after ``nonzero`` index its
    non-zero entries. Tensors, or NumPy arrays for eigenvalues read on the host."""

    top: Any  # the largest eigenvalue, max(s)² (0-dim, ≥ 0)
    tol: Any  # the eigenvalue at or below which a singular value is zero (:func:`_zero_tol`)
    nonzero: Any  # over all eigenvalues
    s: Any  # the non-zero singular values
    cols: Tensor | None  # G V_r or Gᵀ U_r when s was read off its column norms
    kept: Any  # s > sigma_THR · max(s): left as they are by the thresholds
    s_eff: Any  # s̃: s where kept, else sigma_MIN
    live: Any  # s̃ > 0; an s̃ of 0 contributes nothing to W, f_r or either secular equation


def classify(
    evals: Tensor | np.ndarray,
    n: int,
    gram_dtype: torch.dtype,
    in_dtype: torch.dtype,
    sigma_THR: float,
    sigma_MIN: float,
    columns: Callable[[Tensor], Tensor] | None = None,
) -> Classified:
    """Decide, for every path alike, which singular values are zero, thresholded and live.

    Args:
        evals: the Gram's eigenvalues (autograd flows to ``s`` and ``s_eff`` when read off them);
            a NumPy array where the training step has read them on the host, and the verdict
            then comes in NumPy arrays (no further read of a tensor).
        n: max(B, Dg); gram_dtype: the precision the Gram was formed in; in_dtype: G's.
        columns: maps the non-zero mask to G V_r (or Gᵀ U_r), whose column norms are then the
            singular values: √e loses relative accuracy below √ε·max(s), the norms keep it.
            By default s = √e.
    """
    host = isinstance(evals, np.ndarray)  # read on the host: NumPy throughout, no tensor read
    sqrt, where = (np.sqrt, np.where) if host else (torch.sqrt, torch.where)

    def plain(x: Any) -> Any:  # the verdicts never carry autograd
        return x if host else x.detach()

    ev: Any = plain(evals)
    if ev.shape[0]:
        top = ev.max().clip(min=0)
    else:
        top = np.zeros(()) if host else ev.new_zeros(())
    tol = _zero_tol(top, n, gram_dtype, in_dtype)
    nonzero = ev > tol
    cols = None if columns is None or host else columns(nonzero)
    s: Any = sqrt(evals[nonzero].clip(min=0)) if cols is None else cols.norm(dim=0)
    kept = plain(s) > sigma_THR * sqrt(top)
    s_eff = where(kept, s, sigma_MIN if host else torch.full_like(s, sigma_MIN))
    live = plain(s_eff) > 0
    return Classified(top, tol, nonzero, s, cols, kept, s_eff, live)


def read_spectrum(e: Tensor, qn: Tensor, fn2: Tensor | None, guard: Tensor | None):
    """The training step's one host read: the eigenvalues, the squared row norms of Q, ‖F‖²
    (primal case) and the caller's guard values, in one transfer. Raises
    :class:`NonFiniteGuard` when a guard value is not finite."""
    dt = solve_dtype(e.device)
    parts = [e.to(dt), qn.to(dt)]
    if fn2 is not None:
        parts.append(fn2.to(dt).reshape(1))
    if guard is not None:
        parts.append(guard.detach().to(dt).reshape(-1))
    host = torch.cat(parts).cpu().numpy()
    n = e.shape[0]
    eh, qnh = host[:n].clip(min=0.0), host[n : 2 * n]
    rest = host[2 * n :]
    fnh = None
    if fn2 is not None:
        fnh, rest = float(rest[0]), rest[1:]
    if guard is not None and not np.isfinite(rest).all():
        raise NonFiniteGuard("RegBN: a guard value is not finite")
    return eh, qnh, fnh, (rest if guard is not None else None)


def bound_of_fast_path(eh, qn, nz, lam, primal: bool, fn2: float | None) -> float:
    """An upper bound, from the eigenvalues and ‖Q_i‖² alone, on the Frobenius norms of what
    the fast path forms: X = (K + λI)⁻¹F, S = K(K + λI)⁻²F, f_r and W (dual); W and f_r
    (primal). Zero directions enter with e = 0 (X keeps F's part there)."""
    e = np.where(nz, eh, 0.0)
    inv2 = 1.0 / (e + lam) ** 2
    with np.errstate(over="ignore", invalid="ignore"):
        w = math.sqrt(float(np.sum(np.where(nz, qn * e * inv2, 0.0))))
        if primal:
            wp = math.sqrt(float(np.sum(np.where(nz, qn * inv2, 0.0))))
            return max(wp, math.sqrt(fn2 or 0.0) + math.sqrt(float(eh.max())) * wp)
        x = math.sqrt(float(np.sum(qn * inv2)))
        sn = math.sqrt(float(np.sum(qn * e * e * inv2 * inv2)))
    bound = max(x, sn, lam * x, w)
    return bound if math.isfinite(bound) else math.inf


class NonFiniteGuard(RegBNValueError):
    """The caller's ``guard`` values (see :func:`solve_batch`) were not all finite: the caller
    tells which input or statistic it was."""


@dataclass
class Spectrum:
    """The part of the batch's spectral decomposition that the solve needs (all detached).

    Only live singular values are kept (see :func:`classify`): a zero singular value, or one the
    thresholds set to 0, contributes nothing to W, to the residual or to either secular
    equation.
    """

    basis: Tensor  # U_r, B×r: left singular vectors of G (solve dtype)
    s: Tensor  # r true singular values of G (solve dtype)
    s_eff: Tensor  # r thresholded singular values s̃ (solve dtype)
    coeffs: Tensor  # C_r = U_rᵀ F, r×Df (solve dtype)
    primal: bool  # True when factorised through GᵀG (B > Dg), False for the Gram GGᵀ
    plain: bool  # True when the thresholds changed no non-zero singular value
    right: Tensor  # V_r, Dg×r: right singular vectors of G (solve dtype)


def gram(G: Tensor, primal: bool) -> Tensor:
    """GᵀG (``primal``) or GGᵀ, differentiable."""
    return Gram.apply(G, primal)


def batch_spectrum(
    F: Tensor, G: Tensor, sigma_THR: float = 0.0, sigma_MIN: float = 0.0, K: Tensor | None = None
) -> Spectrum:
    """Decompose one batch: the B×B Gram GGᵀ when B ≤ Dg, else the Dg×Dg matrix GᵀG.

    Args:
        F: (B, Df) features to normalise.
        G: (B, Dg) features whose linear effect is removed.
        sigma_THR: singular values at or below ``sigma_THR * max(s)`` are replaced by ``sigma_MIN``.
        sigma_MIN: the replacement value (0 drops the direction).
        K: the Gram matrix, when the caller has already formed it (in any float dtype; the
            zero threshold follows the precision it was formed in and G's, see
            :func:`_zero_tol`).
    """
    dt = solve_dtype(F.device)
    F64 = F.detach().to(dt)
    G64 = G.detach().to(dt)
    B, Dg = G.shape
    primal = B > Dg
    K = gram(G64, primal) if K is None else K.detach()
    evals, vecs = torch.linalg.eigh(K.to(dt))

    def columns(nonzero: Tensor) -> Tensor:
        return G64 @ vecs[:, nonzero] if primal else G64.mT @ vecs[:, nonzero]

    sp = classify(evals, max(B, Dg), K.dtype, G.dtype, sigma_THR, sigma_MIN, columns)
    assert sp.cols is not None
    live = sp.live
    s, s_eff, other = sp.s[live], sp.s_eff[live], sp.cols[:, live]
    vecs = vecs[:, sp.nonzero][:, live]
    plain = bool(sp.kept.all())
    if primal:
        U = other / s  # U_r = G V_r S_r⁻¹
        return Spectrum(U, s, s_eff, U.mT @ F64, primal, plain, right=vecs)
    return Spectrum(vecs, s, s_eff, vecs.mT @ F64, primal, plain, right=other / s)


def secular_weights(spec: Spectrum, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (d, a) with the secular function Σ a_i / (d_i + λ)² for the given λ rule."""
    d = spec.s_eff.square()
    if rule == "paper":
        a = d * spec.coeffs.square().sum(dim=1)
    elif rule == "official":
        a = d.square()
    else:
        raise RegBNValueError(f"RegBN: lambda_rule must be one of {LAMBDA_RULES}; got {rule!r}")
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
    # Each term alone gives φ(λ) ≥ a_i/(d_i + λ)², so the root lies right of √a_i − d_i: a start
    # that spares the first Newton steps. Round-off may put it past the root; the bracket copes.
    lam = min(max(0.0, float(np.max(np.sqrt(a) - d))), hi)
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


def slope(d: np.ndarray, a: np.ndarray, lam: float) -> float:
    """φ'(λ) = −2 Σ a_i / (d_i + λ)³ over the live terms (a_i > 0, d_i > 0)."""
    live = (a > 0) & (d > 0)
    return -2.0 * float(np.sum(a[live] / (d[live] + lam) ** 3))


def solve_lambda(spec: Spectrum, rule: str = "paper") -> float:
    """λ⁺ for one batch under ``rule`` ("paper": ||W||_F = 1; "official": Σ(s̃²/(s̃²+λ))² = 1)."""
    return secular_root(*secular_weights(spec, rule))


def projection_from_spectrum(G: Tensor, spec: Spectrum, lam: float) -> Tensor:
    """W(λ) = V diag(s̃ / (s̃² + λ)) C, a (Dg, Df) matrix in G's dtype (no autograd)."""
    se = spec.s_eff
    W = (spec.right * (se / (se.square() + lam))) @ spec.coeffs
    return W.to(G.dtype)


def residual(F: Tensor, spec: Spectrum, lam: float) -> Tensor:
    """f_r = F − G W(λ) = F − U diag(s s̃ / (s̃² + λ)) C, without autograd."""
    w = spec.s * spec.s_eff / (spec.s_eff.square() + lam)
    # The subtraction too in the solve dtype: f_r may be a small difference of large terms.
    return (F.to(spec.basis.dtype) - spec.basis @ (w[:, None] * spec.coeffs)).to(F.dtype)
