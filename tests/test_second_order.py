"""Second derivatives through the layer: every path (native op, reference, trainable A) matches
the plain autograd graph of the same math (gradgradcheck, and Hessian-vector products of a
two-layer model against the composite)."""
import pytest
import torch
from torch import nn

from giva_ext import GiVALinear, functional, ops, reference

PATHS = ["native", "reference"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "native":
        if not ops.HAS_NATIVE:
            pytest.skip("the native library is not built")
    else:
        monkeypatch.setattr(functional.ops, "supports", lambda x: False)
    return request.param


def tensors(seed=0, T=6, n_in=7, n_out=5, r=3):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return dict(x=rand(T, n_in), weight=rand(n_out, n_in), bias=rand(n_out), A=rand(r, n_in),
                B=rand(n_out, r), lambda_s=rand(r), lambda_o=rand(n_out), lambda_i=rand(n_in))


def composite(x, weight, bias, A, B, lambda_s, lambda_o, lambda_i=None):
    """The same layer in plain torch ops: the oracle."""
    if lambda_i is not None:
        A = A * lambda_i
    return x @ weight.t() + bias + ((x @ A.t()) * lambda_s) @ (B * lambda_o[:, None]).t()


@pytest.mark.parametrize("input_scale", [False, True])
def test_gradgradcheck(path, input_scale):
    t = tensors()
    inputs = [t["x"], t["lambda_s"], t["lambda_o"]] + ([t["lambda_i"]] if input_scale else [])
    inputs = [i.requires_grad_() for i in inputs]

    def layer(x, lambda_s, lambda_o, lambda_i=None):
        return functional.giva_linear(x, t["weight"], t["bias"], t["A"], t["B"], lambda_s, lambda_o,
                                      lambda_i=lambda_i)

    assert torch.autograd.gradgradcheck(layer, inputs)


def test_the_reported_case_matches_the_composite(path):
    """The vectors' second derivative: it was silently zero through the native op."""
    torch.manual_seed(0)
    layer = GiVALinear(7, 5, 3, dtype=torch.float64)
    nn.init.normal_(layer.lambda_o)
    nn.init.normal_(layer.lambda_s)
    x = torch.randn(6, 7, dtype=torch.float64)
    (go,) = torch.autograd.grad(layer(x).pow(2).sum(), layer.lambda_o, create_graph=True)
    (got,) = torch.autograd.grad(go.sum(), layer.lambda_o)
    lambda_o = layer.lambda_o.detach().requires_grad_()
    y = composite(x, layer.base.weight, layer.base.bias, layer.A, layer.B, layer.lambda_s, lambda_o)
    (go_ref,) = torch.autograd.grad(y.pow(2).sum(), lambda_o, create_graph=True)
    (want,) = torch.autograd.grad(go_ref.sum(), lambda_o)
    assert want.abs().min() > 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("input_scale", [False, True])
def test_hessian_vector_product_of_two_layers(path, input_scale):
    """d/dlambda (grad . v) over both layers' vectors: the first layer's vectors reach the second
    layer's vector gradient only through the second layer's input, i.e. through its saved s."""
    torch.manual_seed(1)
    layers = nn.Sequential(GiVALinear(6, 8, 3, dtype=torch.float64, input_scale=input_scale), nn.Tanh(),
                           GiVALinear(8, 4, 2, dtype=torch.float64, input_scale=input_scale))
    for p in layers.parameters():
        if p.requires_grad:
            nn.init.normal_(p)
    x = torch.randn(5, 6, dtype=torch.float64)
    params = [p for p in layers.parameters() if p.requires_grad]
    vs = [torch.randn_like(p) for p in params]

    def hvp(loss):
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)

    got = hvp(layers(x).pow(3).sum())

    def plain(layer, h):
        return composite(h, layer.base.weight, layer.base.bias, layer.A, layer.B, layer.lambda_s,
                         layer.lambda_o, layer.lambda_i if input_scale else None)

    want = hvp(plain(layers[2], torch.tanh(plain(layers[0], x))).pow(3).sum())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert all(w.abs().sum() > 0 for w in want)


def test_first_order_backward_saves_no_more(path):
    """s stays the only activation saved (x only where A needs grad): a double backward is paid
    for when it runs, not by every training step."""
    t = tensors()
    x = t["x"].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(tuple(s.shape)) or s, lambda s: s):
        functional.giva_linear(x, t["weight"], t["bias"], t["A"], t["B"],
                               t["lambda_s"].requires_grad_(), t["lambda_o"].requires_grad_())
    assert (6, 7) not in saved and (6, 3) in saved


def test_reference_op_pair_directly():
    """reference.linear (the autograd wrapper the other paths mirror) to second order."""
    t = tensors(seed=2)
    inputs = [t["x"].requires_grad_(), t["lambda_s"].requires_grad_(), t["lambda_o"].requires_grad_()]
    assert torch.autograd.gradgradcheck(
        lambda x, ls, lo: reference.linear(x, t["weight"], t["bias"], t["A"], t["B"], ls, lo), inputs)
