"""A float64 reference for the RegBN batch solution, written independently of regbn.solver.

It uses the thin SVD of G and finds λ⁺ by plain bisection, so it shares no code path with the
library's Gram/eigh factorisation or its Newton iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ref:
    lam: float
    W: torch.Tensor  # (Dg, Df)
    f_r: torch.Tensor  # (B, Df)


def reference(F: torch.Tensor, G: torch.Tensor, rule: str = "paper", sigma_THR: float = 0.0,
              sigma_MIN: float = 0.0, rtol: float | None = None) -> Ref:
    """The exact batch solution; singular values at or below ``rtol * max(s)`` are zero.

    The default ``rtol`` is the library's definition of a zero singular value: the larger of
    NumPy's ``matrix_rank`` rule in the precision G came in, max(B, Dg)·ε, and √(max(B, Dg)·ε₆₄),
    the level below which a float64 Gram matrix cannot resolve a singular value.
    """
    if rtol is None:
        n = max(G.shape[0], G[0].numel())
        eps = torch.finfo(torch.promote_types(G.dtype, torch.float32)).eps
        rtol = max(n * eps, (n * torch.finfo(torch.float64).eps) ** 0.5)
    F, G = F.double().reshape(F.shape[0], -1), G.double().reshape(G.shape[0], -1)
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    smax = float(s.max()) if s.numel() else 0.0
    nonzero = s > rtol * smax
    U, s, V = U[:, nonzero], s[nonzero], Vh[nonzero].T
    se = torch.where(s > sigma_THR * smax, s, torch.full_like(s, sigma_MIN))
    live = se > 0
    U, s, se, V = U[:, live], s[live], se[live], V[:, live]
    C = U.T @ F

    def phi(lam: float) -> float:
        if rule == "paper":
            return float((se**2 * (C**2).sum(1) / (se**2 + lam) ** 2).sum())
        return float(((se**2 / (se**2 + lam)) ** 2).sum())

    lam = 0.0
    if s.numel() and phi(0.0) > 1.0:
        lo, hi = 0.0, 1.0
        while phi(hi) > 1.0:
            hi *= 2.0
        for _ in range(300):
            mid = 0.5 * (lo + hi)
            if phi(mid) > 1.0:
                lo = mid
            else:
                hi = mid
        lam = 0.5 * (lo + hi)
    W = V @ ((se / (se**2 + lam))[:, None] * C)
    return Ref(lam, W, F - G @ W)


def ridge_direct(F: torch.Tensor, G: torch.Tensor, lam: float) -> torch.Tensor:
    """W(λ) = (GᵀG + λI)⁻¹ GᵀF by a direct solve (λ > 0)."""
    F, G = F.double().reshape(F.shape[0], -1), G.double().reshape(G.shape[0], -1)
    A = G.T @ G + lam * torch.eye(G.shape[1], dtype=torch.float64)
    return torch.linalg.solve(A, G.T @ F)
