"""giva::adapter_forward / adapter_backward (the adapter alone, on a base output the frozen layer
computes itself) and giva_adapter, against reference.py and against the fused layer op: with the
base output x W^T + bias, the adapter op must give what linear_forward gives, and its grad_x plus
g W what linear_backward gives."""
import pytest
import torch
import torch.nn.functional as F

from giva_ext import ops, reference
from giva_ext.functional import giva_adapter, giva_linear
from test_ops import DEVICES, SHAPES, make, rel_err

pytestmark = pytest.mark.skipif(not ops.HAS_NATIVE, reason=f"native ops not built: {ops.LOAD_ERROR}")


def _base(t):
    return F.linear(t["x"], t["weight"], t["bias"])


def _adapter_args(t):
    return t["A"], t["B"], t["lambda_s"], t["lambda_o"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_the_fused_op(device, dtype, tol, shape):
    t = make(*shape, dtype=dtype, device=device)
    grad_y = torch.randn(shape[0], shape[2], dtype=dtype, device=device)
    base = _base(t)
    y, s = torch.ops.giva.adapter_forward(t["x"], base, *_adapter_args(t))
    grads = torch.ops.giva.adapter_backward(grad_y, s, *_adapter_args(t), [True, True, True])
    want_y, want_s = reference.adapter_forward(t["x"], base, *_adapter_args(t))
    want_grads = reference.adapter_backward(grad_y, want_s, *_adapter_args(t))
    for name, got, want in zip(("y", "s", "grad_x", "grad_lambda_s", "grad_lambda_o"),
                               (y, s, *grads), (want_y, want_s, *want_grads)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel_err(got, want) <= tol, f"{name}: {rel_err(got, want):.3g}"
    # the fused op on the same layer: y equal, and grad_x = the adapter's part + g W
    fused_y, _ = torch.ops.giva.linear_forward(t["x"], t["weight"], t["bias"], *_adapter_args(t))
    fused = torch.ops.giva.linear_backward(grad_y, s, t["weight"], *_adapter_args(t), [True, True, True])
    assert rel_err(y, fused_y) <= tol
    assert rel_err(grads[0] + grad_y @ t["weight"], fused[0]) <= tol
    for got, want in zip(grads[1:], fused[1:]):
        assert rel_err(got, want) <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vectors", ["same", "float32"])
def test_bfloat16_within_twice_composite_error(device, vectors):
    """Against a float64 reference, the op's error is at most 2x the same-precision reference's."""
    t = make(300, 96, 80, 8, dtype=torch.bfloat16, device=device)
    if vectors == "float32":
        t["lambda_s"], t["lambda_o"] = t["lambda_s"].float(), t["lambda_o"].float()
    base = _base(t)
    grad_y = torch.randn(300, 80, device=device).bfloat16()
    y, s = torch.ops.giva.adapter_forward(t["x"], base, *_adapter_args(t))
    got = (y, *torch.ops.giva.adapter_backward(grad_y, s, *_adapter_args(t), [True, True, True]))
    y_c, s_c = reference.adapter_forward(t["x"], base, *_adapter_args(t))
    composite = (y_c, *reference.adapter_backward(grad_y, s_c, *_adapter_args(t)))
    t64 = {k: v.double() for k, v in t.items() if v is not None}
    y_64, s_64 = reference.adapter_forward(t64["x"], base.double(), *_adapter_args(t64))
    exact = (y_64, *reference.adapter_backward(grad_y.double(), s_64, *_adapter_args(t64)))
    for name, g, c, e in zip(("y", "grad_x", "grad_lambda_s", "grad_lambda_o"), got, composite, exact):
        assert g.dtype == c.dtype, name
        err, comp_err = (g.double() - e).abs().max(), (c.double() - e).abs().max()
        assert err <= 2 * comp_err + torch.finfo(torch.bfloat16).eps * e.abs().max(), name


def test_gradcheck_float64():
    t = make(6, 7, 5, 3)
    base = _base(t)
    leaves = [v.requires_grad_(True) for v in (t["x"], base, t["lambda_s"], t["lambda_o"])]
    assert torch.autograd.gradcheck(lambda x, b, ls, lo: ops.adapter(x, b, t["A"], t["B"], ls, lo), leaves)
    assert torch.autograd.gradgradcheck(lambda x, b, ls, lo: ops.adapter(x, b, t["A"], t["B"], ls, lo), leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    t = make(7, 9, 6, 3, dtype=dtype, device=device)
    t["lambda_s"], t["lambda_o"] = t["lambda_s"].float(), t["lambda_o"].float()  # fp32 beside bf16 too
    x, ls, lo = (t[k].requires_grad_(True) for k in ("x", "lambda_s", "lambda_o"))
    base = _base(t).detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.giva.adapter_forward.default, (x, base, t["A"], t["B"], ls, lo))
    s = (x @ t["A"].t()).detach()
    grad_y = torch.randn(7, 6, device=device).to(dtype)
    for mask in ([True, True, True], [False, True, False], [True, False, False], [False, False, True]):
        torch.library.opcheck(torch.ops.giva.adapter_backward.default,
                              (grad_y, s, t["A"], t["B"], ls.detach(), lo.detach(), mask))


def test_output_mask_and_autograd_computes_what_is_needed():
    t = make(6, 5, 4, 2)
    grad_y = torch.randn(6, 4, dtype=torch.float64)
    s = t["x"] @ t["A"].t()
    want = reference.adapter_backward(grad_y, s, *_adapter_args(t))
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, False, False]):
        got = torch.ops.giva.adapter_backward(grad_y, s, *_adapter_args(t), mask)
        for on, g, w in zip(mask, got, want):
            assert (g is None) if not on else rel_err(g, w) <= 1e-12
    base = _base(t).requires_grad_(True)
    lo = t["lambda_o"].requires_grad_(True)
    ops.adapter(t["x"], base, t["A"], t["B"], t["lambda_s"], lo).backward(grad_y)
    assert torch.equal(base.grad, grad_y)  # y = base + the adapter's term
    assert lo.grad is not None and t["lambda_s"].grad is None and t["x"].grad is None


