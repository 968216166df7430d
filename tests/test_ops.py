"""Native giva ops against reference.py: values, gradients, dtypes, opcheck, compile, saved tensors."""
import pytest
import torch
import torch.nn.functional as F

from giva_ext import GiVALinear, giva_linear, ops, reference

pytestmark = pytest.mark.skipif(not ops.HAS_NATIVE, reason=f"native ops not built: {ops.LOAD_ERROR}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops._HAS_KERNEL["cuda"] else [])
# (T, in, out, r): single token, rank 1, odd sizes, no tokens, one large enough for several row
# blocks on every thread, and one that takes the merged-weight path (r >= 32, T >= 2 min(in, out)).
# The backward merges once out <= T; (1100, 24, 2100, 3) keeps the fill over several row blocks,
# and (301, 100, 333, 20) the tails of the fp32 SIMD kernels (odd rows, K % 16, columns past the
# 64- and 16-wide tiles, an r with a 16-wide part and a dot-product rest); (150, 40, 300, 13) runs
# M = g^T s through its 8-, 4- and 1-row groups of m with a last panel narrower than one vector.
# (90, 130, 1400, 72) and (600, 130, 1400, 72): a basis panel (r x max(in, out)) past the SIMD
# kernels' (plain GEMMs), folded and merged; (64, 130, 100, 72) a rank past 64 on the SIMD path.
SHAPES = [(1, 8, 8, 1), (5, 37, 23, 4), (0, 16, 12, 2), (3000, 24, 520, 3), (200, 48, 40, 32),
          (1100, 24, 2100, 3), (301, 100, 333, 20), (150, 40, 300, 13), (90, 130, 1400, 72),
          (600, 130, 1400, 72), (64, 130, 100, 72)]


def make(T, n_in, n_out, r, dtype=torch.float64, device="cpu", bias=True, seed=0):
    """Layer tensors with a non-zero lambda_o, so every term of the math contributes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return dict(x=rnd(T, n_in), weight=rnd(n_out, n_in, scale=n_in ** -0.5),
                bias=rnd(n_out) if bias else None, A=rnd(r, n_in, scale=n_in ** -0.5),
                B=rnd(n_out, r, scale=n_out ** -0.5), lambda_s=rnd(r), lambda_o=rnd(n_out))


def rel_err(a, ref):
    """Max abs error relative to the reference's largest magnitude (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def run_op(t, grad_y, mask=(True, True, True)):
    """Forward and backward of the native op; returns (y, s, grad_x, grad_lambda_s, grad_lambda_o)."""
    args = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    y, s = torch.ops.giva.linear_forward(t["x"], t["weight"], t["bias"], *args[1:])
    return (y, s, *torch.ops.giva.linear_backward(grad_y, s, *args, list(mask)))


def run_reference(t, grad_y):
    args = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    y, s = reference.linear_forward(t["x"], t["weight"], t["bias"], *args[1:])
    return (y, s, *reference.linear_backward(grad_y, s, *args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(device, dtype, tol, shape, bias):
    t = make(*shape, dtype=dtype, device=device, bias=bias)
    grad_y = torch.randn(shape[0], shape[2], dtype=dtype, device=device)
    names = ("y", "s", "grad_x", "grad_lambda_s", "grad_lambda_o")
    for name, got, want in zip(names, run_op(t, grad_y), run_reference(t, grad_y)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel_err(got, want) <= tol, f"{name}: {rel_err(got, want):.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float16] if DEVICES[-1] == "cuda" else []))
@pytest.mark.parametrize("shape", [(5, 37, 23, 4), (3000, 24, 520, 3), (256, 512, 256, 16), (200, 48, 40, 32),
                                   (90, 130, 100, 72)])
@pytest.mark.parametrize("vectors", ["same", "float32"])
def test_low_precision_within_twice_composite_error(device, dtype, shape, vectors):
    """The kernel's error against an fp32 reference is at most 2x that of the same-precision
    composite; with float32 vectors (the trainable parameters kept in float32) too, and their
    gradients come back in float32."""
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("float16 has no CPU kernel")
    t = make(*shape, dtype=dtype, device=device)
    if vectors == "float32":
        t.update(lambda_s=t["lambda_s"].float(), lambda_o=t["lambda_o"].float())
    grad_y = torch.randn(shape[0], shape[2], device=device).to(dtype)
    t32 = {k: None if v is None else v.float() for k, v in t.items()}
    want = run_reference(t32, grad_y.float())
    composite = run_reference(t, grad_y)
    names = ("y", "s", "grad_x", "grad_lambda_s", "grad_lambda_o")
    for name, got, comp, ref in zip(names, run_op(t, grad_y), composite, want):
        assert got.dtype == (t["lambda_s"].dtype if name.startswith("grad_lambda") else dtype), name
        assert rel_err(got, ref) <= 2 * rel_err(comp, ref) + 1e-3, \
            f"{name}: kernel {rel_err(got, ref):.3g}, composite {rel_err(comp, ref):.3g}"


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    t = make(6, 7, 5, 3, bias=bias)
    for k in ("x", "lambda_s", "lambda_o"):
        t[k].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, ls, lo: ops.linear(x, t["weight"], t["bias"], t["A"], t["B"], ls, lo),
                                    (t["x"], t["lambda_s"], t["lambda_o"]))


def _grads_through(fn, t, x):
    """y and the gradients of a fixed projection of y w.r.t. x, lambda_s and lambda_o."""
    leaves = [x, t["lambda_s"], t["lambda_o"]]
    leaves = [v.detach().requires_grad_(True) for v in leaves]
    y = fn(leaves[0], t["weight"], t["bias"], t["A"], t["B"], leaves[1], leaves[2])
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y).cumsum(-1))
    return (y, *grads)


def test_3d_input_and_non_contiguous():
    t = make(12, 37, 23, 4)
    t["weight"] = t["weight"].t().contiguous().t()  # column-major (out, in)
    x = torch.randn(23, 4, 37, dtype=torch.float64).transpose(0, 1)[:, ::2]  # (4, 12, 37), strided
    assert not x.is_contiguous() and not t["weight"].is_contiguous()
    got = _grads_through(giva_linear, t, x)
    want = _grads_through(lambda x, *a: reference.linear(x.reshape(-1, 37), *a).reshape(4, 12, 23), t, x)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g, w) <= 1e-12


