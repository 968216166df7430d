"""The native library's Python surface: loading _C, and the ops registered in it.

The schemas live in csrc/giva.cpp and the kernels in csrc/cpu and csrc/cuda; this module adds what
the compiler stack and autograd need (fake kernels, the backward formula). The sketch ops
(sketch_update, rsvd) have no backward: they are called by init_bases through giva_ext/rsvd.py,
which falls back to the reference where no kernel fits.  To add an op: define its
schema in giva.cpp, write its kernels and its reference in reference.py, register the fake (and the
autograd, if it is differentiable) here, and opcheck it in tests/test_ops.py.

Without a loadable _C every caller falls back to giva_ext.reference, after one warning saying why.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import buildinfo, reference


def _load() -> tuple[dict | None, str | None]:
    """Load the op library if its build record fits this torch.

    Returns (the build record, or None where the library or its record is missing; why the library
    is not loaded, or None). A library without a record (a CMake build) is loaded unchecked.
    """
    # _C only registers ops with the dispatcher (no Python bindings), so it is loaded as a torch op
    # library rather than imported as a Python module.
    spec = importlib.util.find_spec("giva_ext._C")
    if spec is None or spec.origin is None:
        return None, ("giva_ext._C is not built (pip install --no-build-isolation -e . or "
                      "python setup.py build_ext --inplace)")
    record_path = os.path.join(os.path.dirname(spec.origin), buildinfo.RECORD_NAME)
    record = None
    if os.path.exists(record_path):
        try:
            record = buildinfo.read_record(record_path)
        except ValueError as exc:
            return None, str(exc)
        reason = buildinfo.mismatch(record, torch.__version__, torch.version.cuda)
        if reason is not None:
            return record, f"{reason}; rebuild giva_ext for this torch"
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:  # e.g. built against another torch: undefined symbols
        return record, f"cannot load {spec.origin}: {exc}"
    return record, None


BUILD_INFO, LOAD_ERROR = _load()
HAS_NATIVE = LOAD_ERROR is None
if not HAS_NATIVE:
    warnings.warn(f"giva_ext: native ops unavailable ({LOAD_ERROR}); using the pure-PyTorch reference",
                  RuntimeWarning, stacklevel=2)

# The dtypes each device's kernels accept.
_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
# rsvd works in float32 or float64 on every device.
_RSVD_DTYPES = (torch.float32, torch.float64)


def _has_kernel(op: str, dev: str) -> bool:
    """Whether _C registers a kernel of ``op`` for ``dev`` (False for an op an older _C lacks)."""
    if not HAS_NATIVE:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, dev.upper())
    except RuntimeError:  # no such op
        return False


# Which devices have a kernel, looked up once: a plain dict keeps supports() traceable by dynamo.
_HAS_KERNEL = {dev: _has_kernel("giva::linear_forward", dev) for dev in _DTYPES}
_HAS_SKETCH = {dev: _has_kernel("giva::sketch_update", dev) for dev in _DTYPES}
_HAS_RSVD = {dev: _has_kernel("giva::rsvd", dev) for dev in _DTYPES}
_HAS_MIXED = {dev: _has_kernel("giva::mixed_linear", dev) for dev in _DTYPES}
_HAS_ADAPTER = {dev: _has_kernel("giva::adapter_forward", dev) for dev in _DTYPES}


def supports(x: torch.Tensor) -> bool:
    """Whether the native fused op handles x: _C loaded, a kernel for x's device, x's dtype."""
    dev = x.device.type
    return _HAS_KERNEL.get(dev, False) and x.dtype in _DTYPES[dev]


def supports_adapter(x: torch.Tensor) -> bool:
    """Whether the native adapter-only op handles x: a kernel for its device and dtype."""
    dev = x.device.type
    return _HAS_ADAPTER.get(dev, False) and x.dtype in _DTYPES[dev]


def supports_mixed(x: torch.Tensor) -> bool:
    """Whether the native mixed-adapter op handles x: a kernel for its device and dtype."""
    dev = x.device.type
    return _HAS_MIXED.get(dev, False) and x.dtype in _DTYPES[dev]


def supports_sketch(x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the native sketch_update handles x and g: a kernel for their device and dtype."""
    dev = x.device.type
    return _HAS_SKETCH.get(dev, False) and x.dtype in _DTYPES[dev] and g.dtype == x.dtype


def supports_rsvd(A: torch.Tensor) -> bool:
    """Whether the native rsvd handles A: a kernel for its device, float32 or float64."""
    return _HAS_RSVD.get(A.device.type, False) and A.dtype in _RSVD_DTYPES


def linear(x, weight, bias, A, B, lambda_s, lambda_o):
    """y = x W^T + bias + lambda_o * ((lambda_s * (x A^T)) B^T) on 2-D x, differentiable in x and
    the vectors (weight, bias, A and B are treated as frozen)."""
    y, _ = torch.ops.giva.linear_forward(x, weight, bias, A, B, lambda_s, lambda_o)
    return y