def test_saves_only_s():
    """The op saves s (T, r) beside the bases and vectors: never x (T, in) or the base (T, out)."""
    T, n_in, n_out, r = 64, 48, 40, 4
    t = make(T, n_in, n_out, r)
    x, ls, lo = (t[k].requires_grad_(True) for k in ("x", "lambda_s", "lambda_o"))
    base = _base(t).detach().requires_grad_(True)
    numels = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: numels.append(v.numel()) or v, lambda v: v):
        ops.adapter(x, base, t["A"], t["B"], ls, lo)
    assert T * r in numels and not {T * n_in, T * n_out} & set(numels), numels


@pytest.mark.parametrize("input_scale", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_giva_adapter_equals_giva_linear(input_scale, dropout):
    """giva_adapter on the base output gives giva_linear's output and gradients (3-D x, every
    path: the op, the trainable-A op for the input scale, the composite for dropout)."""
    t = make(20, 12, 10, 3)
    x = t["x"].reshape(4, 5, 12)
    leaves = {k: t[k].detach().clone().requires_grad_(True) for k in ("lambda_s", "lambda_o")}
    if input_scale:
        leaves["lambda_i"] = (1 + 0.1 * torch.randn(12, dtype=torch.float64)).requires_grad_(True)

    def run(fn):
        xs = x.detach().clone().requires_grad_(True)
        vs = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
        torch.manual_seed(0)  # the same dropout mask in both
        y = fn(xs, vs)
        y.backward(torch.ones_like(y).cumsum(-1))
        return [y, xs.grad, *(v.grad for v in vs.values())]

    def with_base(xs, vs):
        return giva_adapter(xs, F.linear(xs, t["weight"], t["bias"]), t["A"], t["B"], vs["lambda_s"],
                            vs["lambda_o"], dropout, True, vs.get("lambda_i"))

    def fused(xs, vs):
        return giva_linear(xs, t["weight"], t["bias"], t["A"], t["B"], vs["lambda_s"], vs["lambda_o"],
                           dropout, True, vs.get("lambda_i"))

    for got, want in zip(run(with_base), run(fused)):
        assert got.shape == want.shape and rel_err(got, want) <= 1e-12


def test_bad_arguments_name_the_argument():
    t = make(5, 6, 4, 2, dtype=torch.float32)
    base = _base(t)
    with pytest.raises(RuntimeError, match=r"giva::adapter_forward: base must have shape \(T, out\) = \(5, \?\)"):
        torch.ops.giva.adapter_forward(t["x"], base[:3], *_adapter_args(t))
    with pytest.raises(RuntimeError, match=r"base must have dtype Float \(the dtype of x\), got Double"):
        torch.ops.giva.adapter_forward(t["x"], base.double(), *_adapter_args(t))
    with pytest.raises(RuntimeError, match=r"B must have shape \(out, r\) = \(4, 2\), got \(3, 2\)"):
        torch.ops.giva.adapter_forward(t["x"], base, t["A"], t["B"][:3], t["lambda_s"], t["lambda_o"])
    s = t["x"] @ t["A"].t()
    with pytest.raises(RuntimeError, match=r"giva::adapter_backward: A must have shape \(r, in\) = \(2, \?\)"):
        torch.ops.giva.adapter_backward(base, s, t["A"][:1], t["B"], t["lambda_s"], t["lambda_o"], [True] * 3)
    with pytest.raises(ValueError, match=r"giva_adapter: the base output has shape \(5, 3\)"):
        giva_adapter(t["x"], base[:, :3], *_adapter_args(t))
