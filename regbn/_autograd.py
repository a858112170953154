"""The autograd Functions of the RegBN training step, each with its backward written out.

The forward values come from :mod:`regbn.solver`; these classes carry the exact first-order
gradients (λ⁺ enters through the implicit function theorem) and refuse second derivatives,
which the written-out backwards do not provide.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "SECOND_ORDER_MESSAGE",
    "DualRidge",
    "FirstOrderOnly",
    "Gram",
    "PrimalRidge",
    "first_order_only",
]

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


class Gram(torch.autograd.Function):
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


class DualRidge(torch.autograd.Function):
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


class PrimalRidge(torch.autograd.Function):
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


class FirstOrderOnly(torch.autograd.Function):
    """The identity on (F, G), with a backward that refuses to be differentiated again."""

    @staticmethod
    def forward(ctx, F: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        return F.clone(), G.clone()

    @staticmethod
    @first_order_only
    def backward(ctx, gF: Tensor, gG: Tensor) -> tuple[Tensor, Tensor]:
        return gF, gG
