"""Numerical faults: NaN and Inf in training (check_finite) and in init (named layer, nothing
changed), rank-deficient gradients, and huge, tiny and swamping magnitudes in low precision against
a float64 oracle."""
import copy
import warnings

import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext import ops
from giva_ext.checks import check_finite

native = pytest.mark.skipif(not ops.HAS_NATIVE, reason=f"native ops not built: {ops.LOAD_ERROR}")


class NanBackward(torch.autograd.Function):
    """Identity forward; the gradient passed back becomes NaN (a module whose backward breaks)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class Poison(nn.Module):
    """Between two layers: NaN in forward at one position, or NaN in backward."""

    def __init__(self, forward=False, backward=False):
        super().__init__()
        self.forward_nan, self.backward_nan = forward, backward

    def forward(self, x):
        if self.forward_nan:
            x = x.clone()
            x[0, 0] = float("nan")
        return NanBackward.apply(x) if self.backward_nan else x


def three_layers(poison=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), poison or nn.Identity(), nn.Tanh(), nn.Linear(10, 8),
                          nn.Linear(8, 6))
    g.apply_giva(model, g.GiVAConfig(r=2, target_modules=["0", "3", "4"]))
    with torch.no_grad():
        for layer in g.giva_layers(model).values():
            layer.lambda_o.normal_()
    return model


# ---- check_finite ------------------------------------------------------------------------------

def test_check_finite_names_the_first_layer_in_forward():
    x = torch.randn(5, 12)
    with check_finite(three_layers()) as model:
        with pytest.raises(FloatingPointError, match="NaN in the input of GiVA layer '0': it comes from"):
            model(torch.where(torch.arange(12) == 3, float("nan"), x))
    with check_finite(three_layers(Poison(forward=True))) as model:
        with pytest.raises(FloatingPointError, match="NaN in the input of GiVA layer '3'"):
            model(x)
    model = three_layers()
    with torch.no_grad():
        model[3].lambda_o[1] = float("inf")  # the layer itself produces it
    with check_finite(model):
        with pytest.raises(FloatingPointError, match="in the output of GiVA layer '3' \\(its input is"):
            model(x)


def test_check_finite_names_the_first_layer_in_backward():
    x = torch.randn(5, 12)
    with check_finite(three_layers(Poison(backward=True))) as model:
        loss = model(x).square().sum()  # forward is clean
        with pytest.raises(FloatingPointError,
                           match="NaN in the gradient at the output of GiVA layer '0' \\(backward\\)"):
            loss.backward()
    # Finite output gradients whose products overflow inside the layer: its vectors' gradients.
    model = three_layers()
    with check_finite(model):
        y = model[4](torch.full((64, 8), 1e20))
        with pytest.raises(FloatingPointError, 
                           match="(NaN|Inf) in the gradient of '.*lambda_[so]' of GiVA layer '4'"):
            y.backward(torch.full_like(y, 1e30))


def test_check_finite_is_transparent_and_leaves_no_hooks():
    x = torch.randn(5, 12)
    plain, checked = three_layers(), three_layers()
    plain(x).square().sum().backward()
    with check_finite(checked):
        y = checked(x)
        y.square().sum().backward()
    for a, b in zip(plain.parameters(), checked.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    for layer in g.giva_layers(checked).values():
        assert not layer._forward_hooks and not layer.lambda_s._backward_hooks
    # A graph built inside the block and run backward after it: its output hooks are inert.
    with check_finite(three_layers(Poison(backward=True))) as model:
        loss = model(x).sum()
    loss.backward()
    with pytest.raises(ValueError, match="no GiVA layers"):
        with check_finite(nn.Linear(2, 2)):
            pass


# ---- init_bases: non-finite values are named, nothing changes -------------------------------------

def inner(model, batch):
    return (model(batch[0]) * batch[1]).sum()


def batches(n=3, scale=1.0):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=gen) * scale, torch.randn(16, 6, generator=gen)) for _ in range(n)]


def init_refused(model, data, match, loss_fn=inner, **kwargs):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=match):
        g.init_bases(model, data, loss_fn, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("svd", ["sketch", "dense"])
def test_init_names_where_nan_or_inf_appears(svd):
    data = batches()
    data[1][0][4, 7] = float("inf")
    init_refused(three_layers(), data, "non-finite input to layer '0' \\(batch 2\\)", svd=svd, num_batches=3)
    init_refused(three_layers(Poison(forward=True)), batches(), "non-finite input to layer '3' \\(batch 1\\)",
                 svd=svd)
    init_refused(three_layers(Poison(backward=True)), batches(),
                 "non-finite gradient at the output of layer '0' \\(batch 1; the loss", svd=svd)
    nan_target = [(x, torch.full_like(t, float("nan"))) for x, t in batches()]
    init_refused(three_layers(), nan_target, "the loss of batch 1 is nan", svd=svd)


@pytest.mark.parametrize("svd", ["sketch", "dense"])
def test_init_refuses_a_gradient_sum_that_overflows(svd):
    """Each batch's x and g are finite, but g^T x passes float32's range: named, not cached as inf."""
    model = g.apply_giva(nn.Sequential(nn.Linear(48, 40, bias=False)),
                         g.GiVAConfig(r=2, target_modules=["0"]))

    def huge_gradient(model, batch):
        y = model(batch[0])
        y.register_hook(lambda grad: torch.full_like(grad, 1e19))
        return y.sum() * 1e-30  # a finite loss

    data = [(torch.full((16, 48), 1e19), None)] * 2
    init_refused(model, data, "the gradient sum of layer '0' overflowed torch.float32 at batch 1",
                 huge_gradient, svd=svd)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_randomized_svd_refuses_non_finite(bad):
    m = torch.randn(6, 5)
    m[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        g.randomized_svd(m, 2)


def test_finiteness_screen_is_only_a_shortcut(monkeypatch):
    """The one-sum screen: NaN or Inf always trips it, and finite values whose sum overflows may too
    (a false alarm); init and check_finite then look element by element, so nothing is refused that
    is finite, and init's bases are the same as when the screen passes."""
    from giva_ext import init as init_module
    screen = init_module.maybe_non_finite
    big = torch.tensor([3e38, 3e38])
    assert screen([torch.ones(3), big]) and not torch.isfinite(big.sum())  # finite, yet flagged
    assert screen([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert screen([torch.tensor([float("inf"), -float("inf")])])
    assert not screen([torch.ones(3).bfloat16(), None, torch.empty(0)]) and not screen([])
    from giva_ext.checks import _where  # check_finite's test: the false alarm is looked into
    assert _where(big) is None and _where(torch.tensor([1.0, -float("inf")])) == "Inf"

    def bases(model):
        return {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".A", ".B"))}

    model = three_layers()
    g.init_bases(model, batches(), inner, progress=False)
    want = bases(model)
    monkeypatch.setattr(init_module, "maybe_non_finite", lambda tensors: True)  # always a false alarm
    model = three_layers()
    g.init_bases(model, batches(), inner, progress=False)
    got = bases(model)
    assert want and all(torch.equal(want[k], got[k]) for k in want)


