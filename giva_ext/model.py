"""Apply GiVA to a model: target matching, wrapping, freezing, merging."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import GiVAConfig
from .distributed import check_not_sharded
from .layer import GiVALinear, check_adapter_name, check_rank, linear_shape
from .quantized import QuantizedGiVALinear, check_supported, dequantized_weight, layer_class, merge_refusal

# Leaf names of output heads that "all-linear" never adapts (besides get_output_embeddings()).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _modules_to_save(model: nn.Module, config: GiVAConfig) -> dict[str, nn.Module]:
    """The modules named in config.modules_to_save, by qualified name; each name must match."""
    found = {}
    for pattern in config.modules_to_save:
        hits = {n: m for n, m in model.named_modules() if n and _matches(n, pattern)}
        if not hits:
            raise ValueError(f"modules_to_save entry {pattern!r} matches no module of the model")
        found.update(hits)
    return found


def _check_heads(targets: dict[str, nn.Module], heads: dict[str, nn.Module]) -> None:
    """ValueError if a module of modules_to_save is, holds or sits inside a target: it would train
    (and be saved) the base weight that the adapter needs frozen and fingerprints."""
    for head in heads:
        for target in targets:
            if head == target or target.startswith(head + ".") or head.startswith(target + "."):
                relation = ("is" if head == target else "holds" if target.startswith(head + ".")
                            else "is inside")
                raise ValueError(f"modules_to_save module {head!r} {relation} the target {target!r}: "
                                 "a target's base weight stays frozen, so a module to save must be "
                                 "outside every target")


def _excluded_heads(model: nn.Module, config: GiVAConfig) -> set[str]:
    """Qualified names (and their submodules) that 'all-linear' leaves alone."""
    heads = set(_modules_to_save(model, config))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if (output is not None and module is output) or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            heads.add(name)
    return heads


def find_targets(model: nn.Module, config: GiVAConfig) -> dict[str, nn.Module]:
    """Modules that config.target_modules selects, by qualified name, in model order.

    Linear layers are nn.Linear and transformers' Conv1D. On a model that already holds GiVA layers
    the GiVALinear modules are the candidates (their inner ``base`` is skipped). Raises ValueError if
    nothing matches or a match is not a linear layer.
    """
    wrapped = {n for n, m in model.named_modules() if isinstance(m, GiVALinear)}
    candidates = {n: m for n, m in model.named_modules()
                  if n and not any(n.startswith(w + ".") for w in wrapped)}
    spec = config.target_modules
    if spec == "all-linear":
        heads = _excluded_heads(model, config)
        chosen = {n: m for n, m in candidates.items() if linear_shape(m) is not None
                  and not any(n == h or n.startswith(h + ".") for h in heads)}
    elif isinstance(spec, str):
        try:
            regex = re.compile(spec)
        except re.error as exc:
            raise ValueError(f"target_modules regex {spec!r} is invalid: {exc}") from exc
        matched = {n: m for n, m in candidates.items() if regex.fullmatch(n)}
        # A pattern selects layers: the containers it also matches (a block, an attention module)
        # are not targets. Names (below) are explicit, so a non-linear one is an error.
        chosen = {n: m for n, m in matched.items() if linear_shape(m) is not None}
        if matched and not chosen:
            name, module = next(iter(matched.items()))
            raise ValueError(f"target_modules regex {spec!r} matches no linear layer, only modules "
                             f"such as {name!r} (a {type(module).__name__})")
    else:
        chosen = {n: m for n, m in candidates.items() if any(_matches(n, p) for p in spec)}
        unused = [p for p in spec if not any(_matches(n, p) for n in chosen)]
        if chosen and unused:
            warnings.warn(f"target_modules entries {unused} match no module of the model (the others "
                          f"select {len(chosen)} layers)", stacklevel=3)
    if not chosen:
        linears = [n for n, m in candidates.items() if linear_shape(m) is not None]
        raise ValueError(f"target_modules={spec!r} matches no module; linear layers of this model "
                         f"include {linears[:8]}")
    for name, module in chosen.items():
        if linear_shape(module) is None:
            raise ValueError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear or a "
                             "transformers Conv1D")
    return chosen


def _modules_outside_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) for ``model`` ("") and every module reachable from it without
    entering a GiVALinear (its base and adapters hold no other: with many adapters per layer those
    are most of the modules), each once, in the order of model.named_modules()."""
    found = [("", model)]
    seen = {id(model)}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            qualified = f"{prefix}.{name}" if prefix else name
            found.append((qualified, child))
            if not isinstance(child, GiVALinear):
                walk(child, qualified)

    if not isinstance(model, GiVALinear):
        walk(model, "")
    return found


