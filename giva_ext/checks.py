"""check_finite: an optional guard that stops training at the first GiVA layer where NaN or Inf shows.

A diverging run wastes hours before a NaN loss is noticed, and the loss does not say where the NaN
came from. Inside ``with check_finite(model):`` every GiVA layer checks, in forward, its input and
its output, and in backward, the gradient at its output and the gradients of its trainable vectors.
The first check that fails raises FloatingPointError naming the layer and what was non-finite, so
the error points at the layer where the values first went bad: in forward the first layer in
execution order, in backward the first in backward order. Each check sums a whole tensor (and on
CUDA waits for it), so this is a debugging aid, not something to leave on.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .layer import GiVALinear


def maybe_non_finite(tensors) -> bool:
    """False when every tensor (None skipped) is surely finite: one sum per tensor (no boolean
    copy; ~6x cheaper than isfinite().all() on MiniLM's activations) and one host sync for the lot.
    NaN or Inf anywhere makes the total NaN or Inf; True can also mean that finite values summed
    past the range, so callers then look element by element before raising."""
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
            for t in tensors if t is not None and t.numel()]
    return bool(sums) and not bool(torch.isfinite(torch.stack(sums).sum()))


def _where(t: torch.Tensor) -> str | None:
    """'NaN' or 'Inf' if t holds one (NaN first), else None."""
    if not maybe_non_finite([t]):
        return None
    if torch.isnan(t).any():
        return "NaN"
    if torch.isinf(t).any():
        return "Inf"
    return None


def _forward_check(name: str, active: list[bool]):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        bad = _where(x)
        if bad:
            raise FloatingPointError(f"check_finite: {bad} in the input of GiVA layer {name!r}: it comes "
                                     "from the batch or a module before this layer")
        bad = _where(output)
        if bad:
            raise FloatingPointError(f"check_finite: {bad} in the output of GiVA layer {name!r} (its "
                                     "input is finite: check its base weight, bias and adapter vectors)")
        if output.requires_grad:
            what = f"the gradient at the output of GiVA layer {name!r}"
            output.register_hook(_grad_check(what, active))
    return hook


def _grad_check(what: str, active: list[bool]):
    def hook(grad):
        bad = _where(grad) if active[0] else None
        if bad:
            raise FloatingPointError(f"check_finite: {bad} in {what} (backward)")
    return hook


@contextmanager
def check_finite(model: nn.Module):
    """Raise FloatingPointError at the first GiVA layer whose input, output, output gradient or
    vector gradient holds NaN or Inf, while the block runs; the hooks are removed on exit.

        with giva_ext.check_finite(model):
            loss = model(**batch).loss
            loss.backward()
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GiVALinear)}
    if not layers:
        raise ValueError("check_finite: the model has no GiVA layers")
    active = [True]  # output-gradient hooks outlive the block on tensors made in it: they go inert
    handles = []
    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(_forward_check(name, active), with_kwargs=True))
            for pname, p in layer.named_parameters():
                if p.requires_grad:
                    what = f"the gradient of {pname!r} of GiVA layer {name!r}"
                    handles.append(p.register_hook(_grad_check(what, active)))
        yield model
    finally:
        active[0] = False
        for handle in handles:
            handle.remove()
