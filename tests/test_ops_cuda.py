"""The CUDA kernels of the giva ops against giva_ext.reference (skipped without a GPU or kernels).

fp32 must match the fp32 reference tightly. fp16/bf16 follow the flash-attention rule: the kernel's
max error against a float64 reference on the same inputs is at most twice the error of the
same-precision PyTorch composite (reference.py run in that dtype), plus one ulp of slack.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from giva_ext import giva_linear, ops, reference


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not ops.HAS_NATIVE:
        return f"giva_ext._C is not loaded ({ops.LOAD_ERROR})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("giva::linear_forward", "CUDA"):
        return "giva_ext._C was built without CUDA kernels (GIVA_BUILD=cuda)"
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (T, in, out, r): aligned, T=1/r=1, odd sizes, the largest fused rank, the cuBLAS path just
# above it (r=9) and well above it (r=64), several column tiles and row groups, T=0.
SHAPES = [(64, 128, 96, 8), (1, 64, 32, 1), (37, 23, 29, 3), (5, 37, 23, 8), (50, 72, 80, 9),
          (128, 256, 192, 64), (1031, 4104, 520, 4), (0, 16, 8, 4)]


def _inputs(T, n_in, n_out, r, dtype, bias=True, seed=0, device="cuda"):
    """Layer tensors (fp32 draws, cast to dtype on the device); lambda_o != 0 so the adapter counts."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "x": torch.randn(T, n_in, generator=g),
        "weight": torch.randn(n_out, n_in, generator=g) / n_in ** 0.5,
        "bias": torch.randn(n_out, generator=g) if bias else None,
        "A": torch.randn(r, n_in, generator=g) / n_in ** 0.5,
        "B": torch.randn(n_out, r, generator=g) / r ** 0.5,
        "lambda_s": 1 + 0.5 * torch.randn(r, generator=g),
        "lambda_o": torch.randn(n_out, generator=g),
    }
    return {k: None if v is None else v.to(device, dtype) for k, v in t.items()}


def _as(t: dict, dtype) -> dict:
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def _args(t):
    return t["x"], t["weight"], t["bias"], t["A"], t["B"], t["lambda_s"], t["lambda_o"]


def _saved_s(t):
    """s = x A^T as the forward saves it: in float32 beside float16 x, else in x's dtype."""
    acc = reference.saved_s_dtype(t["x"].dtype)
    return t["x"].to(acc) @ t["A"].to(acc).t()


