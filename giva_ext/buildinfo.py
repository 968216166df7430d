"""What the native library giva_ext._C was built for, and whether that fits the running torch.

When setup.py builds _C it writes a build record, ``_C.json``, next to the library: the mode (cpu or
cuda), the torch version it was compiled against, torch's CUDA version (cuda builds only) and
TORCH_CUDA_ARCH_LIST (cuda builds only). A separate file rather than data inside the library,
because the record must be readable exactly when the library cannot be loaded (a CUDA build under
a CPU torch fails to load with undefined symbols). giva_ext.ops reads it before loading _C.

The same functions give the wheel's version tag. Standard library only: setup.py loads this file
by path, before giva_ext (which imports torch and loads _C) can be imported.
"""
from __future__ import annotations

import json

RECORD_NAME = "_C.json"
MODES = ("cpu", "cuda")


def make_record(mode: str, torch_version: str, cuda_version: str | None,
                arch_list: str | None) -> dict:
    """The build record of a library built in ``mode`` against this torch."""
    if mode not in MODES:
        raise ValueError(f"build mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "cuda" and not cuda_version:
        raise ValueError("a cuda build needs torch's CUDA version")
    cuda = mode == "cuda"
    return {"mode": mode, "torch": str(torch_version), "cuda": cuda_version if cuda else None,
            "arch_list": arch_list if cuda else None}


def write_record(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def read_record(path: str) -> dict:
    """The build record at ``path``; ValueError naming the file if it is not a valid record."""
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    keys = {"mode", "torch", "cuda", "arch_list"}
    if not isinstance(record, dict) or set(record) != keys or record["mode"] not in MODES:
        raise ValueError(f"{path} is not a giva_ext build record (want the keys {sorted(keys)} "
                         f"and mode cpu or cuda)")
    return record


def major_minor(torch_version: str) -> str:
    """'2.14.1+cu130' -> '2.14'."""
    return ".".join(str(torch_version).split("+")[0].split(".")[:2])


def cuda_major(cuda_version: str) -> str:
    """'13.0' -> '13'."""
    return cuda_version.split(".")[0]


def describe(torch_version: str, cuda_version: str | None) -> str:
    """'torch 2.14 + CUDA 13' or 'torch 2.13 (CPU)'."""
    if cuda_version:
        return f"torch {major_minor(torch_version)} + CUDA {cuda_major(cuda_version)}"
    return f"torch {major_minor(torch_version)} (CPU)"


def mismatch(record: dict, torch_version: str, cuda_version: str | None) -> str | None:
    """Why a library with this build record cannot run under this torch, or None if it can.

    It can when torch's major.minor matches and, for a cuda build, torch has CUDA of the same
    major version. A cpu build runs under a CUDA torch too (its CUDA tensors take the reference).
    """
    fits = major_minor(record["torch"]) == major_minor(torch_version)
    if record["mode"] == "cuda":
        fits = fits and bool(cuda_version) and cuda_major(record["cuda"]) == cuda_major(cuda_version)
    if fits:
        return None
    return (f"built for {describe(record['torch'], record['cuda'])}, "
            f"running {describe(torch_version, cuda_version)}")


def version_tag(base: str, mode: str, torch_version: str | None = None,
                cuda_version: str | None = None) -> str:
    """The wheel version for a build: '0.1.0+cu130torch2.14' (cuda), '0.1.0+cputorch2.13' (cpu),
    '0.1.0' (none: no native code, so nothing ties the wheel to a torch)."""
    if mode == "none":
        return base
    if mode == "cpu":
        return f"{base}+cputorch{major_minor(torch_version)}"
    if mode == "cuda":
        return f"{base}+cu{cuda_version.replace('.', '')}torch{major_minor(torch_version)}"
    raise ValueError(f"build mode must be cpu, cuda or none, got {mode!r}")
