"""save_adapter / load_adapter: adapter_model.safetensors + adapter_config.json, written atomically.

The safetensors file is self-contained: its metadata holds the same JSON as adapter_config.json
(config, library version, base-model fingerprint), so a save interrupted between the two files can
never pair new tensors with an old config. The JSON file is for people and tools that read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .config import GiVAConfig
from .layer import GiVALinear, linear_shape
from .model import (_modules_to_save, apply_giva, check_unmerged, chunks_for, find_targets, get_config,
                    giva_layers)
from .version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
METADATA_KEY = "giva_adapter"
# Tensor names: "<layer>.<field>" for adapter tensors, "modules_to_save.<module>.<key>" for heads.
ADAPTER_FIELDS = ("A", "B", "lambda_s", "lambda_o")
SAVED_PREFIX = "modules_to_save."


def weight_fingerprint(name: str, weight: torch.Tensor) -> dict:
    """Name, shape, dtype and the SHA-256 of a base weight's bytes."""
    data = weight.detach().contiguous().cpu().view(torch.uint8).numpy()
    return {"name": name, "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(data.tobytes()).hexdigest()}


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.base.weight if isinstance(module, GiVALinear) else module.weight


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the adapter (bases, vectors, modules_to_save) of ``model`` into folder ``path``."""
    config = get_config(model)
    layers = giva_layers(model)
    check_unmerged(layers, "saving (the fingerprint must describe the pretrained weights)")
    tensors = {}
    for name, layer in layers.items():
        for field in ADAPTER_FIELDS:
            tensors[f"{name}.{field}"] = getattr(layer, field).detach().cpu().contiguous()
    for mname, module in _modules_to_save(model, config).items():
        for key, value in module.state_dict().items():
            tensors[f"{SAVED_PREFIX}{mname}.{key}"] = value.detach().cpu().contiguous().clone()
    header = {"library": "giva_ext", "version": __version__, "format": FORMAT_VERSION,
              "config": config.to_dict(),
              "fingerprint": [weight_fingerprint(n, layer.base.weight) for n, layer in layers.items()]}
    text = json.dumps(header, indent=2)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_NAME, save_safetensors_bytes(tensors, metadata={METADATA_KEY: text}))
    _atomic_write(folder / CONFIG_NAME, (text + "\n").encode())
    return folder


def _read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and tensors of a saved adapter; ValueError naming the file if anything is off."""
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}")
    data = file.read_bytes()
    try:
        tensors = load_safetensors_bytes(data)  # validates the whole file first
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{file} is not a readable safetensors file: {exc}") from exc
    if METADATA_KEY not in metadata:
        raise ValueError(f"{file} is not a giva_ext adapter (no '{METADATA_KEY}' metadata)")
    try:
        header = json.loads(metadata[METADATA_KEY])
        if header.get("library") != "giva_ext" or header.get("format") != FORMAT_VERSION:
            raise ValueError(f"library {header.get('library')!r}, format {header.get('format')!r}")
        header["config"] = GiVAConfig.from_dict(header["config"])
        fingerprint = header["fingerprint"]
        if not isinstance(fingerprint, list):
            raise ValueError("fingerprint is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: unsupported or damaged adapter header ({exc})") from exc
    return header, tensors


def _check_fingerprint(file: Path, saved: list[dict], targets: dict[str, nn.Module]) -> None:
    """Raise ValueError naming the first layer whose base weight differs from the saved one."""
    if set(targets) != {entry["name"] for entry in saved}:
        missing = sorted({e["name"] for e in saved} - set(targets))
        extra = sorted(set(targets) - {e["name"] for e in saved})
        raise ValueError(f"{file} targets other layers than this model: missing in model {missing[:3]}, "
                         f"not in adapter {extra[:3]}")
    for entry in saved:
        now = weight_fingerprint(entry["name"], _base_weight(targets[entry["name"]]))
        for key in ("shape", "dtype", "sha256"):
            if now[key] != entry[key]:
                hint = (" (transposed: one of them is a transformers Conv1D, which stores its weight "
                        "as (in, out), and the other an nn.Linear)"
                        if key == "shape" and now[key] == entry[key][::-1] else "")
                raise ValueError(f"{file} was saved for another base model: layer {entry['name']!r} "
                                 f"has {key} {now[key]} here but {entry[key]} in the adapter{hint}")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by save_adapter into ``model`` (plain, or already holding GiVA layers).

    A plain model gets apply_giva with the saved config first. The base weights must be the ones
    the adapter was saved with (checked by fingerprint). All checks run before the model changes.
    """
    folder = Path(path)
    file = folder / WEIGHTS_NAME
    header, tensors = _read_adapter(folder)
    config: GiVAConfig = header["config"]
    layers = giva_layers(model)
    if layers:
        check_unmerged(layers, "load_adapter")
        targets = dict(layers)
    else:
        targets = find_targets(model, config)
    _check_fingerprint(file, header["fingerprint"], targets)

    expected = {}
    for name, module in targets.items():
        in_f, out_f = linear_shape(module)
        r = config.r * chunks_for(name, config)
        if isinstance(module, GiVALinear) and module.r != r:
            raise ValueError(f"{file} has rank {r} but layer {name!r} of the model has rank {module.r}")
        expected.update({f"{name}.A": (r, in_f), f"{name}.B": (out_f, r),
                         f"{name}.lambda_s": (r,), f"{name}.lambda_o": (out_f,)})
    for mname, module in _modules_to_save(model, config).items():
        for key, value in module.state_dict().items():
            expected[f"{SAVED_PREFIX}{mname}.{key}"] = tuple(value.shape)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise ValueError(f"{file}: tensors do not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"the model needs {shape}")
        if not tensors[key].is_floating_point() and key.startswith(tuple(targets)):
            raise ValueError(f"{file}: tensor {key!r} has dtype {tensors[key].dtype}, expected floating point")

    if not layers:
        apply_giva(model, config)
        layers = giva_layers(model)
    else:
        model.giva_config = config
    with torch.no_grad():
        for name, layer in layers.items():
            for field in ADAPTER_FIELDS:
                getattr(layer, field).copy_(tensors[f"{name}.{field}"])
        for mname, module in _modules_to_save(model, config).items():
            state = {key[len(SAVED_PREFIX) + len(mname) + 1:]: t for key, t in tensors.items()
                     if key.startswith(f"{SAVED_PREFIX}{mname}.")}
            module.load_state_dict(state)
    return model
