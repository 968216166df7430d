"""The native library's Python surface: loading _C, and the ops registered in it.

Without a loadable _C every caller falls back to giva_ext.reference, after one warning saying why.
"""
from __future__ import annotations

import importlib
import warnings

import torch

LOAD_ERROR: str | None = None
try:
    importlib.import_module("giva_ext._C")
    HAS_NATIVE = True
except ImportError as exc:  # not built, or built for another torch
    HAS_NATIVE = False
    LOAD_ERROR = str(exc)
    warnings.warn(f"giva_ext: native ops unavailable ({exc}); using the pure-PyTorch reference",
                  RuntimeWarning, stacklevel=2)


def supports(x: torch.Tensor) -> bool:
    """Whether the native fused op handles x (device and dtype)."""
    return False


def linear(x, weight, bias, A, B, lambda_s, lambda_o):
    raise NotImplementedError("native giva ops are not built")
