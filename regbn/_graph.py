"""The RegBN training step as one graph: device-side decisions, no host read.

Under ``torch.compile`` (and CUDA-graph capture) :class:`regbn.RegBN` runs this step instead of
the eager one (:meth:`regbn.RegBN._train_step`), which reads the spectrum on the host once per
batch. Here every decision stays on the device:

- the Gram's spectrum is classified (zero, thresholded, live) with masks, as
  :func:`regbn._spectrum.classify` does on the host;
- λ⁺ is the root of the secular equation found by a fixed number of safeguarded Newton steps
  (:func:`secular_root_device`), enough to reach float64 precision from the start the eager solve
  uses; λ⁺ = 0 where φ(0) ≤ 1 is a ``torch.where``;
- a rejected batch (non-finite input, statistics or solution) changes no buffer: every update is
  masked by one device flag, and the layer's non-persistent ``rejected`` buffer records the reason
  for the next eager call (or :meth:`regbn.RegBN.check_status`) to raise.

The residual and W are spectral functions of the Gram K (f(K) = U diag(h(e)) Uᵀ). Their
gradients come from the Daleckii–Krein formula (d f(K) = U (Γ ∘ Uᵀ dK U) Uᵀ with
Γ the divided differences of h), added as terms whose value is zero (`_Spectral`, whose forward
computes nothing), so that autograd gives the
exact first-order gradient, λ⁺'s dependence on F and G included (implicit function theorem),
without differentiating through ``eigh``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ._autograd import first_order_only
from ._norms import run_norm
from ._spectrum import _input_eps, gram, solve_dtype

__all__ = [
    "NEWTON_STEPS",
    "REJECT_INPUT",
    "REJECT_SOLUTION",
    "batch_norm_step",
    "graph_solve",
    "secular_root_device",
    "write_statistics",
]

# Safeguarded Newton steps of the device-side secular solve (see secular_root_device).
NEWTON_STEPS = 16
# Codes of the ``rejected`` buffer: 0 none, 1 a non-finite input or statistic, 2 a non-finite
# solution (the inputs' scale overflowed the solve).
REJECT_INPUT = 1
REJECT_SOLUTION = 2


def secular_root_device(d: Tensor, a: Tensor, steps: int = NEWTON_STEPS) -> tuple[Tensor, Tensor]:
    """(λ⁺, φ'(λ⁺)) for φ(λ) = Σ a_i/(d_i + λ)² = 1 (0 when φ(0) ≤ 1), as 0-dim tensors.

    The same iteration as :func:`regbn._spectrum.secular_root` (Newton on 1 − φ^{-1/2} from
    max(√a − d), inside a bracket that bisects a step leaving it) run for a fixed number of
    steps with no host read. Terms with a_i = 0 or d_i = 0 count for nothing.
    """
    live = (a > 0) & (d > 0)
    a = torch.where(live, a, 0.0)
    dd = torch.where(live, d, 1.0)
    positive = (a / dd.square()).sum() > 1.0
    hi = a.sum().sqrt()
    lo = torch.zeros_like(hi)
    lam = torch.where(live, a.sqrt() - d, 0.0).amax().clamp(min=0.0)
    lam = torch.minimum(lam, hi)
    tiny = torch.finfo(d.dtype).tiny
    for _ in range(steps):
        q = a / (dd + lam).square()
        phi = q.sum().clamp(min=tiny)
        dphi = -2.0 * (q / (dd + lam)).sum()
        above = phi > 1.0
        lo = torch.where(above, lam, lo)
        hi = torch.where(above, hi, lam)
        step = -(1.0 - phi.rsqrt()) / (0.5 * phi.pow(-1.5) * dphi)
        new = lam + step
        inside = (new >= lo) & (new <= hi) & torch.isfinite(new)
        new = torch.where(inside, new, 0.5 * (lo + hi))
        lam = torch.where(phi == 1.0, lam, new)
    lam = torch.where(positive, lam, 0.0)
    slope = -2.0 * (a / (dd + lam).pow(3)).sum()
    return lam, slope


def _divided(e: Tensor, h: Tensor, hp: Tensor) -> Tensor:
    """Γ_ij = (h_i − h_j)/(e_i − e_j), (h'_i + h'_j)/2 where e_i and e_j coincide to within
    eigh's round-off, which is absolute (about n·ε·max e): two small eigenvalues closer than
    that are one cluster, and their difference quotient would be rounding noise."""
    de = e[:, None] - e[None, :]
    tol = 64 * e.shape[0] * torch.finfo(e.dtype).eps * e.abs().amax()
    close = de.abs() <= tol
    dh = h[:, None] - h[None, :]
    return torch.where(close, 0.5 * (hp[:, None] + hp[None, :]), dh / torch.where(close, 1.0, de))


class _Spectral(torch.autograd.Function):
    """Zero in value; in K, the gradient of the spectral part of a matrix function applied to X.

    For f(K) = U diag(h(e)) Uᵀ, d f(K) X = U (Γ ∘ UᵀdKU) Uᵀ X (Daleckii–Krein, Γ the divided
    differences of h), so ⟨gY, d f(K) X⟩ = ⟨dK, U (Γ ∘ (UᵀgY)(UᵀX)ᵀ) Uᵀ⟩. Added to the value
    U diag(h) UᵀX, it makes autograd's gradient in K exact without differentiating ``eigh``;
    its forward computes nothing (a zero-valued product would cost four GEMMs of U's size).
    ``Y`` is UᵀX, detached.
    """

    @staticmethod
    def forward(ctx, K: Tensor, U: Tensor, gamma: Tensor, Y: Tensor) -> Tensor:
        ctx.save_for_backward(U, gamma, Y)
        return Y.new_zeros(U.shape[0], Y.shape[1]).to(K.dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, gY: Tensor):
        U, gamma, Y = ctx.saved_tensors
        A = (U.mT @ gY.to(U.dtype)) @ Y.mT
        return U @ (gamma * A) @ U.mT, None, None, None


def graph_solve(
    F: Tensor, G: Tensor, rule: str, sigma_THR: float, sigma_MIN: float, w_dtype: torch.dtype,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(f_r, W_batch, λ⁺, ok) for one batch, with no host read.

    F (B×Df) and G (B×Dg) are the rows the projection acts on. ``ok`` is False where the Gram
    is not finite (the batch is to be rejected; the values are then meaningless but finite
    where possible). f_r is differentiable in F and G when ``need_grad``; W_batch is detached,
    in ``w_dtype``; λ⁺ is a 0-dim tensor in the solve dtype.
    """
    dt = solve_dtype(F.device)
    B, Dg = G.shape
    n, primal = max(B, Dg), B > Dg
    F64, G64 = F.to(dt), G.to(dt)
    if not need_grad:
        F, G, F64, G64 = F.detach(), G.detach(), F64.detach(), G64.detach()
    # The B×B Gram in the inputs' precision (float32 at least), as the eager step's first pass:
    # float64 GEMMs cost twice float32's. The Dg×Dg (primal) Gram is small: the solve dtype, as
    # in eager. Either way its backward is one product (regbn._autograd.Gram).
    wd = dt if primal else torch.promote_types(G.dtype, torch.float32)
    K_in = gram(G.to(wd), primal)
    K = K_in.to(dt)
    Kd = K.detach()
    finite = torch.isfinite(Kd).all()
    # A non-finite Gram (an input or its scale overflowed) would make eigh raise: decompose 0.
    Kd = torch.where(finite, Kd, 0.0)
    e, U = torch.linalg.eigh(Kd)
    e = e.clamp(min=0.0)

    # classify (regbn._spectrum.classify): zero, kept, thresholded, live.
    top = e.amax()
    tol = top * max(n * torch.finfo(wd).eps, (n * _input_eps(G.dtype)) ** 2)
    nz = e > tol
    s = torch.where(nz, e, 0.0).sqrt()
    kept = nz & (s > sigma_THR * top.sqrt())
    s_eff = torch.where(kept, s, sigma_MIN)
    live = nz & (s_eff > 0)
    thr = live & ~kept  # thresholded to sigma_MIN > 0
    d = torch.where(live, s_eff.square(), 0.0)

    if primal:
        GtF = G64.mT @ F64
        Q = U.mT @ GtF.detach()  # VᵀGᵀF: row i is s_i c_i
        cn = Q.square().sum(dim=1) / torch.where(nz, e, 1.0)
    else:
        C = U.mT @ F64.detach()
        cn = C.square().sum(dim=1)
    a = d * cn if rule == "paper" else d.square()
    lam, slope = secular_root_device(d, a)
    lam = lam.detach()

    # n(e) = s̃/(s (s̃² + λ)): W = Gᵀ N(GGᵀ) F (dual) or N(GᵀG) GᵀF (primal). Kept: 1/(e + λ).
    es = torch.where(nz, e, 1.0)
    sq = es.sqrt()
    den_t = sigma_MIN**2 + lam
    inv = (e + lam).reciprocal()
    zero = torch.zeros_like(e)
    nfun = torch.where(kept, inv, torch.where(thr, sigma_MIN / (sq * den_t), zero))
    nfun = torch.where(live, nfun, 0.0)
    dn = torch.where(kept, -inv.square(),
                     torch.where(thr, -sigma_MIN / (2 * sq * es * den_t), zero))
    dn_dlam = torch.where(kept, -inv.square(), torch.where(thr, -sigma_MIN / (sq * den_t**2), zero))
    both = kept[:, None] & kept[None, :]

    if primal:
        g_n = torch.where(both, -inv[:, None] * inv[None, :], _divided(e, nfun, dn))
        # W = N(K) GᵀF: the value through GᵀF, the gradient in K through _Spectral.
        W = (U * nfun) @ (U.mT @ GtF) + _Spectral.apply(K, U, g_n, Q)
        f_r = F64 - G64 @ W
        sens = -(G64 @ ((U * dn_dlam) @ Q)).detach()
        W_batch = W.detach().to(w_dtype)
    else:
        # f_r = U diag(r) UᵀF with r = 1 − e·n: λ/(e + λ) where kept, no cancellation.
        r = torch.where(kept, lam * inv, torch.where(thr, 1.0 - sigma_MIN * sq / den_t, 1.0))
        dr = torch.where(kept, -lam * inv.square(),
                         torch.where(thr, -sigma_MIN / (2 * sq * den_t), zero))
        g_r = torch.where(both, -lam * inv[:, None] * inv[None, :], _divided(e, r, dr))
        f_r = ((U * r) @ U.mT) @ F64 + _Spectral.apply(K, U, g_r, C)
        dr_dlam = torch.where(kept, e * inv.square(), torch.where(thr, sigma_MIN * sq / den_t**2,
                                                                  zero))
        # N F, the λ-sensitivity of f_r and (for the paper's rule) H F with h = e·n², whose
        # ‖W‖² = tr(Fᵀ H F), in one product: three thin GEMMs cost three times one.
        weights = [nfun, dr_dlam] + ([e * nfun.square()] if rule == "paper" and need_grad else [])
        rows = torch.cat([U * w for w in weights]) @ C
        X, sens = rows[:B], rows[B : 2 * B]
        W_batch = G.detach().to(w_dtype).mT @ X.to(w_dtype)

    if need_grad:
        # λ⁺ enters as λ⁺ + δ, δ = −(φ − φ̄)/φ'(λ⁺): value 0, gradient dλ⁺ (implicit function).
        if rule == "paper":
            if primal:
                phi = W.square().sum()
            else:
                # φ = tr(Fᵀ h(K) F): dφ = 2⟨H F, dF⟩ + ⟨d h(K) F, F⟩ (Daleckii–Krein), written
                # as zero-valued terms.
                # h = e/(e + λ)² where kept; σ_MIN²/(σ_MIN² + λ)², constant, where thresholded.
                h = torch.where(thr, sigma_MIN**2 / den_t**2, e * nfun.square())  # exact
                dh = torch.where(kept, (inv - 2 * e * inv.square()) * inv, zero)
                # Between kept values Γ_h = (λ² − e_i e_j)/((e_i + λ)²(e_j + λ)²) exactly.
                i2 = inv.square()
                g_h = torch.where(both, (lam.square() - e[:, None] * e[None, :]) * i2[:, None]
                                  * i2[None, :], _divided(e, h, dh))
                HF = rows[2 * B :]
                spectral = _Spectral.apply(K, U, g_h, C)
                phi = (2 * HF * (F64 - F64.detach()) + spectral * F64.detach()).sum()
        else:
            # φ = tr q(K), q = s̃⁴/(s̃² + λ)²: dφ = ⟨U diag(q') Uᵀ, dK⟩, q' = 2eλ/(e + λ)³ kept.
            dq = torch.where(kept, 2 * e * lam * inv.pow(3), zero)
            phi = ((U * dq) @ U.mT * (K - K.detach())).sum()
        delta = -(phi - phi.detach()) / torch.where(slope < 0, slope, -1.0)
        delta = torch.where(lam > 0, delta, 0.0)
        f_r = f_r + delta * sens
    ok = finite & torch.isfinite(lam)
    return f_r, W_batch, lam, ok


def batch_norm_step(norm: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    """(y, running_mean, running_var, num_batches_tracked): an input norm in training form.

    A BatchNorm updates copies of its statistics (returned, for :func:`write_statistics` to
    store where the batch is accepted); any other norm returns y alone.
    """
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return (run_norm(norm, x, True),)
    mean, var, tracked = norm.running_mean, norm.running_var, norm.num_batches_tracked
    assert mean is not None and var is not None and tracked is not None
    mean, var = mean.to(x.dtype, copy=True), var.to(x.dtype, copy=True)
    momentum = norm.momentum
    if momentum is None:  # a cumulative average; RegBN's own norms use 0.1
        momentum = 1.0 / (float(tracked) + 1.0)
    w = None if norm.weight is None else norm.weight.to(x.dtype)
    b = None if norm.bias is None else norm.bias.to(x.dtype)
    y = TF.batch_norm(x, mean, var, w, b, True, momentum, norm.eps)
    return y, mean, var, tracked + 1


def write_statistics(norm: nn.Module, new: list[Tensor], ok: Tensor) -> None:
    """Store the statistics of :func:`batch_norm_step` in ``norm`` where ``ok`` holds."""
    if not new:
        return
    for name, value in zip(("running_mean", "running_var", "num_batches_tracked"), new,
                           strict=True):
        live = getattr(norm, name)
        live.copy_(torch.where(ok, value.to(live.dtype), live))