def test_non_contiguous_grad_y():
    t = make(9, 10, 11, 2)
    grad_y = torch.randn(11, 9, dtype=torch.float64).t()
    for got, want in zip(run_op(t, grad_y), run_reference(t, grad_y)):
        assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(device, bias):
    t = make(7, 9, 6, 3, dtype=torch.float32, device=device, bias=bias)
    for k in ("x", "lambda_s", "lambda_o"):
        t[k].requires_grad_(True)
    fwd_args = (t["x"], t["weight"], t["bias"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    torch.library.opcheck(torch.ops.giva.linear_forward.default, fwd_args)
    s = (t["x"] @ t["A"].t()).detach()
    grad_y = torch.randn(7, 6, device=device)
    bwd_args = (grad_y, s, t["weight"], t["A"], t["B"], t["lambda_s"].detach(), t["lambda_o"].detach())
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(torch.ops.giva.linear_backward.default, (*bwd_args, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_float32_vectors_beside_bfloat16(device):
    t = make(7, 9, 6, 3, dtype=torch.bfloat16, device=device)
    t.update(lambda_s=t["lambda_s"].float().requires_grad_(True),
             lambda_o=t["lambda_o"].float().requires_grad_(True))
    t["x"].requires_grad_(True)
    torch.library.opcheck(torch.ops.giva.linear_forward.default,
                          (t["x"], t["weight"], t["bias"], t["A"], t["B"], t["lambda_s"], t["lambda_o"]))
    s = (t["x"] @ t["A"].t()).detach()
    grad_y = torch.randn(7, 6, device=device).bfloat16()
    torch.library.opcheck(torch.ops.giva.linear_backward.default,
                          (grad_y, s, t["weight"], t["A"], t["B"], t["lambda_s"].detach(),
                           t["lambda_o"].detach(), [True, True, True]))


def test_output_mask():
    t = make(6, 5, 4, 2)
    grad_y = torch.randn(6, 4, dtype=torch.float64)
    _, s, *want = run_reference(t, grad_y)
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, False, False]):
        got = run_op(t, grad_y, mask)[2:]
        for on, g, w in zip(mask, got, want):
            assert (g is None) if not on else rel_err(g, w) <= 1e-12
    # through autograd: only what requires grad is computed
    x, lo = t["x"].requires_grad_(True), t["lambda_o"].requires_grad_(True)
    ops.linear(x, t["weight"], t["bias"], t["A"], t["B"], t["lambda_s"], lo).sum().backward()
    assert x.grad is not None and lo.grad is not None and t["lambda_s"].grad is None


def test_saves_only_thin_tensors():
    """The op saves s (T, r) besides the frozen tensors; an unfused composite saves (T, out)."""
    T, n_in, n_out, r = 64, 48, 40, 4
    t = make(T, n_in, n_out, r)
    x, ls, lo = (t[k].requires_grad_(True) for k in ("x", "lambda_s", "lambda_o"))

    def saved_numels(fn):
        numels = []
        with torch.autograd.graph.saved_tensors_hooks(lambda v: numels.append(v.numel()) or v, lambda v: v):
            fn()
        return numels

    native = saved_numels(lambda: ops.linear(x, t["weight"], t["bias"], t["A"], t["B"], ls, lo))
    unfused = saved_numels(lambda: F.linear(x, t["weight"], t["bias"]) + lo * ((ls * (x @ t["A"].t())) @ t["B"].t()))
    assert T * r in native and not {T * n_in, T * n_out} & set(native), native
    assert {T * n_in, T * n_out} & set(unfused), unfused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_training_step_matches_eager(dtype):
    """bfloat16: a bf16 layer with its float32 vectors."""
    torch.manual_seed(0)
    eager = GiVALinear(24, 16, 4, dtype=dtype)
    with torch.no_grad():
        eager.lambda_o.normal_()
    compiled_layer = GiVALinear(24, 16, 4, dtype=dtype)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = torch.randn(3, 5, 24).to(dtype)
    for layer, fn in ((eager, eager), (compiled_layer, compiled)):
        opt = torch.optim.AdamW([layer.lambda_s, layer.lambda_o], lr=1e-2)
        for _ in range(3):
            fn(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(compiled_layer.lambda_s, eager.lambda_s)
    torch.testing.assert_close(compiled_layer.lambda_o, eager.lambda_o)


def test_supports():
    assert ops.supports(torch.empty(1, 2))
    assert ops.supports(torch.empty(1, 2, dtype=torch.bfloat16))
    assert not ops.supports(torch.empty(1, 2, dtype=torch.float16))
    assert not ops.supports(torch.empty(1, 2, dtype=torch.int64))


def _with(t, **changes):
    return {**t, **changes}


@pytest.mark.parametrize("change,match", [
    (lambda t: _with(t, A=t["A"][:, :-1]), r"A must have shape \(r, in\) = \(\?, 9\), got \(3, 8\)"),
    (lambda t: _with(t, B=t["B"].t()), r"B must have shape \(out, r\) = \(6, 3\)"),
    (lambda t: _with(t, bias=t["bias"][:-1]), r"bias must have shape \(out,\)"),
    (lambda t: _with(t, lambda_s=t["lambda_s"][:1]), r"lambda_s must have shape \(r,\) = \(3,\)"),
    (lambda t: _with(t, lambda_o=t["lambda_o"].double()), r"lambda_o must have dtype Double|lambda_o must have dtype Float"),
    (lambda t: _with(t, weight=t["weight"][None]), r"weight must have shape \(out, in\)"),
    (lambda t: _with(t, x=t["x"][None]), r"x must have shape \(T, in\)"),
    (lambda t: {k: None if v is None else v.half() for k, v in t.items()}, r"x must have dtype in"),
    (lambda t: _with(t, lambda_s=t["lambda_s"].bfloat16()),
     r"lambda_s must have dtype Float \(the dtype of x\), got BFloat16"),
    (lambda t: {**{k: None if v is None else v.bfloat16() for k, v in t.items()}, "lambda_s": t["lambda_s"]},
     r"lambda_o must have dtype Float \(the dtype of lambda_s\), got BFloat16"),
    (lambda t: {**{k: None if v is None else v.bfloat16() for k, v in t.items()},
                "lambda_s": t["lambda_s"].double(), "lambda_o": t["lambda_o"].double()},
     r"lambda_s must have dtype BFloat16 or Float \(the dtype of x\), got Double"),
])
def test_bad_forward_arguments(change, match):
    t = change(make(7, 9, 6, 3, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.giva.linear_forward(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])


def test_bad_backward_arguments():
    t = make(7, 9, 6, 3, dtype=torch.float32)
    grad_y, s = torch.randn(7, 6), torch.randn(7, 3)
    args = [t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"], [True] * 3]
    with pytest.raises(RuntimeError, match=r"s must have shape \(T, r\) = \(7, \?\), got \(6, 3\)"):
        torch.ops.giva.linear_backward(grad_y, s[:6], *args)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(out, in\) = \(5, \?\), got \(6, 9\)"):
        torch.ops.giva.linear_backward(grad_y[:, :5], s, *args)
    with pytest.raises(RuntimeError, match=r"A must have dtype Float \(the dtype of grad_y\), got Double"):
        torch.ops.giva.linear_backward(grad_y, s, t["weight"], t["A"].double(), *args[2:])
    with pytest.raises(RuntimeError, match=r"s must have dtype Float \(what the forward saves for "
                                           r"grad_y's dtype\), got BFloat16"):
        torch.ops.giva.linear_backward(grad_y, s.bfloat16(), *args)


def test_device_mismatch_names_the_argument():
    """The CPU kernel itself rejects a tensor on another device (called below the dispatcher)."""
    t = make(7, 9, 6, 3, dtype=torch.float32)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"B must be on device cpu \(the device of x\), got meta"):
        torch.ops.giva.linear_forward.default.redispatch(
            cpu, t["x"], t["weight"], t["bias"], t["A"], t["B"].to("meta"), t["lambda_s"], t["lambda_o"])