def adapter(x, base, A, B, lambda_s, lambda_o):
    """base + lambda_o * ((lambda_s * (x A^T)) B^T) on 2-D x, for a base output the frozen layer
    computed itself; differentiable in x (the adapter's part), base and the vectors."""
    y, _ = torch.ops.giva.adapter_forward(x, base, A, B, lambda_s, lambda_o)
    return y


if HAS_NATIVE:
    @torch.library.register_fake("giva::linear_forward")
    def _linear_forward_fake(x, weight, bias, A, B, lambda_s, lambda_o):
        T = x.shape[0]
        return x.new_empty(T, weight.shape[0]), x.new_empty(T, A.shape[0], dtype=reference.saved_s_dtype(x.dtype))

    @torch.library.register_fake("giva::linear_backward")
    def _linear_backward_fake(grad_y, s, weight, A, B, lambda_s, lambda_o, output_mask):
        need_x, need_s, need_o = output_mask
        return (grad_y.new_empty(grad_y.shape[0], weight.shape[1]) if need_x else None,
                lambda_s.new_empty(lambda_s.shape) if need_s else None,
                lambda_o.new_empty(lambda_o.shape) if need_o else None)

    def _setup_context(ctx, inputs, output):
        _, weight, _, A, B, lambda_s, lambda_o = inputs
        # s (the saved activation) stays differentiable, so that a double backward, whose graph
        # holds s, reaches x; its gradient is None unless such a backward needs it.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], weight, A, B, lambda_s, lambda_o)

    def _backward(ctx, grad_y, grad_s):
        mask = tuple(ctx.needs_input_grad[i] for i in (0, 5, 6))
        s, weight, A, B, lambda_s, lambda_o = ctx.saved_tensors
        # With create_graph the backward itself must be differentiable: the reference's torch ops.
        backward = reference.linear_backward if torch.is_grad_enabled() else torch.ops.giva.linear_backward
        grad_x, grad_ls, grad_lo = reference.backward_through_s(
            grad_y, grad_s, A, mask, lambda g, m: backward(g, s, weight, A, B, lambda_s, lambda_o, m))
        return grad_x, None, None, None, None, grad_ls, grad_lo

    torch.library.register_autograd("giva::linear_forward", _backward, setup_context=_setup_context)

if any(_HAS_ADAPTER.values()):
    @torch.library.register_fake("giva::adapter_forward")
    def _adapter_forward_fake(x, base, A, B, lambda_s, lambda_o):
        return (x.new_empty(x.shape[0], base.shape[1]),
                x.new_empty(x.shape[0], A.shape[0], dtype=reference.saved_s_dtype(x.dtype)))

    @torch.library.register_fake("giva::adapter_backward")
    def _adapter_backward_fake(grad_y, s, A, B, lambda_s, lambda_o, output_mask):
        need_x, need_s, need_o = output_mask
        return (grad_y.new_empty(grad_y.shape[0], A.shape[1]) if need_x else None,
                lambda_s.new_empty(lambda_s.shape) if need_s else None,
                lambda_o.new_empty(lambda_o.shape) if need_o else None)

    def _adapter_setup_context(ctx, inputs, output):
        _, _, A, B, lambda_s, lambda_o = inputs
        ctx.set_materialize_grads(False)  # as for linear_forward: s stays differentiable
        ctx.save_for_backward(output[1], A, B, lambda_s, lambda_o)

    def _adapter_backward(ctx, grad_y, grad_s):
        mask = tuple(ctx.needs_input_grad[i] for i in (0, 4, 5))
        s, A, B, lambda_s, lambda_o = ctx.saved_tensors
        backward = reference.adapter_backward if torch.is_grad_enabled() else torch.ops.giva.adapter_backward
        grad_x, grad_ls, grad_lo = reference.backward_through_s(
            grad_y, grad_s, A, mask, lambda g, m: backward(g, s, A, B, lambda_s, lambda_o, m))
        grad_base = grad_y if ctx.needs_input_grad[1] else None  # y = base + the adapter's term
        return grad_x, grad_base, None, None, grad_ls, grad_lo

    torch.library.register_autograd("giva::adapter_forward", _adapter_backward,
                                    setup_context=_adapter_setup_context)

if any(_HAS_MIXED.values()):
    @torch.library.register_fake("giva::mixed_linear")
    def _mixed_linear_fake(x, weight, bias, A, B, lambda_s, lambda_o, token_ids):
        return x.new_empty(x.shape[0], weight.shape[0])

if any(_HAS_SKETCH.values()):
    @torch.library.register_fake("giva::sketch_update")
    def _sketch_update_fake(x, g, omega, psi, Y, Z):
        return Y.new_empty(Y.shape), Z.new_empty(Z.shape)

if any(_HAS_RSVD.values()):
    @torch.library.register_fake("giva::rsvd")
    def _rsvd_fake(A, omega, k, niter):
        *batch, m, n = A.shape
        return A.new_empty(*batch, m, k), A.new_empty(*batch, k), A.new_empty(*batch, n, k)
