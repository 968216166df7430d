"""Property-based tests (hypothesis): random shapes (zero sizes included), ranks, dtypes, leading dims,
memory layouts and bias presence. Every result is compared with an independent oracle: the layer
formula of docs/design.md §1 in float64, differentiated by autograd (not the hand-written backward of
reference.py), or the model the adapter was saved from."""
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import giva_ext as g
from giva_ext import ops, reference
from giva_ext.model import get_config
from test_model import Net

# The same examples on every run (CI is reproducible) and no example database written to disk.
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
native = pytest.mark.skipif(not ops.HAS_NATIVE, reason=f"native ops not built: {ops.LOAD_ERROR}")

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = ["contiguous", "column-major", "strided", "expanded"]


def arrange(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t (or, for "expanded", its first row/element repeated) in another memory layout."""
    if layout == "column-major" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded" and t.numel() > 0:
        return t[:1].expand(t.shape)  # stride 0 along dim 0: rows (or elements) repeat
    return t


def random(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


OUTPUTS = ("y", "s", "grad_x", "grad_lambda_s", "grad_lambda_o")


def oracle(x, weight, bias, A, B, lambda_s, lambda_o, grad_y):
    """y = x W^T + bias + lambda_o * ((lambda_s * (x A^T)) B^T) in float64 on 2-D x, s = x A^T, and
    the gradients of <y, grad_y> w.r.t. x, lambda_s and lambda_o, by autograd."""
    x, ls, lo = (t.detach().double().requires_grad_(True) for t in (x, lambda_s, lambda_o))
    s = x @ A.double().t()
    y = x @ weight.double().t() + lo * ((ls * s) @ B.double().t())
    if bias is not None:
        y = y + bias.double()
    return (y.detach(), s.detach(), *torch.autograd.grad(y, (x, ls, lo), grad_y.double()))


def check_all(got: dict, args, dtype, sums: int, extra: float = 0.0):
    """Each output in ``got`` (by name) within the classic rounding-error bound of the float64
    oracle, element by element: |got - exact| <= units * (the same sums over absolute values).
    ``sums`` is the longest chain of additions (each loses at most one unit roundoff of the float32
    or float64 accumulator); bfloat16 adds a few roundings of intermediates (s, folded factors) and
    of the result; ``extra`` adds units for a known coarser step."""
    want = oracle(*args)
    magnitude = oracle(*(None if a is None else a.abs() for a in args))
    units = (sums + 8) * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps + extra
    if dtype == torch.bfloat16:
        units += 8 * torch.finfo(dtype).eps
    for name, e, m in zip(OUTPUTS, want, magnitude):
        if name in got:
            a = got[name]
            assert a.dtype == dtype and a.shape == e.shape and torch.isfinite(a).all(), name
            worst = ((a.double() - e).abs() - units * m).max() if a.numel() else 0
            assert worst <= 0, f"{name}: beyond the bound by {worst:.3g}"


@st.composite
def layer_case(draw, min_size=0):
    n_in = draw(st.integers(min_size, 72))
    n_out = draw(st.integers(min_size, 72))
    return dict(T=draw(st.integers(0, 160)), n_in=n_in, n_out=n_out,
                r=draw(st.integers(min(min_size, n_in, n_out), min(n_in, n_out))),
                dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


def layer_tensors(case):
    gen = torch.Generator().manual_seed(case["seed"])
    T, n_in, n_out, r, dtype = case["T"], case["n_in"], case["n_out"], case["r"], case["dtype"]
    return dict(x=random(gen, T, n_in, dtype=dtype),
                weight=random(gen, n_out, n_in, dtype=dtype, scale=max(n_in, 1) ** -0.5),
                bias=random(gen, n_out, dtype=dtype) if case["bias"] else None,
                A=random(gen, r, n_in, dtype=dtype, scale=max(n_in, 1) ** -0.5),
                B=random(gen, n_out, r, dtype=dtype, scale=max(r, 1) ** -0.5),
                lambda_s=random(gen, r, dtype=dtype), lambda_o=random(gen, n_out, dtype=dtype),
                grad_y=random(gen, T, n_out, dtype=dtype))


def explicit(T, n_in, n_out, r, dtype, layout):
    return example(case=dict(T=T, n_in=n_in, n_out=n_out, r=r, dtype=dtype, bias=True, seed=0),
                   layouts=[layout] * 8)


@native
@SETTINGS
@given(case=layer_case(), layouts=st.lists(st.sampled_from(LAYOUTS), min_size=8, max_size=8))
# Always among the examples: both merged-weight paths (r >= 32 with T >= 2 min(in, out); out <= T)
# with every layout, and empty tensors.
@explicit(160, 40, 36, 32, torch.float32, "expanded")
@explicit(160, 40, 36, 33, torch.bfloat16, "column-major")
@explicit(150, 70, 72, 48, torch.float32, "strided")
@explicit(0, 0, 0, 0, torch.float32, "contiguous")
@explicit(7, 0, 5, 0, torch.bfloat16, "expanded")
def test_native_op_matches_oracle(case, layouts):
    """linear_forward / linear_backward on every size from 0 up, with each argument in any layout."""
    t = {k: None if v is None else arrange(v, lay)
         for (k, v), lay in zip(layer_tensors(case).items(), layouts)}
    frozen = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    y, s = torch.ops.giva.linear_forward(t["x"], t["weight"], t["bias"], *frozen[1:])
    got = dict(zip(OUTPUTS, (y, s, *torch.ops.giva.linear_backward(t["grad_y"], s, *frozen, [True] * 3))))
    args = (t["x"], t["weight"], t["bias"], *frozen[1:], t["grad_y"])
    check_all(got, args, case["dtype"], case["T"] + case["n_in"] + case["n_out"] + case["r"])


@SETTINGS
@given(case=layer_case(min_size=1), lead=st.lists(st.integers(0, 4), max_size=3),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_giva_linear_any_leading_shape_and_layout(case, lead, layout):
    """The public functional on x of 0-3 leading dims, contiguous or not: y and every gradient."""
    t = layer_tensors(case)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    n_in, dtype = case["n_in"], case["dtype"]
    if layout == "transposed" and lead:  # the last two dims swapped in memory
        x = random(gen, n_in, *lead, dtype=dtype).movedim(0, -1)
    elif layout == "sliced":  # every other element of a wider last dim
        x = random(gen, *lead, 2 * n_in, dtype=dtype)[..., ::2]
    else:
        x = random(gen, *lead, n_in, dtype=dtype)
    grad_y = random(gen, *lead, case["n_out"], dtype=dtype)
    leaves = [v.detach().requires_grad_(True) for v in (x, t["lambda_s"], t["lambda_o"])]
    y = g.giva_linear(leaves[0], t["weight"], t["bias"], t["A"], t["B"], leaves[1], leaves[2])
    grad_x, grad_s, grad_o = torch.autograd.grad(y, leaves, grad_y)
    assert y.shape == (*lead, case["n_out"]) and grad_x.shape == x.shape
    x2 = x.reshape(-1, n_in)
    got = {"y": y.reshape(-1, case["n_out"]), "grad_x": grad_x.reshape(-1, n_in), "grad_lambda_s": grad_s,
           "grad_lambda_o": grad_o}
    args = (x2, t["weight"], t["bias"], t["A"], t["B"], t["lambda_s"], t["lambda_o"],
            grad_y.reshape(-1, case["n_out"]))
    check_all(got, args, dtype, x2.shape[0] + n_in + case["n_out"] + case["r"])


@SETTINGS
@given(case=layer_case(min_size=1))
def test_merge_unmerge_round_trip(case):
    """merge folds exactly diag(lambda_o) B diag(lambda_s) A into W (up to W's rounding), the merged
    layer computes the same function, and unmerge gives W back up to that rounding."""
    t = layer_tensors(case)
    dtype = case["dtype"]
    layer = g.GiVALinear(case["n_in"], case["n_out"], case["r"], bias=case["bias"], dtype=dtype)
    with torch.no_grad():
        layer.base.weight.copy_(t["weight"])
        if case["bias"]:
            layer.base.bias.copy_(t["bias"])
        layer.set_bases(t["A"], t["B"])
        layer.lambda_s.copy_(t["lambda_s"])
        layer.lambda_o.copy_(t["lambda_o"])
    w0 = layer.base.weight.detach().clone().double()
    A, B, ls, lo = (t[k].double() for k in ("A", "B", "lambda_s", "lambda_o"))
    delta = (B * lo[:, None]) @ (A * ls[:, None])
    scale = (B * lo[:, None]).abs() @ (A * ls[:, None]).abs()  # bounds delta's round-off
    args = (t["x"], t["weight"], t["bias"], t["A"], t["B"], t["lambda_s"], t["lambda_o"], t["grad_y"])
    with torch.no_grad():
        before = layer(t["x"])
        layer.merge()
        merged_w = layer.base.weight.detach().clone().double()
        merged = layer(t["x"])
        layer.unmerge()
    # delta is formed in float32, float64 for float64 (its four factors rounded, r products summed),
    # then W + delta rounds once to W's dtype.
    eps, eps_acc = torch.finfo(dtype).eps, torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    fp32_units = (case["r"] + 4) * eps_acc
    assert ((merged_w - (w0 + delta)).abs() <= eps * ((w0 + delta).abs() + scale) + fp32_units * scale).all()
    unmerged = layer.base.weight.double()
    assert ((unmerged - w0).abs() <= 2 * eps * (w0.abs() + scale) + fp32_units * scale).all()
    sums = case["n_in"] + case["r"]
    check_all({"y": before}, args, dtype, sums)
    check_all({"y": merged}, args, dtype, sums, extra=eps + fp32_units)  # the merged weight's roundings


@settings(SETTINGS, max_examples=25)  # each example saves and loads a whole model
@given(r=st.integers(1, 8), targets=st.sets(st.sampled_from(["query", "value", "out"]), min_size=1),
       head=st.booleans(), dtype=st.sampled_from(DTYPES),
       mode=st.sampled_from(["VrU2r", "VrUr", "Vr", "random"]),
       onto_adapted=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_save_load_round_trip(r, targets, head, dtype, mode, onto_adapted, seed):
    """A loaded adapter (onto the plain base or a model already holding GiVA layers) reproduces every
    tensor and the outputs of the model it was saved from, bit for bit."""
    def base():
        torch.manual_seed(seed)
        return Net().to(dtype)

    config = g.GiVAConfig(r=r, target_modules=sorted(targets), init_mode=mode, seed=seed,
                          modules_to_save=["classifier"] if head else [])
    model = g.apply_giva(base(), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in g.giva_layers(model).values():
            layer.lambda_s.copy_(random(gen, layer.r, dtype=dtype))
            layer.lambda_o.copy_(random(gen, layer.out_features, dtype=dtype))
        if head:
            model.classifier.weight.add_(1.0)  # a trained head
    ids = torch.randint(0, 20, (3, 5), generator=gen)
    with tempfile.TemporaryDirectory() as folder:
        g.save_adapter(model, folder)
        other = base()
        if onto_adapted:
            g.apply_giva(other, g.GiVAConfig(r=r, target_modules=sorted(targets), seed=seed + 1,
                                             modules_to_save=["classifier"] if head else []))
        loaded = g.load_adapter(other, folder)
    state, want = loaded.state_dict(), model.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in want)
    assert torch.equal(loaded(ids), model(ids))
    assert get_config(loaded) == config


@native
@SETTINGS
@given(T=st.integers(0, 80), n_in=st.integers(0, 24), n_out=st.integers(0, 24), k=st.integers(0, 9),
       k2=st.integers(0, 9), dtype=st.sampled_from(DTYPES),
       layouts=st.lists(st.sampled_from(LAYOUTS), min_size=2, max_size=2),
       seed=st.integers(0, 2 ** 16))
def test_sketch_update_matches_oracle(T, n_in, n_out, k, k2, dtype, layouts, seed):
    """sketch_update (Y + g^T (x omega), Z + (g psi^T)^T x) against the float64 formula."""
    gen = torch.Generator().manual_seed(seed)
    acc = reference.sketch_accumulator_dtype(dtype)
    x = arrange(random(gen, T, n_in, dtype=dtype), layouts[0])
    grad = arrange(random(gen, T, n_out, dtype=dtype), layouts[1])
    omega, psi = random(gen, n_in, k, dtype=acc), random(gen, k2, n_out, dtype=acc)
    Y, Z = random(gen, n_out, k, dtype=acc), random(gen, k2, n_in, dtype=acc)
    Y_new, Z_new = torch.ops.giva.sketch_update(x, grad, omega, psi, Y, Z)
    assert Y_new.dtype == acc and Z_new.dtype == acc
    units = (T + n_in + n_out + 8) * torch.finfo(acc).eps  # as in check_all
    def sketches(xd, gd, om, ps, Y, Z):
        return Y + gd.t() @ (xd @ om), Z + (gd @ ps.t()).t() @ xd

    tensors = [t.double() for t in (x, grad, omega, psi, Y, Z)]
    exact, magnitude = sketches(*tensors), sketches(*(t.abs() for t in tensors))
    for got, e, m in zip((Y_new, Z_new), exact, magnitude):
        assert ((got.double() - e).abs() <= units * m).all()
