"""GiVALinear against the explicit formula y = base(x) + lambda_o * (B (lambda_s * (A x)))."""
import pytest
import torch
from torch import nn

from giva_ext import GiVALinear, giva_linear, reference


def explicit(layer: GiVALinear, x: torch.Tensor) -> torch.Tensor:
    s = x @ layer.A.t()
    return layer.base(x) + layer.lambda_o * ((layer.lambda_s * s) @ layer.B.t())


def randomize_vectors(layer: GiVALinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lambda_s.copy_(torch.randn(layer.r, generator=g))
        layer.lambda_o.copy_(torch.randn(layer.out_features, generator=g))


def test_new_layer_is_exactly_the_base():
    layer = GiVALinear(24, 17, r=4)
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer(x), layer.base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("shape", [(7, 24), (2, 3, 24), (1, 24), (2, 1, 3, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_formula_and_merged_weight(shape, bias):
    torch.manual_seed(0)
    layer = GiVALinear(24, 17, r=5, bias=bias)
    randomize_vectors(layer)
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 17)
    torch.testing.assert_close(y, explicit(layer, x), rtol=1e-5, atol=1e-5)
    merged_weight = layer.base.weight + layer.delta_weight()
    torch.testing.assert_close(y, nn.functional.linear(x, merged_weight, layer.base.bias),
                               rtol=1e-5, atol=1e-5)


def test_bases_are_orthonormal():
    layer = GiVALinear(40, 30, r=6)
    torch.testing.assert_close(layer.A @ layer.A.t(), torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.B.t() @ layer.B, torch.eye(6), atol=1e-5, rtol=0)


def test_only_vectors_get_gradients():
    torch.manual_seed(1)
    layer = GiVALinear.from_linear(nn.Linear(16, 12), r=3)
    randomize_vectors(layer)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lambda_s.grad is not None and layer.lambda_o.grad is not None
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert not layer.A.requires_grad and not layer.B.requires_grad
    # Oracle: autograd through the explicit formula on fresh leaves.
    ls = layer.lambda_s.detach().clone().requires_grad_()
    lo = layer.lambda_o.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = layer.base(x2) + lo * ((ls * (x2 @ layer.A.t())) @ layer.B.t())
    y.square().sum().backward()
    torch.testing.assert_close(layer.lambda_s.grad, ls.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lambda_o.grad, lo.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_grad_lambda_s_is_zero_at_init():
    layer = GiVALinear(16, 12, r=3)
    layer(torch.randn(5, 16)).sum().backward()
    assert torch.count_nonzero(layer.lambda_s.grad) == 0
    assert torch.count_nonzero(layer.lambda_o.grad) > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_matches_fp32(dtype, tol):
    torch.manual_seed(2)
    layer = GiVALinear(32, 16, r=4)
    randomize_vectors(layer)
    x = torch.randn(6, 32)
    expected = explicit(layer, x)
    layer_h = layer.to(dtype)
    y = layer_h(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol)


def test_reference_backward_matches_autograd_float64():
    torch.manual_seed(3)
    x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(7, 9, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    A, B = torch.randn(3, 9, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    ls = torch.randn(3, dtype=torch.float64, requires_grad=True)
    lo = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.linear, (x, w, b, A, B, ls, lo))


def test_reference_saves_no_token_sized_tensor_but_s():
    T, n_in, n_out, r = 64, 48, 40, 2
    layer = GiVALinear(n_in, n_out, r=r)
    x = torch.randn(T, n_in, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        reference.linear(x, layer.base.weight, layer.base.bias, layer.A, layer.B,
                         layer.lambda_s, layer.lambda_o)
    assert T * r in sizes
    assert T * n_in not in sizes and T * n_out not in sizes


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(4)
    layer = GiVALinear(20, 10, r=3, dropout=0.5)
    randomize_vectors(layer)
    x = torch.randn(8, 20)
    layer.eval()
    torch.testing.assert_close(layer(x), explicit(layer, x))
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    x_drop = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base(x) + layer.lambda_o * ((layer.lambda_s * (x_drop @ layer.A.t())) @ layer.B.t())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_trainable_frozen_weight_still_gets_its_gradient():
    # A user who unfreezes the base weight gets autograd through the composite path.
    layer = GiVALinear(8, 6, r=2)
    layer.base.weight.requires_grad_(True)
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.base.weight.grad is not None


def test_merge_unmerge_round_trip():
    torch.manual_seed(6)
    layer = GiVALinear(24, 18, r=4)
    randomize_vectors(layer)
    x = torch.randn(5, 24)
    before_w = layer.base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, before_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [0, -1, 2.0, 13])
def test_bad_rank_is_rejected(r):
    with pytest.raises(ValueError, match="rank"):
        GiVALinear(12, 20, r=r)


@pytest.mark.parametrize("x,error,message", [
    (torch.ones(2, 12, dtype=torch.long), TypeError, "floating-point tensor, got torch.int64"),
    (torch.ones(2, 13), ValueError, r"shape \(2, 13\); its last dimension must be the layer's in_features, 12"),
    (torch.tensor(1.0), ValueError, "in_features, 12"),
])
def test_bad_input_is_named(x, error, message):
    """nn.Linear refuses these too; an integer x must not meet weights cast to integers (zeros)."""
    layer = GiVALinear(12, 20, r=2)
    with pytest.raises(error, match=message):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fused", "composite"])
def test_half_precision_layer_trains_float32_vectors(dtype, dropout):
    """On a bf16/fp16 base the vectors are float32 (autocast_adapter_dtype, as PEFT): the output is
    in the base's dtype, the vectors' gradients in float32, and both match float64 math."""
    torch.manual_seed(0)
    layer = GiVALinear(24, 16, r=4, dropout=dropout, dtype=dtype)
    assert layer.lambda_s.dtype == torch.float32 and layer.A.dtype == dtype
    with torch.no_grad():
        layer.lambda_s.copy_(1 + 0.5 * torch.randn(4))
        layer.lambda_o.copy_(torch.randn(16))
    x = torch.randn(6, 24).to(dtype)
    gy = torch.randn(6, 16).to(dtype)
    y = layer(x)  # training mode: dropout > 0 takes the autograd composite
    y.backward(gy)
    assert y.dtype == dtype and layer.lambda_s.grad.dtype == torch.float32
    if dropout > 0:
        return  # the dropout mask is random: the dtypes are the point here
    W, b = layer.base.weight.double(), layer.base.bias.double()
    A, B = layer.A.double(), layer.B.double()
    ls, lo = (p.detach().double().requires_grad_() for p in (layer.lambda_s, layer.lambda_o))
    want = x.double() @ W.t() + b + lo * ((ls * (x.double() @ A.t())) @ B.t())
    want.backward(gy.double())
    scale = want.abs().max().item()
    assert (y.double() - want).abs().max().item() <= 2 ** -6 * scale
    for got, ref in ((layer.lambda_s.grad, ls.grad), (layer.lambda_o.grad, lo.grad)):
        assert (got.double() - ref).abs().max().item() <= 2 ** -6 * ref.abs().max().item()


def test_autocast_adapter_dtype_off_keeps_the_base_dtype():
    layer = GiVALinear(8, 6, r=2, dtype=torch.bfloat16, autocast_adapter_dtype=False)
    assert layer.lambda_o.dtype == torch.bfloat16
    layer.add_adapter("other", 2, autocast_adapter_dtype=True)
    assert layer.adapters["other"].lambda_o.dtype == torch.float32
    assert GiVALinear(8, 6, r=2).lambda_o.dtype == torch.float32  # fp32 base: fp32 vectors anyway


def test_set_bases_checks_shapes_and_resets_vectors():
    layer = GiVALinear(12, 10, r=2)
    randomize_vectors(layer)
    with pytest.raises(ValueError, match=r"A \(2, 12\)"):
        layer.set_bases(torch.zeros(3, 12), torch.zeros(10, 2))
    layer.set_bases(torch.zeros(2, 12), torch.zeros(10, 2))
    assert torch.equal(layer.lambda_s, torch.ones(2)) and torch.equal(layer.lambda_o, torch.zeros(10))


def test_functional_matches_layer():
    torch.manual_seed(7)
    layer = GiVALinear(10, 6, r=2)
    randomize_vectors(layer)
    x = torch.randn(2, 4, 10)
    y = giva_linear(x, layer.base.weight, layer.base.bias, layer.A, layer.B, layer.lambda_s, layer.lambda_o)
    torch.testing.assert_close(y, explicit(layer, x))


@pytest.mark.parametrize("edit", ["scale", "reset", "optimizer"])
def test_unmerge_restores_the_weight_after_edits_while_merged(edit):
    """unmerge subtracts what merge added, whatever happened to the vectors in between; the edited
    vectors take effect afterwards."""
    torch.manual_seed(7)
    layer = GiVALinear(24, 18, r=4, input_scale=True)
    randomize_vectors(layer)
    before_w = layer.base.weight.detach().clone()
    layer.merge()
    if edit == "scale":
        with torch.no_grad():
            layer.lambda_o.mul_(3)
    elif edit == "reset":
        layer.reset_vectors()
    else:  # a step on stale gradients kept by zero_grad(set_to_none=False)
        params = [p for p in layer.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.ones_like(p)
        torch.optim.SGD(params, lr=0.5).step()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, before_w, rtol=0, atol=1e-6)
    x = torch.randn(5, 24)
    want = x @ (before_w + layer.delta_weight()).t() + layer.base.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
