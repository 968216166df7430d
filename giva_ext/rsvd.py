"""Randomized SVD: of a dense matrix (Halko, Martinsson & Tropp 2011) and of a matrix known only
through streamed linear sketches (Tropp, Yurtsever, Udell & Cevher 2017), docs/design.md §2.

The heavy steps are the ops sketch_update and rsvd: native kernels when giva_ext._C has one for
the tensors' device and dtype, else giva_ext.reference (same math).
"""
from __future__ import annotations

import hashlib

import torch

from . import ops, reference


def sketch_update(x, g, omega, psi, Y, Z):
    """(Y + g^T (x omega), Z + (g psi^T)^T x): see reference.sketch_update for the shapes."""
    if reference.sketch_accumulator_dtype(x.dtype) != Y.dtype:  # e.g. float64 data, float32 sketch
        x, g = x.to(Y.dtype), g.to(Y.dtype)
    if ops.supports_sketch(x, g):
        return torch.ops.giva.sketch_update(x, g, omega, psi, Y, Z)
    if x.dtype != g.dtype:  # e.g. under autocast; the reference converts block by block anyway
        g = g.to(x.dtype)
    return reference.sketch_update(x, g, omega, psi, Y, Z)


def _rsvd(A, omega, k, niter):
    if ops.supports_rsvd(A):
        return torch.ops.giva.rsvd(A, omega, k, niter)
    return reference.rsvd(A, omega, k, niter)


def randomized_svd(matrix: torch.Tensor, k: int, oversample: int = 8, niter: int = 4,
                   generator: torch.Generator | None = None):
    """Top-k singular triplets of ``matrix`` (m, n), or of each matrix of a batch (L, m, n):
    returns U (..., m, k), S (..., k), V (..., n, k) in the matrix's dtype (float32 or float64;
    others are computed in float32).

    A drop-in for torch.svd_lowrank(matrix, q=k + oversample, niter) that returns only the top k.
    The test matrix has k + oversample columns (at most min(m, n)); every power iteration
    re-orthonormalises (CholeskyQR2 in float64, Householder QR when that fails), so small singular
    values are not lost to round-off; the small SVD runs in float64. ``generator`` (a CPU
    generator) makes the result deterministic.
    """
    if matrix.dim() not in (2, 3):
        raise ValueError(f"randomized_svd: expected a matrix (m, n) or a batch (L, m, n), got shape "
                         f"{tuple(matrix.shape)}")
    *batch, m, n = matrix.shape
    if not 0 < k <= min(m, n):
        raise ValueError(f"randomized_svd: k must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {k}")
    if not torch.isfinite(matrix).all():
        raise ValueError("randomized_svd: the matrix holds NaN or Inf")
    dtype = matrix.dtype if matrix.dtype in (torch.float32, torch.float64) else torch.float32
    width = min(k + oversample, m, n)
    omega = torch.randn(*batch, n, width, generator=generator, dtype=torch.float32)
    u, s, v = _rsvd(matrix.to(dtype), omega.to(device=matrix.device, dtype=dtype), k, niter)
    return u.to(matrix.dtype), s.to(matrix.dtype), v.to(matrix.dtype)