# ---- rank-deficient gradients ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("svd", ["sketch", "dense"])
def test_rank_deficient_gradient_warns_and_completes_orthonormally(dtype, svd):
    """A gradient of rank 3 where VrU2r at r = 4 uses 8 directions: a warning naming the layer and
    the count, and finite orthonormal bases whose informative part is the gradient's and whose
    completion is orthogonal to it."""
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(40, 3, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(48, 3, generator=gen, dtype=torch.float64)).Q
    # G = sum over tokens of c^T x with every x in span(V) and every c in span(U): rank 3.
    data = [((torch.randn(8, 3, generator=gen, dtype=torch.float64) @ V.t()).to(dtype),
             (torch.randn(8, 3, generator=gen, dtype=torch.float64) @ U.t()).to(dtype)) for _ in range(2)]
    model = g.apply_giva(nn.Sequential(nn.Linear(48, 40, bias=False)).to(dtype),
                         g.GiVAConfig(r=4, target_modules=["0"], grad_batches=2))
    with pytest.warns(RuntimeWarning, match="1 of 1 layers have a gradient with fewer informative directions.*the fewest: '0' 3 of 8"):
        g.init_bases(model, data, inner, svd=svd, progress=False)
    A, B = model[0].A.double(), model[0].B.double()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert (A @ A.t() - torch.eye(4, dtype=torch.float64)).abs().max() <= tol
    assert (B.t() @ B - torch.eye(4, dtype=torch.float64)).abs().max() <= tol
    assert torch.linalg.svdvals(A[:3] @ V).min() >= 1 - tol  # the informative directions
    assert (A[3:] @ V).abs().max() <= 3 * tol  # the completion: orthogonal to them
    assert (U.t() @ B).abs().max() <= 3 * tol  # B = U[:, 4:8]: all completion


