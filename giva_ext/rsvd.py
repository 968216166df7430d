"""Randomized truncated SVD (Halko, Martinsson & Tropp 2011): range finder + power iterations."""
from __future__ import annotations

import torch


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def randomized_svd(matrix: torch.Tensor, k: int, oversample: int = 8, niter: int = 4,
                   generator: torch.Generator | None = None):
    """Top-k singular triplets of ``matrix`` (m x n): returns U (m, k), S (k,), V (n, k).

    The sketch has k + oversample columns; each power iteration re-orthonormalises, so small
    singular values are not lost to round-off. The small SVD runs in float64. ``generator`` (a CPU
    generator) makes the result deterministic.
    """
    m, n = matrix.shape
    if not 0 < k <= min(m, n):
        raise ValueError(f"randomized_svd: k must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {k}")
    width = min(k + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32)
    omega = omega.to(device=matrix.device, dtype=matrix.dtype)
    q = _orthonormal(matrix @ omega)
    for _ in range(niter):
        q = _orthonormal(matrix @ _orthonormal(matrix.t() @ q))
    small = (q.t() @ matrix).double()
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = q @ u_small[:, :k].to(q.dtype)
    return u, s[:k].to(matrix.dtype), vh[:k].t().to(matrix.dtype)