def _assert_matches(out, composite, ref64, dtype, what):
    """out vs ref64: tight in fp32, else at most 2x the same-precision composite's error."""
    assert out.dtype == dtype and out.shape == ref64.shape, what
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    ref = ref64.double()
    scale = ref.abs().max().item() or 1.0
    err = (out.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * scale + 1e-6, f"{what}: max error {err:.3g} (scale {scale:.3g})"
    else:
        comp_err = (composite.double() - ref).abs().max().item()
        slack = torch.finfo(dtype).eps * scale
        assert err <= 2 * comp_err + slack, (
            f"{what}: max error {err:.3g} > 2 x composite {comp_err:.3g} + {slack:.3g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_reference(shape, dtype, bias):
    t = _inputs(*shape, dtype, bias=bias)
    y, s = torch.ops.giva.linear_forward(*_args(t))
    y_c, s_c = reference.linear_forward(*_args(t))
    y_64, s_64 = reference.linear_forward(*_args(_as(t, torch.float64)))
    _assert_matches(y, y_c, y_64, dtype, "y")
    _assert_matches(s, s_c, s_64, reference.saved_s_dtype(dtype), "s")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_reference(shape, dtype):
    T, _, n_out, r = shape
    t = _inputs(*shape, dtype, seed=1)
    gy = torch.randn(T, n_out, device="cuda").to(dtype)
    s = _saved_s(t)  # the saved activation, as the forward returns it
    rest = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    got = torch.ops.giva.linear_backward(gy, s, *rest, [True, True, True])
    composite = reference.linear_backward(gy, s, *rest)
    ref64 = reference.linear_backward(gy.double(), s.double(), *(v.double() for v in rest))
    for name, a, c, e in zip(("grad_x", "grad_lambda_s", "grad_lambda_o"), got, composite, ref64):
        _assert_matches(a, c, e, dtype, name)


@pytest.mark.parametrize("r", [4, 16], ids=["fused", "cublas"])
def test_fp16_lambda_gradients_past_fp16_range_of_M(r):
    """M = g^T s sums T products: here its entries reach ~8e4, past fp16's 65504, while the
    lambda gradients stay in range. Both rank paths keep M in fp32 (the fp16 composite would give
    inf); the gradients match a float64 reference to fp16 precision."""
    T, n_in, n_out = 4096, 64, 32
    t = _inputs(T, n_in, n_out, r, torch.float16, seed=2)
    gy = torch.ones(T, n_out, device="cuda", dtype=torch.float16)
    s = torch.full((T, r), 20.0, device="cuda")  # fp32, as the forward saves it beside fp16
    t["B"] = (t["B"].float() * 1e-3).half()
    rest = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    _, grad_s, grad_o = torch.ops.giva.linear_backward(gy, s, *rest, [False, True, True])
    _, want_s, want_o = reference.linear_backward(gy.double(), s.double(), *(v.double() for v in rest),
                                                  (False, True, True))
    for name, got, want in (("grad_lambda_s", grad_s, want_s), ("grad_lambda_o", grad_o, want_o)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=4e-3, atol=1e-2, msg=name)


def _overflow_case(r, device, T=6):
    """fp16 layer tensors where s = x A^T (about 3000 x 1024 / 32 = 96000) passes fp16's 65504
    while the frozen layer's output stays in range, at lambda_o = 0 (as after init); the vectors
    in fp32, as GiVALinear keeps them (their gradients, about 6e5, would not fit fp16 either)."""
    g = torch.Generator().manual_seed(5)
    n_in, n_out = 1024, 16
    t = {"x": 3000 * (1 + 0.01 * torch.randn(T, n_in, generator=g)),
         "weight": torch.randn(n_out, n_in, generator=g) * 1e-3,
         "bias": torch.randn(n_out, generator=g),
         "A": torch.full((r, n_in), 1 / 32),
         "B": torch.randn(n_out, r, generator=g),
         "lambda_s": torch.ones(r),
         "lambda_o": torch.zeros(n_out)}
    return {k: v.to(device, torch.float32 if k.startswith("lambda") else torch.float16)
            for k, v in t.items()}


def _assert_starts_at_base(forward, backward, t):
    """The adapted layer at lambda_o = 0 gives the frozen layer's output bit for bit, s is finite
    in fp32, and the backward is finite: grad lambda_s = 0 exactly, the rest as in float64."""
    y, s = forward(*_args(t))
    assert torch.equal(y, torch.nn.functional.linear(t["x"], t["weight"], t["bias"]))
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    s64 = t["x"].double() @ t["A"].double().t()
    assert s64.abs().max() > torch.finfo(torch.float16).max  # the case overflows fp16
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=0)
    gy = torch.ones_like(y)
    rest = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    grad_x, grad_s, grad_o = backward(gy, s, *rest, [True, True, True])
    want_x, _, want_o = reference.linear_backward(gy.double(), s64, *(v.double() for v in rest))
    assert torch.equal(grad_s, torch.zeros_like(grad_s))
    for name, got, want in (("grad_x", grad_x, want_x), ("grad_lambda_o", grad_o, want_o)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("r", [4, 16], ids=["fused", "cublas"])
def test_fp16_s_past_fp16_range_starts_at_base(r):
    t = _overflow_case(r, "cuda")
    _assert_starts_at_base(torch.ops.giva.linear_forward, torch.ops.giva.linear_backward, t)


@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)), ids=str)
def test_backward_output_mask(mask):
    t = _inputs(40, 48, 56, 6, torch.float32)
    gy = torch.randn(40, 56, device="cuda")
    s = _saved_s(t)
    rest = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    full = torch.ops.giva.linear_backward(gy, s, *rest, [True, True, True])
    got = torch.ops.giva.linear_backward(gy, s, *rest, list(mask))
    for need, a, f in zip(mask, got, full):
        if need:
            torch.testing.assert_close(a, f, rtol=0, atol=0)
        else:
            assert a is None


