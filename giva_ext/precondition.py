"""Preconditioned gradient bases: the SVD of D_g^-1 G D_x^-1 instead of G.

A layer's gradient G = sum_t g_t^T x_t scales every input feature j by the size of x_j and every
output feature i by the size of g_i. Transformer activations have a few outlier features (in
all-MiniLM-L6-v2 some inputs have an RMS 30x the median), so the top singular vectors of G sit
on those few features: A ends up spanning a handful of coordinates. An Adam-style optimiser
divides each weight's gradient by its RMS, about rms(g_i) * rms(x_j) for a linear layer, so the
first step full fine-tuning takes is D_g^-1 G D_x^-1 with D_x = diag(rms(x_j)) and
D_g = diag(rms(g_i)). precondition="rms" takes the bases from the SVD of that matrix.

The RMS of each feature comes from the tokens of the first gradient batch (summed over all
processes under torch.distributed), so every batch after it is scaled by the same diagonal and
the streamed sketches stay sketches of one matrix. Each RMS is floored by RMS_FLOOR times the
layer's overall RMS (over all its features), so a feature that is (nearly) zero in that batch is
boosted at most 1 / RMS_FLOOR times more than a typical one, not without bound.
"""
from __future__ import annotations

import torch

PRECONDITIONERS = ("none", "rms")
RMS_FLOOR = 0.5


class FeatureScales:
    """The per-feature scales of one layer: 1 / (rms + floor) for its input and output gradient."""

    def __init__(self, in_features: int, out_features: int, device):
        # Sums of squares over the first batch's tokens and the token count, kept until finished.
        self.sums = torch.zeros(in_features + out_features + 1, dtype=torch.float64, device=device)
        self.in_features = in_features
        self.inv_in: torch.Tensor | None = None
        self.inv_out: torch.Tensor | None = None

    def add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one batch's tokens: x (T, in), g (T, out)."""
        self.sums[:self.in_features] += x.double().pow(2).sum(0)
        self.sums[self.in_features:-1] += g.double().pow(2).sum(0)
        self.sums[-1] += x.shape[0]

    def finish(self) -> None:
        """Turn the sums (already summed over processes) into inverse scales."""
        count = self.sums[-1].clamp_min(1.0)
        self.inv_in = _inverse_rms(self.sums[:self.in_features] / count)
        self.inv_out = _inverse_rms(self.sums[self.in_features:-1] / count)

    def apply(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x D_x^-1 and g D_g^-1, in their own dtypes."""
        return x * self.inv_in.to(x.dtype), g * self.inv_out.to(g.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"inv_in": self.inv_in, "inv_out": self.inv_out}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.inv_in = tensors["inv_in"].to(self.sums)
        self.inv_out = tensors["inv_out"].to(self.sums)


def _inverse_rms(mean_square: torch.Tensor) -> torch.Tensor:
    overall = mean_square.mean().sqrt()
    if overall == 0:  # the layer got no signal in the first batch: leave its features unscaled
        return torch.ones_like(mean_square)
    return 1.0 / (mean_square.sqrt() + RMS_FLOOR * overall)