# ---- magnitudes in low precision ----------------------------------------------------------------

def oracle(x, w, b, A, B, ls, lo, gy):
    """The layer formula and its gradients in float64 by autograd."""
    x, ls, lo = (t.detach().double().requires_grad_(True) for t in (x, ls, lo))
    y = x @ w.double().t() + b.double() + lo * ((ls * (x @ A.double().t())) @ B.double().t())
    return (y.detach(), (x @ A.double().t()).detach(), *torch.autograd.grad(y, (x, ls, lo), gy.double()))


def native_op(x, w, b, A, B, ls, lo, gy):
    y, s = torch.ops.giva.linear_forward(x, w, b, A, B, ls, lo)
    return (y, s, *torch.ops.giva.linear_backward(gy, s, w, A, B, ls, lo, [True] * 3))


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r", [1, 20])  # the thin-kernel tails and the 16-wide SIMD part
def test_swamping_sums_accumulate_in_float32(dtype, r):
    """Sums of one 256 and 256 ones: accumulated in bfloat16 they stop at 256 (257 rounds to 256),
    in float32 they reach 512. Every output of the op must be within an ulp of float64."""
    n = 257
    ones = torch.ones(n, n, dtype=dtype)
    x = ones.clone()
    x[:, 0] = 256  # each row of x: 256 first, then 256 ones
    gy = ones.clone()
    gy.diagonal().fill_(256)  # each row and each column of g: one 256 and 256 ones
    w, b = ones.clone(), torch.zeros(n, dtype=dtype)
    A = torch.ones(r, n, dtype=dtype) / 32  # powers of two: every partial sum is exact in float32
    B, ls = torch.ones(n, r, dtype=dtype), torch.ones(r, dtype=dtype)
    lo = torch.full((n,), 1 / 64, dtype=dtype)
    naive = torch.zeros((), dtype=torch.bfloat16)
    for v in x[0]:  # a sum rounded to bfloat16 at each step: what the data tells apart
        naive = naive + v.to(torch.bfloat16)
    assert naive == 256
    got, want = native_op(x, w, b, A, B, ls, lo, gy), oracle(x, w, b, A, B, ls, lo, gy)
    for name, a, e in zip(("y", "s", "grad_x", "grad_lambda_s", "grad_lambda_o"), got, want):
        assert ((a.double() - e).abs() <= torch.finfo(dtype).eps * e.abs()).all(), (name, a, e)


@native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_scale,w_scale,g_scale", [
    (2.0 ** 60, 2.0 ** -60, 1.0), (2.0 ** -60, 2.0 ** 40, 2.0 ** 50), (2.0 ** 30, 2.0 ** 30, 2.0 ** -90),
    (2.0 ** -40, 1.0, 2.0 ** -40)])
