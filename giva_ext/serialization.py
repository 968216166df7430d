"""save_adapter / load_adapter: adapter_model.safetensors + adapter_config.json, written atomically.

The safetensors file is the source of truth and self-contained. Its metadata holds the header JSON:
config, library version, file format, base-model fingerprint, and a checksum record (the SHA-256 of
the rest of the header and of every tensor). So a save interrupted between the two files can never
pair new tensors with an old config, and a damaged byte anywhere in the file is found before the
model changes. adapter_config.json holds the same JSON for people and tools; load_adapter only compares it
with the header and warns if they differ (e.g. after a save interrupted between the two files).

Loading is all-or-nothing: the file is read and checked in full first, then the model changes under
a guard that puts back its modules, attributes, requires_grad flags and every tensor it overwrote if
anything fails (an exception or a KeyboardInterrupt).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .adapters import active_adapter, add_adapter, adapter_names, set_adapter
from .config import GiVAConfig
from .distributed import gathered, is_sharded, writes_here
from .layer import GiVALinear, UnknownAdapterError, check_adapter_name, linear_shape, weight_digests
from .model import (REGISTRY, _modules_to_save, adapted_module, apply_giva, check_unmerged, chunks_for,
                    find_targets, get_config, giva_layers, register_adapter, wrapped_layers)
from .quantized import fingerprint as quantized_fingerprint
from .quantized import quantization_of
from .version import __version__

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# Format 2 added the checksum record; format 1 files (no checksums) still load, unverified.
FORMAT_VERSION = 2
READ_FORMATS = (1, 2)
METADATA_KEY = "giva_adapter"
CHECKSUM_FIELD = "sha256"  # the header's checksum record (format 2)
# Tensor names: "<layer>.<field>" for adapter tensors (GiVAAdapter.tensor_names: A, B, lambda_s,
# lambda_o, and lambda_i with an input scale), "modules_to_save.<module>.<key>" for heads.
SAVED_PREFIX = "modules_to_save."
FINGERPRINT_KEYS = {"name": str, "shape": list, "dtype": str, "sha256": str}


def _tensor_bytes(t: torch.Tensor):
    """A tensor's bytes in row-major order (a numpy uint8 array; any dtype, any shape)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(_tensor_bytes(t))
    return h.hexdigest()


def weight_fingerprint(name: str, weight: torch.Tensor, cast: bool = False) -> dict:
    """Name, shape, dtype and the SHA-256 of a base weight's bytes (with ``cast``, a float32
    weight's also as bfloat16 and float16: see weight_digests)."""
    return {"name": name, "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
            **weight_digests(weight, cast)}


def base_fingerprint(name: str, module: nn.Module, cast: bool = False) -> dict:
    """The fingerprint entry of a target's base layer (``module``: the base, or the GiVALinear
    around it): weight_fingerprint of its float weight (gathered under FSDP2), or for a quantized
    base quantized.fingerprint (packed data, scales, quantization state; "quantization" says
    what quantizes it)."""
    base = module.base if isinstance(module, GiVALinear) else module
    if quantization_of(base) is not None:
        return quantized_fingerprint(name, base)
    return weight_fingerprint(name, gathered(base.weight), cast)


def check_fingerprint_schema(fingerprint) -> None:
    """ValueError unless ``fingerprint`` is a list of weight_fingerprint entries."""
    if not isinstance(fingerprint, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in FINGERPRINT_KEYS.items())
            for e in fingerprint):
        raise ValueError(f"the fingerprint must be a list of {{{', '.join(FINGERPRINT_KEYS)}}}")


def _json_digest(value) -> str:
    """SHA-256 of a JSON value in canonical form (sorted keys, no spaces): the same for any text
    that parses to it, so it checks the header's content whatever its layout."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def pack(tensors: dict[str, torch.Tensor], key: str, header: dict) -> tuple[bytes, str]:
    """(safetensors bytes, header text): ``tensors`` with the header JSON as metadata ``key``. The
    header gets a checksum record, field "sha256": the SHA-256 of the rest of the header and of
    every tensor. One metadata entry, so the bytes are the same for the same adapter."""
    sums = {"header": _json_digest(header),
            "tensors": {name: _tensor_digest(t) for name, t in tensors.items()}}
    text = json.dumps({**header, CHECKSUM_FIELD: sums}, indent=2)
    return save_safetensors_bytes(tensors, metadata={key: text}), text


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file. A FIFO, device or socket is refused with a
    ValueError instead of blocking or reading without end (opened non-blocking, then checked on
    the open descriptor, so a file swapped in between is caught too)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is not a regular file (mode {stat.filemode(mode)}); refusing to read it")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def json_loads(text):
    """json.loads, with JSON nested too deeply for the parser refused as a ValueError (like any
    other bad JSON) instead of a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("the JSON is nested too deeply") from exc


