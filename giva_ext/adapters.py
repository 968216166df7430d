"""Several named adapters on one model: add, switch, disable, delete, and mixed-adapter batches.

A model from ``apply_giva`` holds one adapter, "default" unless named otherwise. ``add_adapter``
adds more, each with its own config (rank, targets, init mode); ``init_bases``, ``save_adapter``,
training and merging act on the active adapter. The registry lives on the module apply_giva adapted:
``giva_adapters`` (name -> config, in the order that defines adapter ids) and
``giva_active_adapter``; every function here also takes a module that contains it (see
``giva_ext.model.adapted_module``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .config import GiVAConfig
from .layer import PER_THREAD, GiVALinear, UnknownAdapterError, check_adapter_name
from .model import (REGISTRY, _check_targets, _replace, activate, adapted_module, chunks_for,
                    find_targets, get_config, register_adapter, wrapped_layers)
from .quantized import QuantizedGiVALinear, layer_class


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters in id order (the order they were added)."""
    configs = vars(adapted_module(model)).get(REGISTRY)
    if configs:
        return list(configs)
    names = {}
    for layer in wrapped_layers(model).values():  # standalone GiVALinear layers: no registry
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter, or None when adapters are disabled."""
    owner = adapted_module(model)
    if REGISTRY in vars(owner):
        return owner.giva_active_adapter
    active = {layer.active_adapter for layer in wrapped_layers(model).values()} - {None}
    return active.pop() if len(active) == 1 else None


def _check_known(model: nn.Module, name: str) -> None:
    names = adapter_names(model)
    if name not in names:
        raise UnknownAdapterError(f"the model has no adapter named {name!r}; it has {names}")


def add_adapter(model: nn.Module, name: str, config: GiVAConfig) -> nn.Module:
    """Add adapter ``name`` (random bases, adding zero) to a model that ``apply_giva`` set up.

    The active adapter does not change: ``set_adapter(model, name)`` then ``init_bases`` on the new
    adapter's own data gives it gradient-informed bases. modules_to_save must be empty for every
    adapter of a model with several (one head cannot serve them all). Validated before any change.
    """
    if not isinstance(config, GiVAConfig):
        raise TypeError(f"config must be a GiVAConfig, got {type(config).__name__}")
    check_adapter_name(name)
    outer, model = model, adapted_module(model)  # targets are named relative to the adapted module
    configs = vars(model).get(REGISTRY)
    if not configs:
        raise ValueError("model has no GiVA adapter yet; apply_giva(model, config, name) adds the first")
    if name in configs:
        raise ValueError(f"the model already has an adapter named {name!r}")
    with_heads = [n for n, c in {**configs, name: config}.items() if c.modules_to_save]
    if with_heads:
        raise ValueError(f"adapter {with_heads[0]!r} has modules_to_save: a model with several "
                         "adapters shares its heads, so every adapter needs modules_to_save=()")
    merged = [n for n, layer in wrapped_layers(model).items() if layer.merged]
    if merged:
        raise RuntimeError(f"GiVA layer {merged[0]!r} is merged; unmerge the model before adding adapters")
    targets = find_targets(model, config)
    _check_targets(targets, config)

    generator = torch.Generator().manual_seed(config.seed)
    active = active_adapter(model)
    for target, module in targets.items():
        chunks = chunks_for(target, config)
        if isinstance(module, GiVALinear):
            module.add_adapter(name, chunks * config.r, chunks, config.dropout, generator,
                               config.autocast_adapter_dtype, config.input_scale)
        else:
            _replace(model, target, layer_class(module).from_linear(module, chunks * config.r,
                                                                    config.dropout, generator, chunks,
                                                                    name, config.autocast_adapter_dtype,
                                                                    config.input_scale))
    register_adapter(model, name, config)
    activate(model, active)  # new layers start bare unless ``name`` is active; flags follow
    return outer


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Run (and train) adapter ``name`` from now on; None runs the bare base model."""
    if name is not None:
        _check_known(model, name)
    activate(model, name)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model runs without any adapter, in this thread only: other threads
    sharing the model keep running its active adapter, and nothing else changes (the active
    adapter, which vectors require grad)."""
    layers = wrapped_layers(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"GiVA layer {merged[0]!r} is merged; unmerge it to run the model without adapters")
    added = [id(layer) for layer in layers.values() if id(layer) not in PER_THREAD.bare]
    PER_THREAD.bare.update(added)
    try:
        yield model
    finally:
        PER_THREAD.bare.difference_update(added)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``. Layers left without an adapter become their plain base layers again;
    deleting the active adapter leaves the model with none active (``set_adapter`` picks another)."""
    _check_known(model, name)
    outer, model = model, adapted_module(model)
    layers = wrapped_layers(model)
    merged = [n for n, layer in layers.items() if layer.merged and layer.active_adapter == name]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged into layer {merged[0]!r}; unmerge it first")
    for layer_name, layer in layers.items():
        if name in layer.adapters:
            layer.delete_adapter(name)
        if not layer.adapters:
            _replace(model, layer_name, layer.base)
    if REGISTRY in vars(model):
        del model.giva_adapters[name]
        if model.giva_active_adapter == name:
            activate(model, None)
    return outer