def wrapped_layers(model: nn.Module) -> dict[str, GiVALinear]:
    """Every GiVALinear in the model, by qualified name, whatever adapters it holds, in the order
    of model.named_modules(). Runs on every mixed_adapters block and API call, so the walk skips
    what GiVALinear layers hold."""
    return {name: m for name, m in _modules_outside_layers(model) if isinstance(m, GiVALinear)}


# The attribute apply_giva sets on the module it adapts: adapter name -> config.
REGISTRY = "giva_adapters"


def adapted_module(model: nn.Module) -> nn.Module:
    """The module apply_giva adapted, which holds the adapter registry: ``model`` itself, or the one
    module inside it that does (an adapted encoder under a custom head, DistributedDataParallel's
    ``.module``, torch.compile's ``._orig_mod``). ``model`` itself when none does (standalone
    GiVALinear layers, or a plain model). Layer and head names in configs and adapter files are
    relative to it, whichever enclosing module the caller passes."""
    if REGISTRY in vars(model):
        return model
    owners = {name: m for name, m in _modules_outside_layers(model) if REGISTRY in vars(m)}
    if len(owners) > 1:
        raise ValueError(f"the model holds {len(owners)} separately adapted modules "
                         f"({', '.join(repr(n) for n in owners)}), each with its own adapters; "
                         "pass the one to act on")
    return next(iter(owners.values()), model)


def giva_layers(model: nn.Module, adapter: str | None = None) -> dict[str, GiVALinear]:
    """The GiVALinear layers that run an adapter: with ``adapter=None`` those with an active one
    (the layers training, saving, merging and init act on), else those holding ``adapter``."""
    layers = wrapped_layers(model)
    if adapter is None:
        return {n: m for n, m in layers.items() if m.active_adapter is not None}
    return {n: m for n, m in layers.items() if adapter in m.adapters}


def get_config(model: nn.Module) -> GiVAConfig:
    """The config of the model's active adapter (of its adapted module: see adapted_module)."""
    model = adapted_module(model)
    configs = vars(model).get(REGISTRY)
    if not configs:
        raise ValueError("model has no GiVA adapter; call apply_giva(model, config) first")
    active = model.giva_active_adapter
    if active is None:
        raise ValueError(f"the model's GiVA adapters {list(configs)} are disabled; "
                         "set_adapter(model, name) first")
    return configs[active]


def register_adapter(model: nn.Module, name: str, config: GiVAConfig) -> None:
    """Record ``config`` as adapter ``name``'s in the model's registry (insertion order = ids)."""
    if REGISTRY not in vars(model):
        model.giva_adapters = {}
        model.giva_active_adapter = None
    model.giva_adapters[name] = config
    if model.giva_active_adapter == name:
        model.giva_config = config


