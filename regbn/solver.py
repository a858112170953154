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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LAMBDA_RULES",
    "SECOND_ORDER_MESSAGE",
    "first_order_only",
    "Spectrum",
    "batch_spectrum",
    "gram",
    "secular_root",
    "secular_weights",
    "solve_lambda",
    "projection_from_spectrum",
    "residual",
    "solve_batch",
    "BatchSolution",
]

LAMBDA_RULES = ("paper", "official")

SECOND_ORDER_MESSAGE = (
    "RegBN: the training-mode gradient is exact to first order only (λ⁺ enters through the "
    "implicit function theorem), so second derivatives (backward or autograd.grad with "
    "create_graph=True: gradient penalties, Hessian-vector products, gradgradcheck) are refused "
    "rather than returned wrong. Take them in eval mode (layer.eval(): f_r = F − G·W is plain "
    "torch ops), or differentiate without create_graph=True"
)


def first_order_only(backward: Callable) -> Callable:
    """Decorate an autograd.Function backward that is exact to first order only.

    The engine runs a backward with grad mode on exactly when ``create_graph=True``; that is
    refused here. (``once_differentiable`` is not enough: when the incoming gradient does not
    require grad, or ``autograd.grad`` names its inputs, its error node is skipped and the
    second derivative comes out silently without this function's terms.)
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(SECOND_ORDER_MESSAGE)
        return backward(ctx, *grads)

    return wrapper
# A float32 Gram is trusted when every eigenvalue exceeds this many times its round-off level.
_SAFE = 100.0


def solve_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the B×B (or Dg×Dg) solve: float64, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class Spectrum:
    """The part of the batch's spectral decomposition that the solve needs (all detached).

    Only numerically non-zero singular values are kept (see :func:`_zero_tol`): a zero singular
    value contributes nothing to W, to the residual or to either secular equation.
    """

    basis: Tensor  # U_r, B×r: left singular vectors of G (solve dtype)
    s: Tensor  # r true singular values of G (solve dtype)
    s_eff: Tensor  # r thresholded singular values s̃ (solve dtype)
    coeffs: Tensor  # C_r = U_rᵀ F, r×Df (solve dtype)
    primal: bool  # True when factorised through GᵀG (B > Dg), False for the Gram GGᵀ
    plain: bool  # True when the thresholds changed no non-zero singular value
    right: Tensor  # V_r, Dg×r: right singular vectors of G (solve dtype)


def _input_eps(dtype: torch.dtype) -> float:
    """The machine epsilon of the precision G came in (at least float32's: eigh needs it)."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps


def _zero_tol(top: float | Tensor, n: int, gram_dtype: torch.dtype, in_dtype: torch.dtype):
    """The eigenvalue of the Gram at or below which a singular value of G counts as zero.

    Two floors, the larger wins: the round-off of the Gram itself (n·ε·max e in the precision
    it was formed in), and NumPy's ``matrix_rank`` rule on G, s ≤ n·ε·max s in the precision G
    came in, so that a float32 G of rank r is treated as rank r whatever precision solves it.
    """
    return top * max(n * torch.finfo(gram_dtype).eps, (n * _input_eps(in_dtype)) ** 2)


class _Gram(torch.autograd.Function):
    """GGᵀ (or GᵀG) with a backward of one product: d/dG of GGᵀ is (∂K + ∂Kᵀ) G."""

    @staticmethod
    def forward(ctx, G: Tensor, primal: bool) -> Tensor:
        ctx.save_for_backward(G)
        ctx.primal = primal
        return G.T @ G if primal else G @ G.T

    @staticmethod
    def backward(ctx, grad: Tensor):
        (G,) = ctx.saved_tensors
        sym = grad + grad.T
        return (G @ sym if ctx.primal else sym @ G), None


def gram(G: Tensor, primal: bool) -> Tensor:
    """GᵀG (``primal``) or GGᵀ, differentiable."""
    return _Gram.apply(G, primal)


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
    gram_dtype = K.dtype
    evals, vecs = torch.linalg.eigh(K.to(dt))
    top = evals.max().clamp_min(0) if evals.numel() else evals.new_zeros(())
    nonzero = evals > _zero_tol(top, max(B, Dg), gram_dtype, G.dtype)
    vecs = vecs[:, nonzero]
    # A singular value read off the Gram (√e) loses relative accuracy below √ε·max(s); the norm
    # of Gᵀu (or Gv) keeps it, and the thresholds and W need it there.
    other = G64 @ vecs if primal else G64.mT @ vecs
    s = other.norm(dim=0)
    smax = top.sqrt()
    kept = s > sigma_THR * smax
    s_eff = torch.where(kept, s, torch.full_like(s, sigma_MIN))
    live = s_eff > 0  # an s̃ of 0 contributes nothing; keep those out of every later sum
    plain = bool(kept.all())
    s, s_eff, vecs, other = s[live], s_eff[live], vecs[:, live], other[:, live]
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


class _DualRidge(torch.autograd.Function):
    """f_r = λ⁺ (K + λ⁺I)⁻¹ F for the Gram case, with the exact backward written out.

    X, S, U and e come in the working precision; the output and the gradients go back in the
    inputs' dtypes. The forward value is computed by the caller from K = U diag(e) Uᵀ (e is 0 on
    the directions counted as zero); the backward routes the
    gradient to F and K at fixed λ⁺ and adds the implicit-function term through dλ⁺, with the
    secular function φ(λ) written in matrix form:

        paper:    φ = tr(Xᵀ K X),  ∂φ/∂F = 2S,  ∂φ/∂K = XXᵀ − XSᵀ − SXᵀ
        official: φ = ‖(K + λI)⁻¹K‖²_F,  ∂φ/∂F = 0,  ∂φ/∂K = 2λ U diag(e/(e+λ)³) Uᵀ

    where X = (K + λI)⁻¹F, S = K(K + λI)⁻¹X = X − λ(K + λI)⁻¹X and dλ⁺ = −dφ / φ'(λ⁺).
    """

    @staticmethod
    def forward(ctx, F, K, X, S, U, Ui, e, lam, dphi, rule):
        ctx.save_for_backward(X, S, U, Ui, e)
        ctx.lam, ctx.dphi, ctx.rule, ctx.dtypes = lam, dphi, rule, (F.dtype, K.dtype)
        return (lam * X).to(F.dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, gY):
        X, S, U, Ui, e = ctx.saved_tensors  # Ui = U diag(1/(e+λ))
        lam, dphi = ctx.lam, ctx.dphi
        gY = gY.to(X.dtype)
        Z = Ui @ (U.mT @ gY)  # (K + λI)⁻¹ gY
        # ⟨gY, ∂f_r/∂λ⟩ = ⟨gY, S⟩; dλ⁺ = −dφ/φ', so the λ-term adds −c·∂φ below.
        c = (gY * S).sum() / dphi
        if ctx.rule == "paper":
            gF = lam * Z - 2 * c * S
            # ∂/∂K is (cS − λZ)Xᵀ − cX(X − S)ᵀ; K is symmetric and the Gram's backward only
            # uses gK + gKᵀ, so the one product MXᵀ with the same symmetric part serves.
            gK = (c * (2 * S - X) - lam * Z) @ X.mT
        else:
            gF = lam * Z
            inv = (e + lam).reciprocal()
            gK = -lam * Z @ X.T - (2 * lam * c) * (U * (e * inv**3)) @ U.T
        F_dtype, K_dtype = ctx.dtypes
        return gF.to(F_dtype), gK.to(K_dtype), None, None, None, None, None, None, None, None


class _PrimalRidge(torch.autograd.Function):
    """f_r = F − G W with W = (K + λ⁺I)⁻¹GᵀF, K = GᵀG (B > Dg), with the exact backward.

    With A = K + λI = V diag(e + λ) Vᵀ, Z = A⁻¹GᵀgY and R = A⁻¹W, the gradient at fixed λ is
    gF = gY − GZ, gG = −(gF Wᵀ + f_r Zᵀ); ⟨gY, ∂f_r/∂λ⟩ = ⟨Z, W⟩ and dλ⁺ = −dφ / φ'(λ⁺) with

        paper:    φ = ‖W‖²,             ∂φ/∂F = 2GR,  ∂φ/∂G = 2(f_r Rᵀ − G R Wᵀ)
        official: φ = ‖A⁻¹K‖²_F,        ∂φ/∂F = 0,    ∂φ/∂G = 2G V diag(2λe/(e+λ)³) Vᵀ

    For the paper rule both terms fold into Z' = Z + 2kR (k = ⟨Z, W⟩/φ'): gF = gY − GZ',
    gG = −(gF Wᵀ + f_r Z'ᵀ). Everything runs in W's dtype (the solve dtype); the outputs and
    gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, F, G, W, V, inv, e, lam, dphi, rule):
        Gd = G.to(W.dtype)
        f_r = torch.addmm(F.to(W.dtype), Gd, W, alpha=-1)
        ctx.save_for_backward(Gd, W, f_r, V, inv, e)
        ctx.lam, ctx.dphi, ctx.rule, ctx.dtypes = lam, dphi, rule, (F.dtype, G.dtype)
        return f_r.to(F.dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, gY):
        G, W, f_r, V, inv, e = ctx.saved_tensors
        gY = gY.to(W.dtype)
        Vi = V * inv
        Df = W.shape[1]
        if ctx.rule == "paper":
            ZR = Vi @ (V.mT @ torch.cat([G.mT @ gY, W], 1))
            Z, R = ZR[:, :Df], ZR[:, Df:]
            k = (Z * W).sum() / ctx.dphi
            Z = Z + (2 * k) * R
        else:
            Z = Vi @ (V.mT @ (G.mT @ gY))
            k = (Z * W).sum() / ctx.dphi
        gF = torch.addmm(gY, G, Z, alpha=-1)
        gG = -(gF @ W.mT + f_r @ Z.mT)
        if ctx.rule == "official":
            gG = gG - G @ (((4 * ctx.lam) * k) * (V * (e * inv**3)) @ V.mT)
        F_dtype, G_dtype = ctx.dtypes
        return gF.to(F_dtype), gG.to(G_dtype), None, None, None, None, None, None, None


def _fast(F: Tensor, G: Tensor, rule: str, sigma_THR: float, need_grad: bool):
    """The common case in few operations: λ⁺ > 0 and the thresholds change nothing.

    One eigendecomposition of the smaller Gram: K = GGᵀ = U diag(e) Uᵀ when B ≤ Dg, giving
    f_r = λ⁺ U diag(1/(e+λ⁺)) UᵀF; K = GᵀG = V diag(e) Vᵀ when B > Dg, giving
    W = V diag(1/(e+λ⁺)) VᵀGᵀF. The eigendecomposition and the projections run in one working
    precision, the secular root in float64 on the host; each case has its backward written
    out. Returns None when the batch is not this case (a zero λ⁺, a threshold that alters the
    spectrum, or a singular value the Gram resolves poorly): the general path takes it.
    """
    dt = solve_dtype(F.device)
    B, Dg = G.shape
    n = max(B, Dg)
    primal = B > Dg
    # The B×B Gram is tried first in the inputs' precision (float32 GEMMs are twice as fast)
    # and kept only when every eigenvalue stands well above its round-off, where it cannot
    # tell a small singular value from a zero one, and nothing overflows; otherwise the whole
    # pass is redone in the solve dtype. The Dg×Dg (primal) Gram is small: solve dtype only.
    low = torch.promote_types(torch.promote_types(F.dtype, G.dtype), torch.float32)
    for wd in (dt,) if primal or low == dt else (low, dt):
        precise = wd == dt
        Fk = F.detach().to(wd)
        if primal:
            Gd = G.detach().to(wd)
            K = Gd.mT @ Gd
            P = Gd.mT @ Fk  # GᵀF, Dg×Df
        else:
            K = gram(G.to(wd), False)
            P = Fk
        try:
            # In the Gram's own precision: float64 could not repair a float32 Gram's round-off.
            e, U = torch.linalg.eigh(K.detach())
        except torch.linalg.LinAlgError:
            if precise:
                raise
            continue  # a float32 Gram that overflowed
        eh = e.cpu().double().numpy().clip(min=0.0)
        top = float(eh.max())
        tol = _zero_tol(top, n, wd, G.dtype)
        if not precise:
            info = torch.finfo(wd)
            resolved = math.isfinite(top) and float(eh.min()) > _SAFE * tol
            if not (resolved and float(eh.min()) > info.tiny / info.eps):
                continue  # a small singular value, an overflow or an underflow
        nz = eh > tol
        d = eh[nz]
        if d.size == 0 or float(d.min()) <= sigma_THR**2 * top:
            return None  # nothing to remove, or a threshold that alters the spectrum
        if float(d.min()) <= _SAFE * top * n * torch.finfo(wd).eps:
            return None  # an eigenvalue near the Gram's round-off: the general path reads s off G
        Q = U.mT @ P  # UᵀF (B×Df), or VᵀGᵀF (Dg×Df)
        if rule == "paper":
            # ‖W‖² = Σ ‖(VᵀGᵀF)_i‖² / (e_i + λ)², and (VᵀGᵀF)_i = s_i (UᵀF)_i
            qn = Q.double().square().sum(1).cpu().numpy()[nz]  # a float32 square may overflow
            a = qn * (1.0 if primal else d)
        else:
            a = d * d
        lam = secular_root(d, a)
        if lam == 0.0:
            return None
        if not precise and not (math.isfinite(lam) and lam > _SAFE * tol):
            continue  # λ⁺ near the round-off of the float32 Gram: its root is ill-determined
        live = a > 0
        dphi = -2.0 * float(np.sum(a[live] / (d[live] + lam) ** 3))
        full = bool(nz.all())
        e = e.clamp(min=0)
        if not full:
            # A zero singular value is exactly zero: it adds nothing to W and keeps F's part.
            keep = torch.as_tensor(nz, device=e.device)
            e = torch.where(keep, e, 0.0)
        inv = (e + lam).reciprocal()
        if primal:
            W = (U * (inv if full else inv * keep)) @ Q
            if need_grad:
                f_r = _PrimalRidge.apply(F, G, W, U, inv, e, lam, dphi, rule)
            else:
                f_r = torch.addmm(Fk, Gd, W, alpha=-1).to(F.dtype)
            return BatchSolution(f_r, lam, W=W, dtype=G.dtype)
        Ui = U * inv
        if need_grad:
            # X = (K + λI)⁻¹F and S = K(K + λI)⁻²F, stacked into one product.
            XS = torch.cat([Ui, Ui * (e * inv)]) @ Q
            X, S = XS[:B], XS[B:]
        else:
            X = XS = Ui @ Q
        # One reduction is the cheap test: a NaN or Inf anywhere reaches the float64 sum.
        if not precise and not math.isfinite(float(XS.sum(dtype=torch.float64))):
            continue  # (K + λI)⁻¹F overflowed the inputs' precision
        if need_grad:
            f_r = _DualRidge.apply(F, K, X, S, U, Ui, e, lam, dphi, rule)
        else:
            f_r = (lam * X).to(F.dtype)
        # W = Gᵀ (K + λI)⁻¹ F over the non-zero directions: the one Dg×Df product, left to
        # the caller.
        XW = (X if full else (Ui * keep) @ Q).detach()
        # W = GᵀX in float32 errs by about ε₃₂·‖G‖‖X‖/‖W‖ relative, an amplification of at most
        # √max(e)·max 1/(e+λ) / max √e/(e+λ). A retried pass forms W in float64 only when that
        # exceeds _SAFE: the float64 GEMM costs three float32 ones.
        gd = torch.promote_types(G.dtype, torch.float32)
        if gd != wd:
            amp = math.sqrt(top) / (float(d.min()) + lam) / float(np.max(np.sqrt(d) / (d + lam)))
            if amp <= _SAFE:
                XW = XW.to(gd)
        Gf = G.detach().to(XW.dtype)
        return BatchSolution(f_r, lam, factors=(Gf.mT, XW), dtype=G.dtype)
    raise AssertionError("unreachable: the last pass is precise")  # pragma: no cover


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

    __slots__ = ("f_r", "lam", "_W", "_factors", "_dtype")

    def __init__(
        self,
        f_r: Tensor,
        lam: float,
        W: Tensor | None = None,
        factors: tuple[Tensor, Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.f_r, self.lam, self._W, self._factors = f_r, lam, W, factors
        self._dtype = dtype or (W.dtype if W is not None else factors[0].dtype)

    def projection(self, out: Tensor | None = None) -> Tensor:
        """W_batch, written into ``out`` (any float dtype, W's shape) when given."""
        if self._W is None and out is not None and self._factors[0].dtype == out.dtype:
            # A reused buffer spares the page faults of a fresh Dg×Df allocation.
            return torch.mm(*self._factors, out=out)
        if self._W is None:
            self._W = torch.mm(*self._factors)
        if self._W.dtype != self._dtype:
            self._W = self._W.to(self._dtype)
        return self._W if out is None else out.copy_(self._W)

    @property
    def W(self) -> Tensor:
        return self.projection()


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on (F, G), with a backward that refuses to be differentiated again."""

    @staticmethod
    def forward(ctx, F: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        return F.clone(), G.clone()

    @staticmethod
    @first_order_only
    def backward(ctx, gF: Tensor, gG: Tensor) -> tuple[Tensor, Tensor]:
        return gF, gG


def _spectral(
    Fd: Tensor,
    Gd: Tensor,
    K: Tensor,
    spec: Spectrum,
    lam: float,
    rule: str,
    sigma_THR: float,
    sigma_MIN: float,
    in_dtype: torch.dtype,
):
    """(f_r, h, sens) with autograd through the eigendecomposition, for the general case."""
    B, Dg = Gd.shape
    if spec.primal:
        evals, V = torch.linalg.eigh(K)
    else:
        evals, U = torch.linalg.eigh(K)
    top = evals.detach().max().clamp_min(0)
    nonzero = evals.detach() > _zero_tol(top, max(B, Dg), K.dtype, in_dtype)
    evals = evals[nonzero]
    s = evals.clamp_min(0).sqrt()
    smax = top.sqrt()
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


def solve_batch(
    F: Tensor,
    G: Tensor,
    rule: str = "paper",
    sigma_THR: float = 0.0,
    sigma_MIN: float = 0.0,
    need_grad: bool | None = None,
) -> BatchSolution:
    """Solve one training batch exactly: λ⁺, the residual f_r and the batch projection W.

    Gradients of ``f_r`` are exact, including the dependence of λ⁺ on F and G, dλ⁺ = −∂h / h'
    by the implicit function theorem (h: the secular function at the fixed λ⁺). The common case
    (λ⁺ > 0, thresholds inactive) has that backward written out (:class:`_DualRidge`,
    :class:`_PrimalRidge`); otherwise λ⁺ is re-entered as λ⁺ − (h − h̄)/h'(λ⁺) with h evaluated
    with autograd and h̄ its detached value, whose value is λ⁺ and whose gradient is dλ⁺.

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
    if not need_grad:
        F, G = F.detach(), G.detach()
    primal = G.shape[0] > G.shape[1]
    sol = _fast(F, G, rule, sigma_THR, need_grad)
    if sol is not None:
        return sol
    # Here λ⁺ = 0 or the thresholds changed the spectrum: the Gram in the solve dtype, as these
    # paths use its eigenvectors or sit at its round-off.
    dt = solve_dtype(F.device)
    if need_grad:
        # The first derivative below is exact, the second is not (λ⁺ and the sensitivity enter
        # as constants): the inputs pass a gate that makes a double backward raise, as on the
        # fast path.
        F, G = _FirstOrderOnly.apply(F, G)
    K = gram(G.to(dt), primal)
    spec = batch_spectrum(F, G, sigma_THR, sigma_MIN, K=K)
    d, a = secular_weights(spec, rule)
    lam = secular_root(d, a)
    live = (a > 0) & (d > 0)
    dphi = -2.0 * float(np.sum(a[live] / (d[live] + lam) ** 3))
    W = projection_from_spectrum(G, spec, lam)
    if not need_grad:
        return BatchSolution(residual(F, spec, lam), lam, W)

    f_r, h, sens = _spectral(F.to(dt), G.to(dt), K, spec, lam, rule, sigma_THR, sigma_MIN, G.dtype)
    if lam > 0:
        # δ has value 0 and carries dλ⁺ = −∂h / φ'(λ⁺).
        delta = -(h - h.detach()) / dphi
        f_r = f_r + delta * sens
    return BatchSolution(f_r.to(F.dtype), lam, W)