def _layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name), the same in every process (unlike hash())."""
    digest = hashlib.sha256(f"giva-sketch/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class GradientSketch:
    """Streamed sketches of G = sum_t g_t^T x_t (out x in) for one layer, and its top singular
    triplets from them, without ever forming G (docs/design.md §2).

    Pass 1 keeps Y = G Omega (out x k) and Z = Psi G (k' x in) with Gaussian Omega (in x k) and
    Psi (k' x out), k' = 2k + 1 (at most out). The test matrices come from a generator seeded by
    (seed, name) and are drawn again when needed rather than stored, so the state is Y and Z only,
    and every process draws the same ones. One pass ends in the Tropp et al. (2017)
    reconstruction G ~ Q X, Q = orth(Y), X = (Psi Q)^+ Z.

    Each further pass multiplies G from the other side by the previous pass's orthonormalised
    sketches: Psi <- orth(Y)^T and Omega <- orth(Z^T) (subspace iteration; both chains advance in
    the same pass), and the last pass keeps only Z = Q^T G, whose SVD gives the triplets of the
    exact projection Q Q^T G. So the basis Q of pass p carries p - 1 factors of the spectrum.

    Sketches are linear in G: updates may come in any order and split, and sums of the state
    tensors over processes are the sketch of the union of their data.
    """

    def __init__(self, name: str, out_features: int, in_features: int, k: int, passes: int,
                 seed: int, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.name, self.out_features, self.in_features = name, out_features, in_features
        self.k, self.k_co = k, min(2 * k + 1, out_features)
        self.passes, self.seed = passes, seed
        self.device, self.dtype = torch.device(device), dtype
        self.pass_index = 0
        # Later passes' test matrices (orthonormal, derived from data); pass 1 draws Gaussians.
        self.omega: torch.Tensor | None = None
        self.psi: torch.Tensor | None = None
        # One pass needs k' > k for the reconstruction; later passes advance both chains, as wide.
        self.width = k if passes == 1 else self.k_co
        self.Y = torch.zeros(out_features, self.width, dtype=dtype, device=self.device)
        self.Z = torch.zeros(self.k_co, in_features, dtype=dtype, device=self.device)

    @staticmethod
    def floats(out_features: int, in_features: int, k: int) -> int:
        """Numbers of the pass-1 state (Y and Z): what the sketch holds instead of out x in."""
        return out_features * k + min(2 * k + 1, out_features) * in_features

    def _gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 1's Omega (in, k) and Psi (k', out): drawn on the CPU, so identical everywhere."""
        gen = torch.Generator().manual_seed(_layer_seed(self.seed, self.name))
        omega = torch.randn(self.in_features, self.width, generator=gen, dtype=self.dtype)
        psi = torch.randn(self.k_co, self.out_features, generator=gen, dtype=self.dtype)
        return omega.to(self.device), psi.to(self.device)

    def test_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gaussian() if self.pass_index == 0 else (self.omega, self.psi)

    def update(self, x: torch.Tensor, g: torch.Tensor, test_matrices=None) -> None:
        """Add the gradient g^T x of one batch: x (T, in), g (T, out), any floating dtype.
        ``test_matrices`` (from test_matrices()) saves drawing them again for each call."""
        omega, psi = test_matrices or self.test_matrices()
        self.Y, self.Z = sketch_update(x, g, omega, psi, self.Y, self.Z)

    def is_zero(self) -> bool:
        """After pass 1: G == 0 exactly (Gaussian sketches of a non-zero G are non-zero)."""
        return not (self.Y.any() or self.Z.any())

    def next_pass(self) -> None:
        """Start the next pass: new test matrices from the finished sketches, state reset."""
        if self.pass_index + 1 >= self.passes:
            raise RuntimeError(f"sketch of {self.name!r}: all {self.passes} passes are done")
        omega = reference.orthonormalize(self.Z.mT)
        self.psi = reference.orthonormalize(self.Y).mT.contiguous()
        self.pass_index += 1
        last = self.pass_index + 1 == self.passes
        self.omega = omega[:, :0] if last else omega  # the last pass needs only Z = Q^T G
        self.Y = self.Y.new_zeros(self.out_features, self.omega.shape[1])
        self.Z = self.Z.new_zeros(self.psi.shape[0], self.in_features)

    def sums(self) -> list[torch.Tensor]:
        """The accumulators, linear in the data: what an all_reduce adds up."""
        return [self.Y, self.Z]

    def state(self) -> dict[str, torch.Tensor]:
        """Everything that defines the sketch: the sums and, after pass 1, the test matrices."""
        tensors = {"Y": self.Y, "Z": self.Z}
        if self.pass_index > 0:
            tensors.update(omega=self.omega, psi=self.psi)
        return tensors

    def load_state(self, pass_index: int, tensors: dict[str, torch.Tensor]) -> None:
        self.pass_index = pass_index
        for key, value in tensors.items():
            setattr(self, key, value.to(device=self.device, dtype=self.dtype))

    def svd(self):
        """The top k triplets (U (out, k), S (k,), V (in, k)) of the sketched G, in float32."""
        if self.pass_index + 1 != self.passes:
            raise RuntimeError(f"sketch of {self.name!r}: pass {self.pass_index + 1} of "
                               f"{self.passes} is not the last")
        if self.passes == 1:
            q = reference.orthonormalize(self.Y).double()
            _, psi = self._gaussian()
            # X = (Psi Q)^+ Z through a Householder QR of Psi Q (k' x k, full column rank with
            # probability 1); linalg.lstsq's default CPU driver is not deterministic.
            qr_q, qr_r = torch.linalg.qr(psi.double() @ q)
            x = torch.linalg.solve_triangular(qr_r, qr_q.mT @ self.Z.double(), upper=True)
        else:
            q, x = self.psi.mT.double(), self.Z.double()  # Z = Q^T G exactly
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        k = self.k
        return (q @ u[:, :k]).float(), s[:k].float(), vh[:k].mT.float()