def activate(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter of every layer holding it (the others run bare), with only
    its vectors requiring grad; None disables them all. The adapted module's ``giva_config``
    follows."""
    layers = wrapped_layers(model)
    model = adapted_module(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged and name != vars(model).get("giva_active_adapter", name):
        raise RuntimeError(f"GiVA layer {merged[0]!r} is merged; unmerge the model before switching adapters")
    for layer in layers.values():
        layer.set_adapter(name if name in layer.adapters else None)
        for adapter_name, adapter in layer.adapters.items():
            for vector in adapter.vectors():
                vector.requires_grad_(adapter_name == name)
    if REGISTRY in vars(model):
        model.giva_active_adapter = name
        model.giva_config = model.giva_adapters[name] if name is not None else None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def chunks_for(name: str, config: GiVAConfig) -> int:
    """How many chunks config.fused_chunks gives the target ``name`` (1 if it names none)."""
    hits = {n for pattern, n in config.fused_chunks.items() if _matches(name, pattern)}
    if len(hits) > 1:
        raise ValueError(f"fused_chunks gives target {name!r} conflicting chunk counts {sorted(hits)}")
    return hits.pop() if hits else 1


def _check_targets(targets: dict[str, nn.Module], config: GiVAConfig) -> None:
    check_supported(targets)
    unused = [p for p in config.fused_chunks if not any(_matches(name, p) for name in targets)]
    if unused:
        raise ValueError(f"fused_chunks entry {unused[0]!r} matches no target of the model")
    for name, module in targets.items():
        in_features, out_features = linear_shape(module)
        chunks = chunks_for(name, config)
        if out_features % chunks:
            raise ValueError(f"target {name!r}: fused_chunks {chunks} does not divide its "
                             f"{out_features} outputs")
        check_rank(config.r, in_features, out_features // chunks,
                   config.rank_needed(), where=f"target {name!r} ({config.init_mode})")


def apply_giva(model: nn.Module, config: GiVAConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap the target layers of ``model`` in GiVALinear (in place) and freeze all but the adapter.

    Trainable afterwards: every lambda_s / lambda_o (and lambda_i with config.input_scale) and the
    parameters of config.modules_to_save.
    A target named in config.fused_chunks with n chunks gets rank n * config.r (config.r per chunk).
    The adapter is named ``adapter_name`` and active (more: ``giva_ext.add_adapter``).
    Returns the model. Everything is validated before the model is touched.
    """
    if not isinstance(config, GiVAConfig):
        raise TypeError(f"config must be a GiVAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if wrapped_layers(model):
        raise ValueError("model already has GiVA layers; add_adapter(model, name, config) adds another "
                         "adapter, merge_and_unload removes them")
    targets = find_targets(model, config)
    _check_targets(targets, config)
    to_save = _modules_to_save(model, config)
    _check_heads(targets, to_save)

    generator = torch.Generator().manual_seed(config.seed)
    model.requires_grad_(False)
    for name, linear in targets.items():
        chunks = chunks_for(name, config)
        _replace(model, name, layer_class(linear).from_linear(linear, chunks * config.r, config.dropout,
                                                              generator, chunks, adapter_name,
                                                              config.autocast_adapter_dtype,
                                                              config.input_scale))
    for module in to_save.values():
        module.requires_grad_(True)
    register_adapter(model, adapter_name, config)
    activate(model, adapter_name)
    return model


@dataclass(frozen=True)
class TrainableReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """Count of parameters that require grad, next to the model's total (buffers excluded)."""
    params = list(model.parameters())
    return TrainableReport(sum(p.numel() for p in params if p.requires_grad),
                           sum(p.numel() for p in params))


def check_unmerged(layers: dict[str, GiVALinear], action: str) -> None:
    """RuntimeError naming the first merged layer: ``action`` needs the pretrained base weights."""
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"GiVA layer {merged[0]!r} is merged; unmerge the model before {action}")


def _set_merged(model: nn.Module, merged: bool) -> nn.Module:
    layers = giva_layers(model)
    if not layers:
        raise ValueError("model has no GiVA layers" if not wrapped_layers(model) else
                         "no adapter of the model is active (set_adapter(model, name) activates one)")
    check_not_sharded(layers, "merge" if merged else "unmerge")
    if merged:
        _check_not_quantized_merge(layers)
    for name, layer in layers.items():
        if layer.merged == merged:
            raise RuntimeError(f"GiVA layer {name!r} is {'already' if merged else 'not'} merged")
    for layer in layers.values():
        layer.merge() if merged else layer.unmerge()
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += diag(lambda_o) B diag(lambda_s) A)."""
    return _set_merged(model, True)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge on every layer (exact up to the weight dtype's rounding)."""
    return _set_merged(model, False)


def _check_not_quantized_merge(layers: dict[str, GiVALinear]) -> None:
    """RuntimeError naming the first layer on a quantized base (its packed weight takes no update)."""
    for name, layer in layers.items():
        if isinstance(layer, QuantizedGiVALinear):
            raise RuntimeError(merge_refusal(f"GiVA layer {name!r}", layer.quantization))


def _dequantized_merge(layer: QuantizedGiVALinear) -> nn.Linear:
    """A float nn.Linear holding dequantize(W) + the active adapter's update (W alone if none)."""
    base = layer.base
    weight = dequantized_weight(base)
    if layer.active_adapter is not None:
        weight = weight + layer.delta_weight().to(weight.device)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                       dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge the active adapter, drop the others and put the plain base layers back; returns the
    plain model. A quantized base takes no update: with ``dequantize`` it is replaced by a float
    nn.Linear holding dequantize(W) + delta W (in its compute dtype; quantize the model again with
    your library if you need it quantized), without it the call is refused before any change."""
    layers = wrapped_layers(model)
    if not layers:
        raise ValueError("model has no GiVA layers to merge")
    check_not_sharded(layers, "merge_and_unload")
    if not dequantize:
        _check_not_quantized_merge(layers)
    for name, layer in layers.items():
        if isinstance(layer, QuantizedGiVALinear):
            _replace(model, name, _dequantized_merge(layer))
            continue
        if not layer.merged and layer.active_adapter is not None:
            layer.merge(keep_fingerprint=False)
        _replace(model, name, layer.base)
    owner = adapted_module(model)
    for attr in ("giva_config", REGISTRY, "giva_active_adapter"):
        if attr in vars(owner):
            delattr(owner, attr)
    return model