def test_backward_is_deterministic():
    t = _inputs(4099, 1032, 2056, 8, torch.bfloat16)
    gy = torch.randn(4099, 2056, device="cuda").bfloat16()
    s = _saved_s(t)
    args = (gy, s, t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"], [True, True, True])
    first = torch.ops.giva.linear_backward(*args)
    for _ in range(3):
        for a, b in zip(first, torch.ops.giva.linear_backward(*args)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [8, 64])
def test_gradients_through_autograd(dtype, r):
    """x, lambda_s and lambda_o grads via giva_linear (native op + registered autograd) on 3-D x."""
    t = _inputs(2 * 33, 80, 72, r, dtype)
    x3 = t["x"].reshape(2, 33, 80)
    gy = torch.randn(2, 33, 72, device="cuda").to(dtype)

    def grads(x, weight, bias, A, B, lambda_s, lambda_o, fn):
        x, lambda_s, lambda_o = (v.detach().requires_grad_() for v in (x, lambda_s, lambda_o))
        y = fn(x, weight, bias, A, B, lambda_s, lambda_o)
        y.backward(gy.to(y.dtype).reshape(y.shape))
        return y.detach(), x.grad, lambda_s.grad, lambda_o.grad

    def ref_fn(x, *rest):
        y = reference.linear(x.reshape(-1, x.shape[-1]), *rest)
        return y.reshape(*x.shape[:-1], -1)

    layer = (t["weight"], t["bias"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    got = grads(x3, *layer, fn=giva_linear)
    composite = grads(x3, *layer, fn=ref_fn)
    ref64 = grads(x3.double(), *(v.double() for v in layer), fn=ref_fn)
    for name, a, c, e in zip(("y", "grad_x", "grad_lambda_s", "grad_lambda_o"), got, composite, ref64):
        _assert_matches(a, c, e, dtype, name)


@pytest.mark.parametrize("layout", ["strided_columns", "padded_rows_aligned", "padded_rows_odd"])
def test_non_contiguous_x(layout):
    """x and grad_y views: copied (column stride 2) or read in place with a row stride (aligned
    vector loads, or the element-wise path for an odd offset)."""
    T, n_in, n_out = 45, 64, 40
    t = _inputs(T, n_in, n_out, 5, torch.bfloat16)
    x = t["x"]
    if layout == "strided_columns":
        view = torch.zeros(T, 2 * n_in, device="cuda", dtype=x.dtype)
        view[:, ::2] = x
        view = view[:, ::2]
    else:
        first = 0 if layout == "padded_rows_aligned" else 1
        view = torch.zeros(T, n_in + 8, device="cuda", dtype=x.dtype)
        view[:, first:first + n_in] = x
        view = view[:, first:first + n_in]
    t["x"] = view
    y, s = torch.ops.giva.linear_forward(*_args(t))
    t["x"] = x
    y_c, s_c = reference.linear_forward(*_args(t))
    y_64, _ = reference.linear_forward(*_args(_as(t, torch.float64)))
    _assert_matches(y, y_c, y_64, torch.bfloat16, "y")
    # s comes from the thin kernel alone, which sums in the same order on every path.
    torch.testing.assert_close(s, torch.ops.giva.linear_forward(*_args(t))[1], rtol=0, atol=0)

    gy = torch.randn(T, n_out, device="cuda").bfloat16()
    gy_view = torch.zeros(T, n_out + 8, device="cuda", dtype=gy.dtype)
    gy_view[:, 1:n_out + 1] = gy
    rest = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    got = torch.ops.giva.linear_backward(gy_view[:, 1:n_out + 1], s, *rest, [True, True, True])
    composite = reference.linear_backward(gy, s, *rest)
    ref64 = reference.linear_backward(gy.double(), s.double(), *(v.double() for v in rest))
    for name, a, c, e in zip(("grad_x", "grad_lambda_s", "grad_lambda_o"), got, composite, ref64):
        _assert_matches(a, c, e, torch.bfloat16, name)


def test_unaligned_bias_view():
    t = _inputs(16, 32, 40, 4, torch.float16)
    t["bias"] = torch.randn(41, device="cuda").half()[1:]  # 2-byte offset: the scalar store path
    y, _ = torch.ops.giva.linear_forward(*_args(t))
    y_c, _ = reference.linear_forward(*_args(t))
    y_64, _ = reference.linear_forward(*_args(_as(t, torch.float64)))
    _assert_matches(y, y_c, y_64, torch.float16, "y")


@pytest.mark.parametrize("r", [4, 16])
def test_opcheck(r):
    t = _inputs(24, 40, 32, r, torch.float32)
    torch.library.opcheck(torch.ops.giva.linear_forward.default, _args(t))
    s = _saved_s(t)
    gy = torch.randn(24, 32, device="cuda")
    rest = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(torch.ops.giva.linear_backward.default, (gy, s, *rest, mask))


def test_torch_compile_matches_eager():
    t = _inputs(48, 64, 40, 8, torch.bfloat16)
    gy = torch.randn(48, 40, device="cuda").bfloat16()

    def step(x, weight, bias, A, B, lambda_s, lambda_o):
        return giva_linear(x, weight, bias, A, B, lambda_s, lambda_o)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        x, ls, lo = (t[k].detach().requires_grad_() for k in ("x", "lambda_s", "lambda_o"))
        y = fn(x, t["weight"], t["bias"], t["A"], t["B"], ls, lo)
        y.backward(gy)
        results.append((y.detach(), x.grad, ls.grad, lo.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _bad_forward_cases():
    yield "weight", lambda t: t.update(weight=t["weight"].cpu())
    yield "weight", lambda t: t.update(weight=t["weight"].double())
    yield "A", lambda t: t.update(A=t["A"][:, :-1])
    yield "B", lambda t: t.update(B=t["B"][:-1])
    yield "bias", lambda t: t.update(bias=t["bias"][:-1])
    yield "lambda_s", lambda t: t.update(lambda_s=t["lambda_s"].half())
    yield "lambda_o", lambda t: t.update(lambda_o=t["lambda_o"][:-1])
    yield "x", lambda t: t.update(x=t["x"].double())  # no float64 CUDA kernel
    yield "x", lambda t: t.update(x=t["x"][None])


@pytest.mark.parametrize("name,break_it", list(_bad_forward_cases()),
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(_bad_forward_cases())])
def test_bad_forward_input_names_the_argument(name, break_it):
    t = _inputs(8, 16, 12, 4, torch.float32)
    break_it(t)
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        torch.ops.giva.linear_forward(*_args(t))


def test_bad_backward_input_names_the_argument():
    t = _inputs(8, 16, 12, 4, torch.float32)
    gy = torch.randn(8, 12, device="cuda")
    s = _saved_s(t)
    rest = [t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"], [True, True, True]]
    with pytest.raises(RuntimeError, match=r"\bs\b"):
        torch.ops.giva.linear_backward(gy, s[:-1], *rest)
    with pytest.raises(RuntimeError, match=r"\bweight\b"):
        torch.ops.giva.linear_backward(gy, s, t["weight"].cpu(), *rest[1:])
    with pytest.raises(RuntimeError, match=r"\bgrad_y\b"):
        torch.ops.giva.linear_backward(gy.double(), s, *rest)
    half = _inputs(8, 16, 12, 4, torch.float16)
    with pytest.raises(RuntimeError, match=r"s must have dtype Float"):  # fp16 s beside fp16 grad_y
        torch.ops.giva.linear_backward(gy.half(), _saved_s(half).half(), half["weight"], half["A"],
                                       half["B"], half["lambda_s"], half["lambda_o"], [True, True, True])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_and_mixed_devices():
    t = {k: None if v is None else v.to("cuda:1") for k, v in _inputs(20, 24, 16, 4, torch.float32).items()}
    y, s = torch.ops.giva.linear_forward(*_args(t))
    y_ref, s_ref = reference.linear_forward(*_args(t))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert y.device == t["x"].device
    t["A"] = t["A"].to("cuda:0")
    with pytest.raises(RuntimeError, match=r"\bA\b"):
        torch.ops.giva.linear_forward(*_args(t))
