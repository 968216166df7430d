"""PEFT interop: export a GiVA adapter as a standard LoRA adapter; import a VeRA adapter as GiVA.

Both directions rest on one identity. GiVA's update diag(lambda_o) B diag(lambda_s) A is

- a rank-r LoRA with lora_B = diag(lambda_o) B, lora_A = diag(lambda_s) A and scaling 1
  (lora_alpha = r), so any stack that serves PEFT LoRA adapters serves GiVA adapters unchanged;
- VeRA's update diag(lambda_b) B diag(lambda_d) A with VeRA's shared random projections sliced to
  the layer (A = vera_A[:, :in], B = vera_B[:out, :]), so a VeRA run continues as a GiVA model
  whose per-layer bases are VeRA's (not orthonormal; GiVA's layer does not need them to be).

Files follow PEFT's layout: adapter_model.safetensors with keys "base_model.model.<module>.<name>"
and adapter_config.json.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .config import GiVAConfig
from .distributed import gathered, writes_here
from .layer import linear_shape
from .model import (_modules_to_save, adapted_module, apply_giva, check_unmerged, find_targets, get_config,
                    giva_layers)
from .serialization import (CONFIG_NAME, WEIGHTS_NAME, check_finite_tensors, json_loads, read_regular_file,
                            write_files)

# PeftModel wraps the tuner (base_model) around the user's model (model); saved keys keep both.
PEFT_PREFIX = "base_model.model."


def _lora_rank_pattern(ranks: dict[str, int], default: int) -> dict[str, int]:
    # PEFT matches pattern keys as regexes against module names; escape so each names one layer.
    return {re.escape(name): r for name, r in ranks.items() if r != default}


def export_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the GiVA adapter of ``model`` as a PEFT LoRA adapter into folder ``path``.

    ``PeftModel.from_pretrained(base_model, path)`` on the pretrained model then computes what the
    GiVA model computes: lora_A = diag(lambda_s) A (diag(lambda_i) with an input scale),
    lora_B = diag(lambda_o) B, lora_alpha = r
    (scaling 1), one entry per GiVA layer (target_modules lists their qualified names). Conv1D
    targets set fan_in_fan_out=True; in a model that mixes Conv1D and nn.Linear targets, PEFT sets
    the flag per layer (with a warning). A fused layer (fused_chunks n) exports as rank n * r via
    rank_pattern. modules_to_save are written as PEFT writes them. The model must not be merged.
    Names are relative to the adapted module (see adapted_module), the model PEFT loads it onto.
    Under FSDP2 (fully_shard) every process calls it: the shards are gathered, process 0 writes.
    """
    model = adapted_module(model)
    config = get_config(model)
    layers = giva_layers(model)
    check_unmerged(layers, "export_lora (a LoRA adapter is the unmerged update)")
    tensors = {}
    for name, layer in layers.items():
        # Scaled in fp32 and stored in the vectors' dtype, like delta_weight.
        lambda_s, lambda_o = (gathered(v).detach().float() for v in (layer.lambda_s, layer.lambda_o))
        lora_A = layer.A.detach().float() * lambda_s[:, None]
        if layer.lambda_i is not None:
            lora_A = lora_A * gathered(layer.lambda_i).detach().float()
        lora_B = layer.B.detach().float() * lambda_o[:, None]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_A.to(layer.lambda_s.dtype).cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_B.to(layer.lambda_o.dtype).cpu().contiguous()
    for mname, module in _modules_to_save(model, config).items():
        for key, value in module.state_dict().items():
            tensors[f"{PEFT_PREFIX}{mname}.{key}"] = gathered(value).detach().cpu().contiguous().clone()
    check_finite_tensors(tensors)  # as save_adapter: a NaN written out would only surface in PEFT
    ranks = {name: layer.r for name, layer in layers.items()}
    pattern = _lora_rank_pattern(ranks, config.r)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    lora_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path,
        "r": config.r, "lora_alpha": config.r, "rank_pattern": pattern, "alpha_pattern": pattern,
        "target_modules": list(layers), "fan_in_fan_out": any(l.fan_in_fan_out for l in layers.values()),
        "lora_dropout": config.dropout, "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": config.modules_to_save or None, "init_lora_weights": True,
        "inference_mode": True,
    }
    folder = Path(path)
    if not writes_here(model):  # FSDP2: every process gathered the shards, process 0 writes
        return folder
    return write_files(folder, {WEIGHTS_NAME: save_safetensors_bytes(tensors),
                                CONFIG_NAME: (json.dumps(lora_config, indent=2) + "\n").encode()})


def _vera_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT VeRA's projection regenerated from its seed: Kaiming-uniform over fan_in = shape[1],
    with PEFT's arithmetic (std = sqrt(2) / sqrt(fan), bound = sqrt(3) * std) so it is bit-exact."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _read_vera(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"no {file.name} in {folder} (import_vera reads a PEFT VeRA "
                                    "adapter saved with save_pretrained)")
    try:
        vera = json_loads(read_regular_file(config_file))
        tensors = load_safetensors_bytes(read_regular_file(weights_file))
    except (ValueError, SafetensorError) as exc:
        raise ValueError(f"{folder} is not a readable PEFT adapter: {exc}") from exc
    kind = vera.get("peft_type") if isinstance(vera, dict) else None
    if kind != "VERA":
        raise ValueError(f"{config_file} describes a {kind or 'non-PEFT'} adapter, not a VeRA one "
                         "(peft_type must be 'VERA')")
    if vera.get("bias", "none") != "none":
        raise ValueError(f"{config_file}: VeRA with trained biases (bias={vera['bias']!r}) has no "
                         "GiVA equivalent; only bias='none' can be imported")
    return vera, tensors


