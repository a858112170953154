"""Pure functions that solve the RegBN ridge problem exactly.

For a batch F (B×Df) and G (B×Dg) the projection is the ridge solution

    W(λ) = argmin_W ||F − G W||²_F + λ ||W||²_F = Gᵀ (GGᵀ + λI)⁻¹ F,

and the multiplier λ⁺ ≥ 0 is the root of a scalar, strictly decreasing secular function:

    paper:    ||W(λ)||²_F      = Σ_i s̃_i² ||c_i||² / (s̃_i² + λ)² = 1
    official: Σ_i (s̃_i² / (s̃_i² + λ))²                          = 1

where G = U S Vᵀ, c_i are the rows of UᵀF and s̃ are the thresholded singular values. Both have
the form Σ a_i / (d_i + λ)² = 1 and are solved by :func:`secular_root`.

A training batch takes the fast path (:func:`_attempt`: one eigendecomposition, the backward
written out in :mod:`regbn._autograd`) when λ⁺ > 0 and the thresholds change nothing, and the
general path (:func:`_general`) otherwise. Which singular values count as zero, thresholded
or live is decided on every path by one function, :func:`regbn._spectrum.classify`.

Float64 copies of a B×D tensor are made only where a precision rule asks for one: the primal
case (B > Dg), whose Dg×Dg Gram is solved in the solve dtype (:func:`_precisions`); a float32
pass retried in float64 because its spectrum or its bounds fail (:func:`_attempt`), where X
also stays float64 for W = GᵀX when float32 would amplify its round-off past ``_SAFE``
(:func:`_dual_fast`); and the general path, which sits at the Gram's round-off. The common
float32 step copies nothing to float64 but the n eigenvalues and ‖Q_i‖² it reads on the host.

Nothing here holds state; :class:`regbn.RegBN` calls these functions and owns the buffers.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch
from torch import Tensor

from ._autograd import DualRidge, FirstOrderOnly, PrimalRidge
from ._phases import phase
from ._spectrum import (
    LAMBDA_RULES,
    NonFiniteGuard,
    Spectrum,
    batch_spectrum,
    bound_of_fast_path,
    classify,
    gram,
    projection_from_spectrum,
    read_spectrum,
    residual,
    secular_root,
    secular_weights,
    slope,
    solve_dtype,
    solve_lambda,
)
from .errors import RegBNValueError

__all__ = [
    "LAMBDA_RULES",
    "BatchSolution",
    "NonFiniteGuard",
    "Spectrum",
    "batch_spectrum",
    "secular_root",
    "solve_batch",
    "solve_dtype",
    "solve_lambda",
]

# A float32 Gram is trusted when every eigenvalue exceeds this many times its round-off level.
_SAFE = 100.0


class BatchSolution:
    """The training-mode result for one batch.

    Attributes:
        f_r: (B, Df) residual, differentiable in F and G, in F's dtype.
        lam: λ⁺.
        W: (Dg, Df) batch projection, detached, in G's dtype. In the Gram case it is held as
            the factors Gᵀ and X = (K + λ⁺I)⁻¹F and formed on first access, so that a caller
            with a buffer of its own can have the one Dg×Df product written into it
            (:meth:`projection`).
    """

    __slots__ = ("_f_r", "lam", "_W", "_factors", "_dtype", "bound", "guard")

    def __init__(
        self,
        f_r: Tensor,
        lam: float,
        W: Tensor | None = None,
        factors: tuple[Tensor, Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._f_r, self.lam, self._W, self._factors = f_r, lam, W, factors
        # An upper bound on the Frobenius norms of f_r, W and the fast path's intermediates,
        # known on the host (inf where the path gives none), and the caller's ``guard`` values
        # read with the spectrum (see :func:`solve_batch`).
        self.bound = math.inf
        self.guard: np.ndarray | None = None
        if dtype is None:
            held = W if W is not None else factors[0] if factors is not None else None
            assert held is not None, "a BatchSolution needs W or its factors"
            dtype = held.dtype
        self._dtype = dtype

    def projection(self, out: Tensor | None = None) -> Tensor:
        """W_batch, written into ``out`` (any float dtype, W's shape) when given."""
        if self._W is None:
            assert self._factors is not None
            if out is not None and self._factors[0].dtype == out.dtype:
                # A reused buffer spares the page faults of a fresh Dg×Df allocation.
                return torch.mm(*self._factors, out=out)
            self._W = torch.mm(*self._factors)
        if self._W.dtype != self._dtype:
            self._W = self._W.to(self._dtype)
        return self._W if out is None else out.copy_(self._W)

    def delta(self, W: Tensor, out: Tensor) -> Tensor:
        """W_batch − W, written into ``out`` (W's shape and dtype). In the Gram case the GEMM's
        own epilogue subtracts W (``addmm`` with beta = −1): one pass over a Dg×Df matrix fewer
        than forming W_batch and subtracting."""
        factors = self._factors
        if self._W is None and factors is not None and factors[0].dtype == out.dtype == W.dtype:
            return torch.addmm(W, *factors, beta=-1, out=out)
        return torch.sub(self.projection(), W, out=out)

    @property
    def f_r(self) -> Tensor:
        return self._f_r

    @f_r.setter
    def f_r(self, value: Tensor) -> None:
        # ``bound`` speaks of the residual the solve formed, not of one put in its place.
        self._f_r, self.bound = value, math.inf

    @property
    def W(self) -> Tensor:
        return self.projection()


class _Next(enum.Enum):
    """What a fast-path attempt that gives no solution asks :func:`solve_batch` to do next."""

    RETRY = "retry"  # the working precision cannot hold this batch: redo it in the solve dtype
    GENERAL = "general path"  # not the fast path's case (λ⁺ = 0, thresholds active, round-off)


def _precisions(F: Tensor, G: Tensor) -> tuple[torch.dtype, ...]:
    """The working precisions the fast path tries, the solve dtype last.

    The B×B Gram is tried first in the inputs' precision (float32 GEMMs are twice as fast) and
    kept only when every eigenvalue stands well above its round-off, where it cannot tell a
    small singular value from a zero one, and nothing overflows; otherwise the whole pass is
    redone in the solve dtype. The Dg×Dg (primal) Gram is small: solve dtype only.
    """
    dt = solve_dtype(F.device)
    low = torch.promote_types(torch.promote_types(F.dtype, G.dtype), torch.float32)
    return (dt,) if G.shape[0] > G.shape[1] or low == dt else (low, dt)


def _fast_gram(F: Tensor, G: Tensor, wd: torch.dtype, primal: bool):
    """(Fk, Gd, K, P) in the working precision: F, G (primal only), the Gram and the matrix
    its eigenvectors project, GᵀF for GᵀG (Dg×Dg) and F for GGᵀ (B×B, differentiable)."""
    Fk = F.detach().to(wd)
    if primal:
        Gd = G.detach().to(wd)
        return Fk, Gd, Gd.mT @ Gd, Gd.mT @ Fk
    return Fk, None, gram(G.to(wd), False), Fk


def _fast_verdict(eh: np.ndarray, n: int, wd: torch.dtype, G: Tensor, sigma_THR: float,
                  precise: bool):
    """(nz, top, tol): the non-zero mask, max(e) and the zero tolerance (:func:`classify`) of
    the eigenvalues ``eh`` read on the host, or what to do instead:
    retry a pass whose eigenvalues the inputs' precision does not resolve, or leave to the
    general path a batch with nothing to remove, an active threshold or an eigenvalue at the
    Gram's round-off (where the general path reads s off G)."""
    if not np.isfinite(eh).all():
        return _Next.RETRY if not precise else _Next.GENERAL  # an overflowed Gram
    sp = classify(eh, n, wd, G.dtype, sigma_THR, 0.0)
    top, tol = float(sp.top), float(sp.tol)
    if not precise:
        info = torch.finfo(wd)
        resolved = math.isfinite(top) and float(eh.min()) > _SAFE * tol
        if not (resolved and float(eh.min()) > info.tiny / info.eps):
            return _Next.RETRY  # a small singular value, an overflow or an underflow
    nz = sp.nonzero
    d = eh[nz]
    if d.size == 0 or not bool(sp.kept.all()):
        return _Next.GENERAL
    if float(d.min()) <= _SAFE * top * n * torch.finfo(wd).eps:
        return _Next.GENERAL
    return nz, top, tol


def _attempt(
    F: Tensor, G: Tensor, rule: str, sigma_THR: float, need_grad: bool, wd: torch.dtype,
    guard: Tensor | None = None,
) -> BatchSolution | _Next:
    """One pass of the fast path in the working precision ``wd``: λ⁺ > 0, thresholds inactive.

    One eigendecomposition of the smaller Gram: K = GGᵀ = U diag(e) Uᵀ when B ≤ Dg, giving
    f_r = λ⁺ U diag(1/(e+λ⁺)) UᵀF; K = GᵀG = V diag(e) Vᵀ when B > Dg, giving
    W = V diag(1/(e+λ⁺)) VᵀGᵀF. The eigendecomposition and the projections run in ``wd``, the
    secular root in float64 on the host, from one read (:func:`read_spectrum`); each case has its
    backward written out. A pass in the solve dtype (``precise``) never asks for a retry.
    """
    precise = wd == solve_dtype(F.device)
    B, Dg = G.shape
    n, primal = max(B, Dg), B > Dg
    with phase("gram"):
        Fk, Gd, K, P = _fast_gram(F, G, wd, primal)
    with phase("eigh"):
        try:
            # In the Gram's own precision: float64 could not repair a float32 Gram's round-off.
            e, U = torch.linalg.eigh(K.detach())
        except torch.linalg.LinAlgError:
            if guard is not None:
                read_spectrum(K.new_zeros(0), K.new_zeros(0), None, guard)  # a non-finite input?
            if precise:
                raise
            return _Next.RETRY  # a float32 Gram that overflowed
    with phase("secular_root"):
        Q = U.mT @ P  # UᵀF (B×Df), or VᵀGᵀF (Dg×Df)
        # ‖Q_i‖² in the working precision, no float64 copy of Q: a float32 square that
        # overflows reads as inf and the pass is retried in float64.
        qn = torch.linalg.vector_norm(Q, dim=1).square()
        fn2 = torch.linalg.vector_norm(Fk).square() if primal else None
        eh, qn_h, fn2_h, held = read_spectrum(e, qn, fn2, guard)
        verdict = _fast_verdict(eh, n, wd, G, sigma_THR, precise)
        if isinstance(verdict, _Next):
            return verdict
        nz, top, tol = verdict
        if not precise and not np.isfinite(qn_h).all():
            return _Next.RETRY
        d = eh[nz]
        # ‖W‖² = Σ ‖(VᵀGᵀF)_i‖² / (e_i + λ)², and (VᵀGᵀF)_i = s_i (UᵀF)_i
        a = (qn_h[nz] * (1.0 if primal else d)) if rule == "paper" else d * d
        lam = secular_root(d, a)
    if lam == 0.0:
        return _Next.GENERAL
    eps = torch.finfo(wd).eps
    if _root_error(d, a, lam, rule, primal, n * eps * top) > _SAFE * n * eps:
        # An eigenvalue's round-off moves φ(λ⁺) more than round-off: where the general path
        # reads s off G (or the float64 pass, for a float32 one), ‖W‖ keeps its precision.
        return _Next.GENERAL if precise else _Next.RETRY
    if not precise and not (math.isfinite(lam) and lam > _SAFE * tol):
        return _Next.RETRY  # λ⁺ near the round-off of the float32 Gram: its root is ill-determined
    bound = bound_of_fast_path(eh, qn_h, nz, lam, primal, fn2_h)
    if not precise and not bound <= torch.finfo(wd).max * 2.0**-10:
        return _Next.RETRY  # (K + λI)⁻¹F or W would overflow the inputs' precision
    dphi = slope(d, a, lam)
    with phase("projections"):
        if primal:
            assert Gd is not None
            sol = _primal_fast(F, G, Fk, Gd, U, e, Q, nz, lam, dphi, rule, need_grad)
        else:
            sol = _dual_fast(F, G, (K, U, e, Q, nz, d, top), lam, dphi, rule, need_grad)
    sol.bound, sol.guard = bound, held
    return sol


def _root_error(d: np.ndarray, a: np.ndarray, lam: float, rule: str, primal: bool,
                err: float) -> float:
    """How far φ(λ⁺) = Σ a_i/(d_i + λ⁺)² may be from 1 when every eigenvalue d_i is off by
    ``err`` (the Gram's round-off, absolute): Σ |∂φ/∂d_i| · err, with a_i's own dependence on
    d_i (a = d‖(UᵀF)_i‖² for the paper's rule on GGᵀ, d² for the official one). A small d_i
    carrying much of φ makes it large although every eigenvalue passed the zero test."""
    x = d + lam
    if rule == "official":
        slope = 2 * d * lam / x**3
    elif primal:
        slope = 2 * a / x**3
    else:
        slope = (a / d) * np.abs(lam - d) / x**3
    return float(np.sum(np.abs(slope))) * err


def _masked(e: Tensor, nz: np.ndarray, lam: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """(e, 1/(e + λ), keep): a zero singular value is exactly zero, so it adds nothing to W
    and keeps F's part; ``keep`` is the non-zero mask on e's device, None when all are."""
    e = e.clamp(min=0)
    keep = None
    if not bool(nz.all()):
        keep = torch.from_numpy(nz).to(e.device, non_blocking=True)
        e = torch.where(keep, e, 0.0)
    return e, (e + lam).reciprocal(), keep


def _primal_fast(F, G, Fk, Gd, V, e, Q, nz, lam, dphi, rule, need_grad) -> BatchSolution:
    """The fast path's solution when B > Dg: W = V diag(1/(e+λ⁺)) VᵀGᵀF, then f_r = F − GW."""
    e, inv, keep = _masked(e, nz, lam)
    W = (V * (inv if keep is None else inv * keep)) @ Q
    if need_grad:
        f_r = PrimalRidge.apply(F, G, W, V, inv, e, lam, dphi, rule)
    else:
        f_r = torch.addmm(Fk, Gd, W, alpha=-1).to(F.dtype)
    return BatchSolution(f_r, lam, W=W, dtype=G.dtype)


def _dual_fast(F, G, ridge, lam, dphi, rule, need_grad) -> BatchSolution:
    """The fast path's solution when B ≤ Dg: f_r = λ⁺ X with X = (K + λ⁺I)⁻¹F, and W = GᵀX
    held as its two factors (:class:`BatchSolution`)."""
    K, U, e, Q, nz, d, top = ridge
    B = U.shape[0]
    e, inv, keep = _masked(e, nz, lam)
    Ui = U * inv
    if need_grad:
        # X = (K + λI)⁻¹F and S = K(K + λI)⁻²F, stacked into one product.
        XS = torch.cat([Ui, Ui * (e * inv)]) @ Q
        X, S = XS[:B], XS[B:]
    else:
        X = Ui @ Q
    if need_grad:
        f_r = DualRidge.apply(F, K, X, S, U, Ui, e, lam, dphi, rule)
    else:
        f_r = (lam * X).to(F.dtype)
    # W = Gᵀ (K + λI)⁻¹ F over the non-zero directions: the one Dg×Df product, left to
    # the caller.
    XW = (X if keep is None else (Ui * keep) @ Q).detach()
    # W = GᵀX in float32 errs by about ε₃₂·‖G‖‖X‖/‖W‖ relative, an amplification of at most
    # √max(e)·max 1/(e+λ) / max √e/(e+λ). A retried pass forms W in float64 only when that
    # exceeds _SAFE: the float64 GEMM costs three float32 ones.
    gd = torch.promote_types(G.dtype, torch.float32)
    if gd != XW.dtype:
        amp = math.sqrt(top) / (float(d.min()) + lam) / float(np.max(np.sqrt(d) / (d + lam)))
        if amp <= _SAFE:
            XW = XW.to(gd)
    Gf = G.detach().to(XW.dtype)
    return BatchSolution(f_r, lam, factors=(Gf.mT, XW), dtype=G.dtype)


def _spectral(
    Fd: Tensor, Gd: Tensor, K: Tensor, primal: bool, lam: float, rule: str,
    sigma_THR: float, sigma_MIN: float, in_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(f_r, h, sens) with autograd through the eigendecomposition, for the general case."""
    B, Dg = Gd.shape
    evals, vecs = torch.linalg.eigh(K)
    sp = classify(evals, max(B, Dg), K.dtype, in_dtype, sigma_THR, sigma_MIN)
    s, s_eff = sp.s[sp.live], sp.s_eff[sp.live]
    vecs = vecs[:, sp.nonzero][:, sp.live]
    U = (Gd @ vecs) / s if primal else vecs
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


def _general(
    F: Tensor, G: Tensor, rule: str, sigma_THR: float, sigma_MIN: float, need_grad: bool
) -> BatchSolution:
    """λ⁺ = 0 or thresholds that change the spectrum: the Gram in the solve dtype, as this
    path uses its eigenvectors or sits at its round-off.

    λ⁺ is re-entered as λ⁺ − (h − h̄)/h'(λ⁺) with h the secular function evaluated with
    autograd and h̄ its detached value: its value is λ⁺ and its gradient dλ⁺.
    """
    dt = solve_dtype(F.device)
    primal = G.shape[0] > G.shape[1]
    if need_grad:
        # The first derivative below is exact, the second is not (λ⁺ and the sensitivity enter
        # as constants): the inputs pass a gate that makes a double backward raise, as on the
        # fast path.
        F, G = FirstOrderOnly.apply(F, G)
    with phase("gram"):
        K = gram(G.to(dt), primal)
    with phase("eigh"):
        spec = batch_spectrum(F, G, sigma_THR, sigma_MIN, K=K)
    with phase("secular_root"):
        d, a = secular_weights(spec, rule)
        lam = secular_root(d, a)
        dphi = slope(d, a, lam)
    # The differentiable recomputation below runs its own eigh; it is counted here.
    with phase("projections"):
        W = projection_from_spectrum(G, spec, lam)
        if not need_grad:
            return BatchSolution(residual(F, spec, lam), lam, W)
        f_r, h, sens = _spectral(
            F.to(dt), G.to(dt), K, primal, lam, rule, sigma_THR, sigma_MIN, G.dtype
        )
        if lam > 0:
            # δ has value 0 and carries dλ⁺ = −∂h / φ'(λ⁺).
            delta = -(h - h.detach()) / dphi
            f_r = f_r + delta * sens
        return BatchSolution(f_r.to(F.dtype), lam, W)


def solve_batch(
    F: Tensor,
    G: Tensor,
    rule: str = "paper",
    sigma_THR: float = 0.0,
    sigma_MIN: float = 0.0,
    need_grad: bool | None = None,
    guard: Tensor | None = None,
) -> BatchSolution:
    """Solve one training batch exactly: λ⁺, the residual f_r and the batch projection W.

    Gradients of ``f_r`` are exact, including the dependence of λ⁺ on F and G, dλ⁺ = −∂h / h'
    by the implicit function theorem (h: the secular function at the fixed λ⁺). The common case
    (λ⁺ > 0, thresholds inactive) has that backward written out (:class:`DualRidge`,
    :class:`PrimalRidge` in :mod:`regbn._autograd`); otherwise the general path differentiates
    through the eigendecomposition (:func:`_general`).

    The fast path reads the device once: the eigenvalues, ‖Q_i‖² and ``guard`` in one
    transfer; the retries and the general path read more.

    Args:
        F: (B, Df) features to normalise.
        G: (B, Dg) features whose linear effect is removed.
        rule: "paper" or "official", see the module docstring.
        sigma_THR, sigma_MIN: singular-value thresholding, see :func:`batch_spectrum`.
        need_grad: build the autograd graph; default: when grad mode is on and F or G needs it.
        guard: values the caller needs on the host (e.g. the checks' sums), read with the
            spectrum: they come back as ``BatchSolution.guard``, and :class:`NonFiniteGuard` is
            raised when one is not finite.
    """
    if rule not in LAMBDA_RULES:
        raise RegBNValueError(f"RegBN: lambda_rule must be one of {LAMBDA_RULES}; got {rule!r}")
    if need_grad is None:
        need_grad = torch.is_grad_enabled() and (F.requires_grad or G.requires_grad)
    if not need_grad:
        F, G = F.detach(), G.detach()
    # The one loop over precisions: a pass returns a solution, or asks for a retry in the next
    # (more precise) one, or hands the batch to the general path.
    for wd in _precisions(F, G):
        out = _attempt(F, G, rule, sigma_THR, need_grad, wd, guard)
        if isinstance(out, BatchSolution):
            return out
        if out is _Next.GENERAL:
            break
        assert wd != solve_dtype(F.device), "the pass in the solve dtype never retries"
    held = None
    if guard is not None:
        held = read_spectrum(G.new_zeros(0), G.new_zeros(0), None, guard)[3]
    sol = _general(F, G, rule, sigma_THR, sigma_MIN, need_grad)
    sol.guard = held
    return sol