def unpack(data: bytes, key: str) -> tuple[str, dict, dict[str, torch.Tensor], bool]:
    """(header text, header without its checksum record, tensors, verified) from pack's bytes:
    ``verified`` says whether a checksum record was there (and matched). ValueError saying what is
    wrong, for the caller to prefix with the file."""
    try:
        tensors = load_safetensors_bytes(data)  # checks the layout of the whole file
        header_size = int.from_bytes(data[:8], "little")
        metadata = json_loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"not a readable safetensors file (truncated or damaged?): {exc}") from exc
    if key not in metadata:
        raise ValueError(f"not a giva_ext file (no '{key}' metadata)")
    text = metadata[key]
    try:
        header = json_loads(text)
    except ValueError as exc:
        raise ValueError(f"its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    if CHECKSUM_FIELD not in header:
        return text, header, tensors, False
    sums = header.pop(CHECKSUM_FIELD)
    try:
        header_sum, tensor_sums = sums["header"], dict(sums["tensors"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"its checksum record is damaged ({type(exc).__name__}: {exc})") from exc
    if _json_digest(header) != header_sum:
        raise ValueError("its header is damaged (SHA-256 mismatch)")
    if set(tensor_sums) != set(tensors):
        raise ValueError(f"its tensor names are damaged: {sorted(set(tensors) ^ set(tensor_sums))[:3]} "
                         "are not in both the file and its checksum record")
    for name, t in tensors.items():
        if _tensor_digest(t) != tensor_sums[name]:
            raise ValueError(f"tensor {name!r} is damaged (SHA-256 mismatch)")
    return text, header, tensors, True


def check_finite_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first floating tensor holding NaN or Inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tensor {name!r} holds NaN or Inf")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a reader (or
    a process killed at any point) sees the old file or the new one, never a part. The temporary
    file's name holds the writer's pid, so that a later write removes what a killed one left."""
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    """Write each of ``files`` (name -> bytes) atomically into ``folder`` (created if needed), in
    order. What killed writers left of any of them is removed before the first write, so a writer
    killed in the second file leaves no stale temporary of the first behind."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        _remove_stale_temporaries(folder / name)
    for name, data in files.items():
        _atomic_write(folder / name, data)
    return folder


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of writes of ``path`` whose process is gone (killed before its
    rename): .<name>.<pid>.<random>.tmp with no process <pid> on this machine. A write in progress
    elsewhere keeps its file; so does any name this function did not make."""
    if os.name != "posix":  # os.kill(pid, 0) only probes on POSIX
        return
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) > 0 and not _process_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _adapter_config(model: nn.Module, adapter_name: str | None) -> tuple[str | None, GiVAConfig]:
    """(name, config) of adapter ``adapter_name``, or of the active adapter when it is None."""
    if adapter_name is None:
        return active_adapter(model), get_config(model)
    configs = vars(model).get(REGISTRY) or {}
    if adapter_name not in configs:
        raise UnknownAdapterError(f"the model has no adapter named {adapter_name!r}; it has {list(configs)}")
    return adapter_name, configs[adapter_name]


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Save adapter ``adapter_name`` (default: the active one) of ``model`` (bases, vectors,
    modules_to_save) into folder ``path``.

    Refuses (ValueError naming the tensor, before writing anything) a tensor holding NaN or Inf,
    e.g. after a diverged step, so a previous good adapter in ``path`` is never overwritten by it.
    Under FSDP2 (fully_shard) every process calls it: the shards are gathered, process 0 writes.
    """
    model = adapted_module(model)
    files = _adapter_files(model, adapter_name, path)
    return _write_adapter(Path(path), *files) if writes_here(model) else Path(path)


def _adapter_files(model: nn.Module, adapter_name: str | None, path) -> tuple[bytes, str]:
    """The two files of an adapter (safetensors bytes, config text), every check done."""
    model = adapted_module(model)  # names in the file are relative to it
    adapter_name, config = _adapter_config(model, adapter_name)
    layers = giva_layers(model, adapter_name)
    check_unmerged(wrapped_layers(model), "saving (the fingerprint must describe the pretrained weights)")
    tensors = {}
    for name, layer in layers.items():
        adapter = layer.adapters[adapter_name] if adapter_name is not None else layer.adapter
        for field in adapter.tensor_names:
            tensors[f"{name}.{field}"] = gathered(getattr(adapter, field)).detach().cpu().contiguous()
    for mname, module in _modules_to_save(model, config).items():
        for key, value in module.state_dict().items():
            tensors[f"{SAVED_PREFIX}{mname}.{key}"] = gathered(value).detach().cpu().contiguous().clone()
    try:
        check_finite_tensors(tensors)
    except ValueError as exc:
        raise ValueError(f"save_adapter: {exc}; nothing was written to {path}") from exc
    header = {"library": "giva_ext", "version": __version__, "format": FORMAT_VERSION,
              "config": config.to_dict(),
              "fingerprint": [base_fingerprint(n, layer, cast=True)
                              for n, layer in layers.items()]}
    return pack(tensors, METADATA_KEY, header)


def _write_adapter(folder: Path, data: bytes, text: str) -> Path:
    return write_files(folder, {WEIGHTS_NAME: data, CONFIG_NAME: (text + "\n").encode()})


def _check_header(header: dict) -> dict:
    """The header with its schema checked; config becomes a GiVAConfig."""
    if header.get("library") != "giva_ext":
        raise ValueError(f"its header says library {header.get('library')!r}, not 'giva_ext'")
    if type(header.get("format")) is not int or header["format"] not in READ_FORMATS:
        raise ValueError(f"it was written by giva_ext {header.get('version')!r} in adapter format "
                         f"{header.get('format')!r}; giva_ext {__version__} reads formats "
                         f"{list(READ_FORMATS)} (use the giva_ext version that wrote it)")
    try:
        header["config"] = GiVAConfig.from_dict(header["config"])
        check_fingerprint_schema(header["fingerprint"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"its header has a wrong schema ({type(exc).__name__}: {exc})") from exc
    return header


def _read_adapter(file: Path) -> tuple[dict, str, dict[str, torch.Tensor]]:
    """Header, header text and tensors of a saved adapter, all checked (ValueError otherwise)."""
    if not file.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {file.parent}")
    text, header, tensors, verified = unpack(read_regular_file(file), METADATA_KEY)
    header = _check_header(header)
    if not verified and header["format"] >= 2:
        raise ValueError(f"its checksum record is missing (format {header['format']} has one)")
    check_finite_tensors(tensors)
    return header, text, tensors


def _first_difference(a, b, path: str = "") -> str | None:
    """The first key path where two JSON values differ, or None if they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if a == b else (path or "the whole file")


def _check_config_file(file: Path, text: str) -> None:
    """Warn if adapter_config.json is unreadable or differs from the header it should copy."""
    if not file.exists():
        return
    try:
        differs = _first_difference(json_loads(read_regular_file(file)), json_loads(text))
    except (ValueError, OSError, RecursionError) as exc:
        differs = f"unreadable: {exc}"
    if differs is not None:
        warnings.warn(f"{file} does not match {WEIGHTS_NAME} ({differs}); it is ignored: the adapter "
                      f"loads from {WEIGHTS_NAME}, the source of truth (save the adapter again to "
                      "rewrite it)", RuntimeWarning, stacklevel=3)


def _check_fingerprint(saved: list[dict], targets: dict[str, nn.Module]) -> None:
    """Raise ValueError naming the first layer whose base weight differs from the saved one."""
    if set(targets) != {entry["name"] for entry in saved}:
        missing = sorted({e["name"] for e in saved} - set(targets))
        extra = sorted(set(targets) - {e["name"] for e in saved})
        raise ValueError(f"it targets other layers than this model: missing in model {missing[:3]}, "
                         f"not in adapter {extra[:3]}")
    for entry in saved:
        now = base_fingerprint(entry["name"], targets[entry["name"]])
        if now.get("quantization") != entry.get("quantization"):
            here, there = (e.get("quantization") or "not quantized" for e in (now, entry))
            raise ValueError(f"it was saved for another base model: layer {entry['name']!r} is {here} "
                             f"here but {there} in the adapter (an adapter trained on one quantization "
                             "of a model is refused on another: its vectors fit the base they were "
                             "trained on)")
        # A half-precision copy of the float32 base the adapter was saved on matches the digest of
        # that base cast to its dtype.
        cast_digest = f"sha256_{now['dtype']}"
        if now["dtype"] != entry["dtype"] and isinstance(entry.get(cast_digest), str):
            entry = {**entry, "dtype": now["dtype"], "sha256": entry[cast_digest]}
        for key in ("shape", "dtype", "sha256"):
            if now[key] != entry[key]:
                hint = (" (transposed: one of them is a transformers Conv1D, which stores its weight "
                        "as (in, out), and the other an nn.Linear)"
                        if key == "shape" and now[key] == entry[key][::-1] else "")
                raise ValueError(f"it was saved for another base model: layer {entry['name']!r} "
                                 f"has {key} {now[key]} here but {entry[key]} in the adapter{hint}")


def _check_fits(model: nn.Module, config: GiVAConfig, tensors: dict[str, torch.Tensor],
                targets: dict[str, nn.Module], adapter_name: str) -> None:
    """ValueError unless the tensors are exactly what the model needs: names, shapes, float kinds
    (against adapter ``adapter_name`` where a target already holds it)."""
    expected = {}
    for name, module in targets.items():
        in_f, out_f = linear_shape(module)
        r = config.r * chunks_for(name, config)
        held = (module.adapters[adapter_name] if isinstance(module, GiVALinear)
                and adapter_name in module.adapters else None)
        if held is not None and held.r != r:
            raise ValueError(f"it has rank {r} but adapter {adapter_name!r} of layer {name!r} has rank "
                             f"{held.r}")
        if held is not None and (held.lambda_i is not None) != config.input_scale:
            raise ValueError(f"it has input_scale={config.input_scale} but adapter {adapter_name!r} of "
                             f"layer {name!r} has input_scale={held.lambda_i is not None}")
        expected.update({f"{name}.A": (r, in_f, True), f"{name}.B": (out_f, r, True),
                         f"{name}.lambda_s": (r, True), f"{name}.lambda_o": (out_f, True)})
        if config.input_scale:
            expected[f"{name}.lambda_i"] = (in_f, True)
    for mname, module in _modules_to_save(model, config).items():
        for key, value in module.state_dict().items():
            expected[f"{SAVED_PREFIX}{mname}.{key}"] = (*value.shape, value.is_floating_point())
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise ValueError(f"its tensors do not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, (*shape, floating) in expected.items():
        t = tensors[key]
        if list(t.shape) != shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}, the model needs {tuple(shape)}")
        if t.is_floating_point() != floating:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, the model needs a "
                             f"{'floating' if floating else 'non-floating'} dtype")


@contextmanager
def _unchanged_on_error(model: nn.Module, overwritten: list[torch.Tensor]):
    """Put the model back exactly as it was if the block raises: every module's attributes (children,
    parameter and buffer slots, the model's GiVA registry), requires_grad flags, and the values of
    the tensors in ``overwritten`` (the only ones the block writes into)."""
    attrs = [(m, dict(m.__dict__), {k: dict(v) for k, v in m.__dict__.items() if isinstance(v, dict)})
             for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    values = [(t, t.detach().clone()) for t in overwritten]
    try:
        yield
    except BaseException:
        for module, saved, dicts in attrs:
            for key, contents in dicts.items():  # dicts in place: hook handles refer to them
                saved[key].clear()
                saved[key].update(contents)
            module.__dict__.clear()
            module.__dict__.update(saved)
        # Only what changed, and an inference tensor (which refuses changes outside inference mode)
        # in inference mode.
        for p, flag in flags:
            if p.requires_grad != flag:
                with torch.inference_mode(p.is_inference()):
                    p.requires_grad_(flag)
        for t, value in values:
            if not torch.equal(t, value):
                with torch.inference_mode(t.is_inference()), torch.no_grad():
                    t.copy_(value)
        raise


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load an adapter saved by save_adapter into ``model`` as adapter ``adapter_name``.

    A plain model gets apply_giva with the saved config first (the adapter is named
    ``adapter_name``, default "default", and active). On a model with GiVA layers, an existing
    adapter of that name (default: the active one) is overwritten; a new name is added with
    add_adapter (the active adapter does not change). The base weights must be the ones the adapter
    was saved with (checked by fingerprint). The file is checked in full first (layout, checksums,
    header schema, fingerprint, every tensor's name, shape and finiteness); on any error the model
    is left exactly as it was, and the error names the file and what is wrong (a ValueError for a
    damaged or unsuitable file). adapter_config.json is only compared with the header: a
    RuntimeWarning says if it is unreadable or differs. On a module that contains an adapted one
    (see adapted_module), the adapter goes into that one.
    """
    file = Path(path) / WEIGHTS_NAME
    outer, model = model, adapted_module(model)
    try:
        if is_sharded(model):
            raise ValueError("the model is sharded by FSDP2 (fully_shard); load the adapter before "
                             "fully_shard, on the whole model")
        if adapter_name is not None:
            check_adapter_name(adapter_name)
        header, text, tensors = _read_adapter(file)
        config: GiVAConfig = header["config"]
        wrapped = wrapped_layers(model)
        check_unmerged(wrapped, "load_adapter")
        if wrapped and adapter_name is None:
            adapter_name = active_adapter(model)
            if adapter_name is None:
                raise ValueError("the model's adapters are disabled: pass adapter_name to load it as")
        name = adapter_name or "default"
        existing = {n: layer for n, layer in wrapped.items() if name in layer.adapters}
        targets = find_targets(model, config)
        if existing and set(targets) != set(existing):
            raise ValueError(f"its config targets other layers than adapter {name!r} of the model: "
                             f"not in the model's adapter {sorted(set(targets) - set(existing))[:3]}, "
                             f"not targets of the file {sorted(set(existing) - set(targets))[:3]}")
        _check_fingerprint(header["fingerprint"], targets)
        _check_fits(model, config, tensors, targets, name)
        heads = _modules_to_save(model, config)
        overwritten = [getattr(layer.adapters[name], f) for layer in existing.values()
                       for f in layer.adapters[name].tensor_names]
        overwritten += [v for module in heads.values() for v in module.state_dict().values()]
        with _unchanged_on_error(model, overwritten):
            if not wrapped:
                apply_giva(model, config, name)
            elif existing:
                register_adapter(model, name, config)
            else:
                add_adapter(model, name, config)
            with torch.no_grad():
                for target, layer in giva_layers(model, name).items():
                    for field in layer.adapters[name].tensor_names:
                        getattr(layer.adapters[name], field).copy_(tensors[f"{target}.{field}"])
            for mname, module in heads.items():
                prefix = f"{SAVED_PREFIX}{mname}."
                module.load_state_dict({k[len(prefix):]: t for k, t in tensors.items()
                                        if k.startswith(prefix)})
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        # The same kind of error, prefixed by the file (a KeyError as one that prints plainly).
        kind = UnknownAdapterError if isinstance(exc, KeyError) else next(
            k for k in (ValueError, TypeError, RuntimeError) if isinstance(exc, k))
        raise kind(f"{file}: {exc}") from exc
    _check_config_file(file.parent / CONFIG_NAME, text)
    return outer


INDEX_NAME = "adapters.json"


def save_adapters(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Save every adapter of ``model`` into ``folder/<name>/`` (each as save_adapter writes it, each
    atomic) and ``folder/adapters.json``: the names in id order and the active one. Under FSDP2
    every process calls it, as save_adapter."""
    folder = Path(folder)
    model = adapted_module(model)
    names = adapter_names(model)
    if not names:
        raise ValueError("model has no GiVA adapter; call apply_giva(model, config) first")
    files = {name: _adapter_files(model, name, folder / name) for name in names}  # every check first
    if not writes_here(model):  # FSDP2: every process gathered, process 0 writes
        return folder
    for name, (data, text) in files.items():
        _write_adapter(folder / name, data, text)
    index = {"library": "giva_ext", "adapters": names, "active": active_adapter(model)}
    _atomic_write(folder / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    return folder


def load_adapters(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Load every adapter save_adapters wrote into ``folder``, by name and in id order, and activate
    the one that was active. All or nothing: if one fails, the model is left as it was."""
    folder = Path(folder)
    file = folder / INDEX_NAME
    try:
        index = json_loads(read_regular_file(file))
        names, active = index["adapters"], index["active"]
        if not isinstance(names, list) or not names or (active is not None and active not in names):
            raise ValueError(f"adapters {names!r} with active {active!r}")
        for name in names:
            check_adapter_name(name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: not a readable adapter index ({type(exc).__name__}: {exc})") from exc
    outer, model = model, adapted_module(model)
    overwritten = [getattr(a, f) for layer in wrapped_layers(model).values()
                   for a in layer.adapters.values() for f in a.tensor_names]
    with _unchanged_on_error(model, overwritten):
        for name in names:
            load_adapter(model, folder / name, name)
        set_adapter(model, active)
    return outer