def import_vera(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Turn a PEFT VeRA adapter (saved with save_pretrained) into GiVA layers on ``model``.

    ``model`` is the plain pretrained model the VeRA adapter was trained on. Each VeRA layer becomes
    a GiVALinear with A = vera_A[:, :in], B = vera_B[:out, :], lambda_s = lambda_d and
    lambda_o = lambda_b, so the model computes what the VeRA model computes; modules_to_save are
    loaded too. The projections come from the checkpoint (save_projection=True) or are regenerated
    from projection_prng_key. The GiVA config gets init_mode="random" (the bases came from no
    gradient; calling init_bases would replace them) and no input scale (VeRA has none). Every check
    runs before the model changes.
    """
    folder = Path(path)
    vera, tensors = _read_vera(folder)
    r = vera.get("r")
    suffixes = (".vera_lambda_d", ".vera_lambda_b")
    names = sorted({k[len(PEFT_PREFIX):-len(s)] for k in tensors for s in suffixes
                    if k.startswith(PEFT_PREFIX) and k.endswith(s)})
    if not names or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{folder}: no VeRA layers (vera_lambda_d / vera_lambda_b tensors) or no "
                         f"valid rank r in {CONFIG_NAME}")
    config = GiVAConfig(r=r, target_modules=names, init_mode="random", input_scale=False,
                        dropout=float(vera.get("vera_dropout", 0.0)),
                        modules_to_save=vera.get("modules_to_save") or [],
                        seed=int(vera.get("projection_prng_key", 0)))
    if giva_layers(model):
        raise ValueError("model already has GiVA layers; import_vera needs the plain pretrained model")
    targets = find_targets(model, config)
    if set(targets) != set(names):
        raise ValueError(f"{folder}: VeRA layers and model layers differ: not in the model "
                         f"{sorted(set(names) - set(targets))[:3]}, ambiguous "
                         f"{sorted(set(targets) - set(names))[:3]}")
    shapes = {name: linear_shape(module) for name, module in targets.items()}

    vera_A, vera_B = tensors.get("base_model.vera_A"), tensors.get("base_model.vera_B")
    if (vera_A is None) != (vera_B is None):
        raise ValueError(f"{folder}: has only one of the VeRA projections vera_A / vera_B")
    need_in, need_out = max(i for i, _ in shapes.values()), max(o for _, o in shapes.values())
    if vera_A is None:  # save_projection=False: PEFT regenerates them, sized to the largest layer
        generator = torch.Generator().manual_seed(config.seed)
        vera_A = _vera_projection((r, need_in), generator)
        vera_B = _vera_projection((need_out, r), generator)
    if vera_A.ndim != 2 or vera_A.shape[0] != r or vera_A.shape[1] < need_in:
        raise ValueError(f"{folder}: vera_A has shape {tuple(vera_A.shape)} but r={r} and this model's "
                         f"VeRA layers need ({r}, >= {need_in})")
    if vera_B.ndim != 2 or vera_B.shape[1] != r or vera_B.shape[0] < need_out:
        raise ValueError(f"{folder}: vera_B has shape {tuple(vera_B.shape)} but r={r} and this model's "
                         f"VeRA layers need (>= {need_out}, {r})")
    for name, (in_f, out_f) in shapes.items():
        for suffix, size in ((".vera_lambda_d", r), (".vera_lambda_b", out_f)):
            t = tensors.get(f"{PEFT_PREFIX}{name}{suffix}")
            if t is None or tuple(t.shape) != (size,):
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise ValueError(f"{folder}: {name}{suffix} is {got}, layer {name!r} "
                                 f"({out_f}x{in_f}) needs ({size},)")
    saved = {}
    for mname, module in _modules_to_save(model, config).items():
        current = module.state_dict()
        state = {key: tensors.get(f"{PEFT_PREFIX}{mname}.{key}") for key in current}
        bad = [k for k, t in state.items() if t is None or t.shape != current[k].shape]
        if bad:
            raise ValueError(f"{folder}: modules_to_save {mname!r}: tensor {bad[0]!r} is missing or "
                             "does not fit the model")
        saved[mname] = state

    apply_giva(model, config)  # validates ranks against the layers before changing anything
    layers = giva_layers(model)
    with torch.no_grad():
        for name, (in_f, out_f) in shapes.items():
            layer = layers[name]
            layer.set_bases(vera_A[:, :in_f], vera_B[:out_f, :])
            layer.lambda_s.copy_(tensors[f"{PEFT_PREFIX}{name}.vera_lambda_d"])
            layer.lambda_o.copy_(tensors[f"{PEFT_PREFIX}{name}.vera_lambda_b"])
    for mname, module in _modules_to_save(model, config).items():
        module.load_state_dict(saved[mname])
    return model
