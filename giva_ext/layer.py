"""GiVALinear: a frozen linear layer plus the GiVA adapter diag(lambda_o) B diag(lambda_s) A."""
from __future__ import annotations

import torch
from torch import nn

from . import reference
from .functional import giva_linear


def random_orthonormal(rows: int, cols: int, generator: torch.Generator | None = None,
                       dtype=torch.float32, device=None) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    tall = rows >= cols
    g = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))  # unique Q: a fixed seed gives one answer on every LAPACK
    q = q if tall else q.t()
    return q.to(dtype=dtype, device=device).contiguous()


class GiVALinear(nn.Module):
    """Drop-in for nn.Linear with a GiVA adapter.

    ``y = base(x) + lambda_o * (B (lambda_s * (A x)))``.  ``base`` is a frozen nn.Linear; A (r, in)
    and B (out, r) are frozen buffers (random orthonormal until ``init_bases`` sets them from the
    gradient); lambda_s (r, ones) and lambda_o (out, zeros) are the only parameters that train, so a
    new layer computes exactly what ``base`` computes.

    Build it standalone, ``GiVALinear(in_features, out_features, r, bias=True)``, or around an
    existing layer, ``GiVALinear.from_linear(linear, r)``.
    """

    def __init__(self, in_features: int, out_features: int, r: int, bias: bool = True,
                 dropout: float = 0.0, device=None, dtype=None, *, base: nn.Linear | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        check_rank(r, in_features, out_features)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if base is None:
            base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        elif (base.in_features, base.out_features) != (in_features, out_features):
            raise ValueError(f"base is {base.out_features}x{base.in_features}, "
                             f"expected {out_features}x{in_features}")
        base.requires_grad_(False)
        self.base = base
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.dropout = dropout
        self.merged = False
        w = base.weight
        self.register_buffer("A", random_orthonormal(r, in_features, generator, w.dtype, w.device))
        self.register_buffer("B", random_orthonormal(out_features, r, generator, w.dtype, w.device))
        self.lambda_s = nn.Parameter(torch.ones(r, dtype=w.dtype, device=w.device))
        self.lambda_o = nn.Parameter(torch.zeros(out_features, dtype=w.dtype, device=w.device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, dropout: float = 0.0,
                    generator: torch.Generator | None = None) -> "GiVALinear":
        """Wrap ``linear`` (which is frozen, not copied) in a GiVA layer of rank ``r``."""
        return cls(linear.in_features, linear.out_features, r, dropout=dropout, base=linear,
                   generator=generator)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def reset_vectors(self) -> None:
        """lambda_s = 1, lambda_o = 0: the adapter adds exactly zero."""
        with torch.no_grad():
            self.lambda_s.fill_(1.0)
            self.lambda_o.zero_()

    def set_bases(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Replace the frozen bases (shapes (r, in) and (out, r)) and reset the vectors."""
        if tuple(A.shape) != tuple(self.A.shape) or tuple(B.shape) != tuple(self.B.shape):
            raise ValueError(f"bases must be A {tuple(self.A.shape)} and B {tuple(self.B.shape)}, "
                             f"got {tuple(A.shape)} and {tuple(B.shape)}")
        if self.merged:
            raise RuntimeError("cannot change the bases of a merged layer; unmerge it first")
        with torch.no_grad():
            self.A.copy_(A)
            self.B.copy_(B)
        self.reset_vectors()

    def delta_weight(self) -> torch.Tensor:
        """diag(lambda_o) B diag(lambda_s) A, computed in fp32 and returned in the weight's dtype."""
        f32 = [t.detach().float() for t in (self.A, self.B, self.lambda_s, self.lambda_o)]
        return reference.delta_weight(*f32).to(self.base.weight.dtype)

    def merge(self) -> None:
        """Fold the adapter into base.weight; forward then runs the plain linear layer."""
        if self.merged:
            raise RuntimeError("layer is already merged")
        with torch.no_grad():
            self.base.weight.add_(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge (exact up to the weight dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        with torch.no_grad():
            self.base.weight.sub_(self.delta_weight())
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return giva_linear(x, self.base.weight, self.base.bias, self.A, self.B, self.lambda_s,
                           self.lambda_o, self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"bias={self.base.bias is not None}, dropout={self.dropout}, merged={self.merged}")


def check_rank(r: int, in_features: int, out_features: int, needed: int | None = None,
               where: str = "layer") -> None:
    """Raise ValueError unless 0 < r and ``needed`` (default r) <= min(in, out)."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"{where}: rank r must be a positive int, got {r!r}")
    needed = r if needed is None else needed
    if needed > min(in_features, out_features):
        raise ValueError(f"{where}: needs rank {needed} but the layer is {out_features}x{in_features} "
                         f"(rank at most {min(in_features, out_features)})")
