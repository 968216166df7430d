"""Gradient-informed init: the bases A, B from the SVD of each target layer's loss gradient."""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .layer import GiVALinear, random_orthonormal
from .model import get_config, giva_layers
from .rsvd import randomized_svd

# A singular value below this fraction of the largest one counts as "no information".
RANK_DEFICIENT_RTOL = 1e-6


def model_loss(model: nn.Module, batch):
    """The loss of a Hugging Face style model: model(**batch).loss, model(*batch).loss or model(batch).loss."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if getattr(out, "loss", None) is None:
        raise TypeError(f"the model's output ({type(out).__name__}) has no .loss; pass "
                        "loss_fn=lambda model, batch: ... to init_bases")
    return out.loss


@contextmanager
def _frozen_eval(model: nn.Module, layers: dict[str, GiVALinear]):
    """Eval mode, no parameter requiring grad, adapters at zero; everything restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    vectors = [(layer, layer.lambda_s.detach().clone(), layer.lambda_o.detach().clone())
               for layer in layers.values()]
    model.eval()
    model.requires_grad_(False)
    for layer in layers.values():
        layer.reset_vectors()
    try:
        yield
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for layer, lambda_s, lambda_o in vectors:
                layer.lambda_s.copy_(lambda_s)
                layer.lambda_o.copy_(lambda_o)


def collect_gradients(model: nn.Module, layers: dict[str, GiVALinear], batches: Iterable,
                      num_batches: int, loss_fn=None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Mean over ``num_batches`` batches of dL/dW for each layer, as fp32 (out, in) tensors.

    Each layer's output gets a zero-valued probe that requires grad, and torch.autograd.grad takes
    dL/dy at the outputs; G += g^T x is formed from the layer's own input. No parameter requires grad
    meanwhile, so no weight gradient is computed and no .grad is allocated anywhere.
    """
    grads = {name: torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32,
                               device=layer.base.weight.device) for name, layer in layers.items()}
    records: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook_for(name):
        def hook(module, inputs, output):
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            output = output + probe
            records.append((name, inputs[0].detach(), output))
            return output
        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    seen = 0
    try:
        bar = tqdm(itertools.islice(batches, num_batches), total=num_batches,
                   desc="giva init: gradients", disable=not progress)
        for seen, batch in enumerate(bar, start=1):
            records.clear()
            with torch.enable_grad():
                loss = loss_fn(model, batch) if loss_fn is not None else model_loss(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"the loss must be a scalar tensor, got {shape} (batch {seen})")
                if not loss.requires_grad:
                    raise ValueError(f"the loss of batch {seen} has no grad: it does not depend on any "
                                     "GiVA target layer (or was computed under torch.no_grad)")
                outputs = [out for _, _, out in records]
                dys = torch.autograd.grad(loss, outputs, allow_unused=True)
            for (name, x, _), dy in zip(records, dys):
                if dy is None:
                    continue
                x2 = x.reshape(-1, x.shape[-1]).float()
                dy2 = dy.reshape(-1, dy.shape[-1]).float()
                if not torch.isfinite(dy2).all():
                    raise FloatingPointError(f"non-finite gradient at the output of layer {name!r} "
                                             f"(batch {seen})")
                if not torch.isfinite(x2).all():
                    raise FloatingPointError(f"non-finite input to layer {name!r} (batch {seen})")
                grads[name].addmm_(dy2.t(), x2)
            records.clear()
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("init_bases got an empty batch iterable")
    for g in grads.values():
        g.div_(seen)
    return grads


def _random_bases(layer: GiVALinear, generator: torch.Generator):
    return (random_orthonormal(layer.r, layer.in_features, generator),
            random_orthonormal(layer.out_features, layer.r, generator), None)


def _bases_from_gradient(name: str, grad: torch.Tensor, r: int, mode: str,
                         generator: torch.Generator, niter: int):
    """A (r, in) and B (out, r) from grad = U S V^T as init_mode says; warns if rank-deficient."""
    out_features, in_features = grad.shape
    k = 2 * r if mode == "VrU2r" else r
    u, s, v = randomized_svd(grad, k, niter=niter, generator=generator)
    informative = int((s > s[0] * RANK_DEFICIENT_RTOL).sum())
    if informative < k:
        warnings.warn(f"giva init: layer {name!r} has a gradient with only {informative} informative "
                      f"directions but {mode} uses {k}; the rest of its basis is an arbitrary "
                      "orthonormal completion", RuntimeWarning, stacklevel=3)
    A = v[:, :r].t()
    if mode == "VrU2r":
        B = u[:, r:2 * r]
    elif mode == "VrUr":
        B = u[:, :r]
    else:  # "Vr"
        B = random_orthonormal(out_features, r, generator, grad.dtype, grad.device)
    return A, B, s


def init_bases(model: nn.Module, batches: Iterable | None = None, loss_fn=None, *,
               num_batches: int | None = None, init_mode: str | None = None,
               on_zero_grad: str = "error", niter: int = 4, progress: bool = True) -> dict:
    """Set every GiVA layer's bases from the loss gradient at the current (pretrained) weights.

    Runs ``num_batches`` (default: config.grad_batches) batches from ``batches`` with the adapters at
    zero, averages each target's gradient G = dL/dW, and sets A, B from G's truncated SVD as the
    init mode says (default: config.init_mode; "random" needs no batches). The loss is
    ``loss_fn(model, batch)`` or the model's own ``.loss``. Finally lambda_s = 1, lambda_o = 0.

    A layer whose gradient is exactly zero (not reached by the loss) is an error unless
    ``on_zero_grad="random"``, which gives it random orthonormal bases with a warning. Nothing in the
    model changes unless every layer succeeds. Returns {layer name: singular values used}.
    """
    config = get_config(model)
    layers = giva_layers(model)
    mode = init_mode or config.init_mode
    if on_zero_grad not in ("error", "random"):
        raise ValueError(f"on_zero_grad must be 'error' or 'random', got {on_zero_grad!r}")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"GiVA layer {merged[0]!r} is merged; unmerge the model before init_bases")
    needed = config.rank_needed(mode)
    for name, layer in layers.items():
        if needed > min(layer.in_features, layer.out_features):
            raise ValueError(f"init mode {mode} needs rank {needed} but layer {name!r} is "
                             f"{layer.out_features}x{layer.in_features}")
    generator = torch.Generator().manual_seed(config.seed)
    if mode == "random":
        new = {name: _random_bases(layer, generator) for name, layer in layers.items()}
    else:
        if batches is None:
            raise ValueError(f"init mode {mode} needs batches to take the gradient from")
        count = num_batches or config.grad_batches
        with _frozen_eval(model, layers):
            grads = collect_gradients(model, layers, batches, count, loss_fn, progress)
        new = {}
        for name, grad in grads.items():
            if not grad.any():
                if on_zero_grad == "error":
                    raise ValueError(f"layer {name!r} got an all-zero gradient (the loss does not reach "
                                     "it); pass on_zero_grad='random' to give it random bases")
                warnings.warn(f"giva init: layer {name!r} got an all-zero gradient; using random "
                              "orthonormal bases", RuntimeWarning, stacklevel=2)
                new[name] = _random_bases(layers[name], generator)
            else:
                new[name] = _bases_from_gradient(name, grad, layers[name].r, mode, generator, niter)
    for name, (A, B, _) in new.items():
        layers[name].set_bases(A, B)
    return {name: s for name, (_, _, s) in new.items()}