def test_huge_and_tiny_magnitudes_match_float64(dtype, x_scale, w_scale, g_scale):
    """Inputs far from 1 (results inside float32's normal range): no overflow, no flush to zero, the
    usual relative accuracy."""
    gen = torch.Generator().manual_seed(0)
    T, n_in, n_out, r = 300, 100, 70, 20

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    args = (rnd(T, n_in, scale=x_scale), rnd(n_out, n_in, scale=w_scale / 10),
            rnd(n_out, scale=x_scale * w_scale), rnd(r, n_in, scale=0.1), rnd(n_out, r, scale=w_scale * 0.2),
            rnd(r), rnd(n_out), rnd(T, n_out, scale=g_scale))
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    names = ("y", "s", "grad_x", "grad_lambda_s", "grad_lambda_o")
    for name, a, e in zip(names, native_op(*args), oracle(*args)):
        assert torch.isfinite(a).all(), name
        assert ((a.double() - e).abs().max() / e.abs().max()).item() <= tol, name


@native
def test_sketch_of_huge_bfloat16_values_accumulates_in_float32():
    """g^T (x omega) over 3000 tokens of magnitude 1e15: beyond bfloat16's precision if summed in it,
    exact to float32 rounding here."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3000, 24, generator=gen) * 1e15).to(torch.bfloat16)
    grad = (torch.randn(3000, 16, generator=gen) * 1e15).to(torch.bfloat16)
    omega, psi = torch.randn(24, 5, generator=gen), torch.randn(11, 16, generator=gen)
    Y, Z = torch.ops.giva.sketch_update(x, grad, omega, psi, torch.zeros(16, 5), torch.zeros(11, 24))
    xd, gd = x.double(), grad.double()
    for got, want in ((Y, gd.t() @ (xd @ omega.double())), (Z, (gd @ psi.double().t()).t() @ xd)):
        assert torch.isfinite(got).all()
        assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_float16_cancellation_does_not_overflow():
    """float16 (the reference path on CPU): partial sums of +-60000 pass 65504 but the results are
    small; float32 accumulation keeps them finite and exact."""
    x = torch.tensor([[60000.0, 60000.0, -60000.0, -60000.0, 1.0]], dtype=torch.float16)
    w = torch.ones(3, 5, dtype=torch.float16)
    A, B = torch.ones(2, 5, dtype=torch.float16) / 2, torch.ones(3, 2, dtype=torch.float16)
    ls, lo = torch.ones(2, dtype=torch.float16), torch.ones(3, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = g.giva_linear(x, w, None, A, B, ls, lo)
    assert torch.equal(y, torch.full((1, 3), 2.0, dtype=torch.float16))  # 1 + (0.5 + 0.5)


@pytest.mark.parametrize("options", [{}, {"input_scale": True}, {"dropout": 0.1}],
                         ids=["fused", "input_scale", "dropout"])
def test_float16_model_starts_at_the_pretrained_one_when_s_passes_its_range(options):
    """An fp16 model after a real init_bases, with inputs of 3000 into 1024 features: the top basis
    row takes s = x A^T to about 96000, past fp16's 65504, while the layer's output stays in range.
    At lambda_o = 0 the adapted model gives the pretrained output bit for bit (s is kept in fp32;
    inf * 0 used to give NaN) in the fused layer, with the input scale and with adapter dropout,
    and a training step's vector gradients are finite."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(1024, 16)).half()
    model = g.apply_giva(copy.deepcopy(pretrained),
                         g.GiVAConfig(r=4, target_modules=["0"], init_mode="VrUr", **options))
    x = (3000 * (1 + 0.1 * torch.randn(8, 1024))).half()

    def loss_fn(m, batch):
        return m(batch).float().pow(2).mean() * 1e-6

    g.init_bases(model, [x], loss_fn, progress=False)
    layer = g.giva_layers(model)["0"]
    assert (x.float() @ layer.A.float().t()).abs().max() > torch.finfo(torch.float16).max
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), pretrained(x))
    loss_fn(model, x).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
