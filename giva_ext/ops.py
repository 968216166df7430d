"""The native library's Python surface: loading _C, and the ops registered in it.

The schemas live in csrc/giva.cpp and the kernels in csrc/cpu and csrc/cuda; this module adds what
the compiler stack and autograd need (fake kernels, the backward formula).  To add an op: define its
schema in giva.cpp, write its kernels and its reference in reference.py, register the fake (and the
autograd, if it is differentiable) here, and opcheck it in tests/test_ops.py.

Without a loadable _C every caller falls back to giva_ext.reference, after one warning saying why.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch


def _load() -> str | None:
    """Load the op library; returns why it could not be loaded, or None."""
    # _C only registers ops with the dispatcher (no Python bindings), so it is loaded as a torch op
    # library rather than imported as a Python module.
    spec = importlib.util.find_spec("giva_ext._C")
    if spec is None or spec.origin is None:
        return ("giva_ext._C is not built (pip install --no-build-isolation -e . or "
                "python setup.py build_ext --inplace)")
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:  # e.g. built against another torch: undefined symbols
        return f"cannot load {spec.origin}: {exc}"
    return None


LOAD_ERROR: str | None = _load()
HAS_NATIVE = LOAD_ERROR is None
if not HAS_NATIVE:
    warnings.warn(f"giva_ext: native ops unavailable ({LOAD_ERROR}); using the pure-PyTorch reference",
                  RuntimeWarning, stacklevel=2)

# The dtypes each device's kernels accept.
_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
# Which devices have a kernel, looked up once: a plain dict keeps supports() traceable by dynamo.
_HAS_KERNEL = {
    dev: HAS_NATIVE and torch._C._dispatch_has_kernel_for_dispatch_key("giva::linear_forward", dev.upper())
    for dev in _DTYPES
}


def supports(x: torch.Tensor) -> bool:
    """Whether the native fused op handles x: _C loaded, a kernel for x's device, x's dtype."""
    dev = x.device.type
    return _HAS_KERNEL.get(dev, False) and x.dtype in _DTYPES[dev]


def linear(x, weight, bias, A, B, lambda_s, lambda_o):
    """y = x W^T + bias + lambda_o * ((lambda_s * (x A^T)) B^T) on 2-D x, differentiable in x and
    the vectors (weight, bias, A and B are treated as frozen)."""
    y, _ = torch.ops.giva.linear_forward(x, weight, bias, A, B, lambda_s, lambda_o)
    return y


if HAS_NATIVE:
    @torch.library.register_fake("giva::linear_forward")
    def _linear_forward_fake(x, weight, bias, A, B, lambda_s, lambda_o):
        T = x.shape[0]
        return x.new_empty(T, weight.shape[0]), x.new_empty(T, A.shape[0])

    @torch.library.register_fake("giva::linear_backward")
    def _linear_backward_fake(grad_y, s, weight, A, B, lambda_s, lambda_o, output_mask):
        need_x, need_s, need_o = output_mask
        return (grad_y.new_empty(grad_y.shape[0], weight.shape[1]) if need_x else None,
                lambda_s.new_empty(lambda_s.shape) if need_s else None,
                lambda_o.new_empty(lambda_o.shape) if need_o else None)

    def _setup_context(ctx, inputs, output):
        _, weight, _, A, B, lambda_s, lambda_o = inputs
        s = output[1]
        ctx.mark_non_differentiable(s)  # s is the saved activation, not a result to train through
        ctx.save_for_backward(s, weight, A, B, lambda_s, lambda_o)

    def _backward(ctx, grad_y, _grad_s):
        need_x, need_s, need_o = (ctx.needs_input_grad[i] for i in (0, 5, 6))
        grad_x = grad_s = grad_o = None
        if need_x or need_s or need_o:
            grad_x, grad_s, grad_o = torch.ops.giva.linear_backward(
                grad_y, *ctx.saved_tensors, [need_x, need_s, need_o])
        return grad_x, None, None, None, None, grad_s, grad_o

    torch.library.register_autograd("giva::linear_forward", _backward, setup_context=_setup_context)