def _row_ids(model: nn.Module, adapters, names: list[str], device: torch.device) -> torch.Tensor:
    """The per-row adapter ids of a mixed batch (int64, -1 = none) from names or ids, checked."""
    if isinstance(adapters, torch.Tensor):
        ids = adapters
        if ids.dtype != torch.long or ids.dim() != 1:
            raise ValueError(f"adapter ids must be a 1-D int64 tensor, got {ids.dtype} of shape "
                             f"{tuple(ids.shape)}")
        if ids.device != device:
            raise ValueError(f"adapter ids are on {ids.device} but the model's GiVA layers are on {device}")
        bad = ((ids < -1) | (ids >= len(names))).nonzero()
        if bad.numel():
            row = int(bad[0, 0])
            raise ValueError(f"adapter id {int(ids[row])} of row {row} is not in [-1, {len(names)}) "
                             f"(the model's adapters are {names})")
        return ids
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise TypeError("adapters must be a sequence of adapter names (None for none) or a LongTensor "
                        f"of ids, got {type(adapters).__name__}")
    for row, entry in enumerate(adapters):
        if entry is not None and entry not in names:
            hint = " (ids go in a LongTensor; a list holds names)" if isinstance(entry, int) else ""
            raise UnknownAdapterError(f"row {row} names adapter {entry!r}{hint}; the model has {names}")
    return torch.tensor([-1 if e is None else names.index(e) for e in adapters], dtype=torch.long,
                        device=device)


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, adapters: Sequence[str | None] | torch.Tensor) -> Iterator[nn.Module]:
    """Within the block, row i of the batch runs adapter ``adapters[i]`` (a name, or None for the
    bare model; or a LongTensor of ids into ``adapter_names(model)``, -1 for none).

    A row is an input's first dimension (a sequence of a (batch, seq, features) input). Every GiVA
    layer runs its base GEMM once for the whole batch and each adapter on its own rows (the native
    ``giva::mixed_linear`` op where it fits). Inference only: use it under torch.no_grad() or
    torch.inference_mode(). All ids are checked before the block starts.

    A LongTensor of ids is used as given, not copied: ids written into it in place during the block
    take effect at the next forward, without a new block (on CUDA a decode step can then be
    captured once in a CUDA graph and replayed for other rows' adapters). Such in-place ids are
    not checked on the host: one out of range stops the CUDA kernel with a device-side assert and
    raises an error on the CPU.
    """
    layers = wrapped_layers(model)
    if not layers:
        raise ValueError("model has no GiVA layers")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"GiVA layer {merged[0]!r} is merged; unmerge before a mixed-adapter batch")
    quantized = [n for n, layer in layers.items() if isinstance(layer, QuantizedGiVALinear)]
    if quantized:
        raise RuntimeError(f"GiVA layer {quantized[0]!r} has a quantized base "
                           f"({layers[quantized[0]].quantization}); mixed-adapter batches do not run "
                           "on quantized bases yet: run one adapter per batch (set_adapter)")
    busy = [n for n, layer in layers.items() if layer.mixed_state() is not None]
    if busy:
        raise RuntimeError(f"GiVA layer {busy[0]!r} is already in a mixed_adapters block of this thread")
    names = adapter_names(model)
    ids = _row_ids(model, adapters, names, next(iter(layers.values())).base.weight.device)
    try:
        for layer in layers.values():
            # This layer's index of each model adapter (-1 where it lacks one), looked up per row
            # at each call; none needed where the layer holds the model's adapters in its order.
            position = {n: i for i, n in enumerate(layer.adapters)}
            lookup = None
            if list(layer.adapters) != names:
                lookup = torch.tensor([-1, *(position.get(n, -1) for n in names)], dtype=torch.long,
                                      device=ids.device)
            held = list(layer.adapters.values())
            # An input scale folds into A (inference only: nothing trains inside the block).
            tensors = ([a.scaled_A() for a in held], *([getattr(a, k) for a in held]
                                                       for k in ("B", "lambda_s", "lambda_o")))
            PER_THREAD.mixed[id(layer)] = (ids, lookup, tensors)
        yield model
    finally:
        for layer in layers.values():
            PER_THREAD.mixed.pop(id(layer), None)
