"""precondition="rms": the bases come from the SVD of D_g^-1 G D_x^-1, each feature divided by its
RMS over the first gradient batch (floored at RMS_FLOOR times the layer's overall RMS)."""
import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext.precondition import RMS_FLOOR

IN, OUT, R = 64, 48, 4


def batches(seed=0, n=3, tokens=40):
    """Inputs whose features differ in size, targets from a teacher with a decaying spectrum (so
    the preconditioned gradient has well separated singular vectors too)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.1, 5.0, IN)
    u = torch.linalg.qr(torch.randn(OUT, OUT, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(IN, OUT, generator=gen)).Q
    teacher = (u * 10 * 0.6 ** torch.arange(OUT)) @ v.T
    data = []
    for _ in range(n):
        x = torch.randn(tokens, IN, generator=gen) * spread
        data.append((x, x @ teacher.T + 0.1 * torch.randn(tokens, OUT, generator=gen)))
    return data


def sse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).sum()


def model_with(mode="VrU2r", precondition="rms", n=3):
    torch.manual_seed(0)
    return g.apply_giva(nn.Sequential(nn.Linear(IN, OUT)),
                        g.GiVAConfig(r=R, target_modules=["0"], init_mode=mode, grad_batches=n,
                                     precondition=precondition))


def inverse_rms(rows):
    mean_square = rows.double().pow(2).mean(0)
    return 1 / (mean_square.sqrt() + RMS_FLOOR * mean_square.mean().sqrt())


def explicit(model, data):
    """The preconditioned gradient by formula: dL/dy = 2 (y - t) for the squared error."""
    layer = model[0].base
    W, bias = layer.weight.detach().double(), layer.bias.detach().double()
    gs = [2 * (x.double() @ W.T + bias - t.double()) for x, t in data]
    G = sum(gy.T @ x.double() for gy, (x, _) in zip(gs, data))
    return inverse_rms(gs[0])[:, None] * G * inverse_rms(data[0][0])


@pytest.mark.parametrize("mode", ["VrU2r", "VrUr"])
@pytest.mark.parametrize("svd,passes,tol", [("dense", 1, 1e-5), ("sketch", 2, 2e-2)])
def test_bases_are_the_singular_vectors_of_the_preconditioned_gradient(mode, svd, passes, tol):
    data = batches()
    model = model_with(mode)
    spectra = g.init_bases(model, data, sse, svd=svd, passes=passes, progress=False)
    U, S, Vh = torch.linalg.svd(explicit(model, data))
    cols = slice(R, 2 * R) if mode == "VrU2r" else slice(0, R)
    A, B = model[0].A.double(), model[0].B.double()
    # the same subspaces: every principal cosine 1
    assert torch.linalg.svdvals(A @ Vh[:R].T).min() > 1 - tol
    assert torch.linalg.svdvals(B.T @ U[:, cols]).min() > 1 - tol
    needed = 2 * R if mode == "VrU2r" else R
    torch.testing.assert_close(spectra["0"].double(), S[:needed] / len(data), rtol=tol, atol=0)


def test_none_is_the_plain_gradient():
    data = batches()
    plain, default = model_with(precondition="none"), model_with(precondition="none")
    g.init_bases(plain, data, sse, svd="dense", progress=False)
    g.init_bases(default, data, sse, svd="dense", precondition="rms", progress=False)
    g.init_bases(default, data, sse, svd="dense", progress=False)  # back to the config's "none"
    assert torch.equal(plain[0].A, default[0].A) and torch.equal(plain[0].B, default[0].B)


def test_an_outlier_feature_no_longer_decides_the_row_space():
    """A planted rank-2 teacher on 63 ordinary features plus a tiny one on a feature 30x larger than
    the others. Scaled by that size (twice: once in the input, once in the gradient's product) the
    outlier's column takes the plain gradient's top direction; preconditioned bases find the
    teacher's main row space. Orthogonal designs keep sampling noise out: x^T x is exact."""
    gen = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(OUT, 3, generator=gen)).Q  # teacher columns and, last, c
    v = torch.linalg.qr(torch.randn(IN - 1, 2, generator=gen)).Q
    teacher_rows = torch.cat([torch.zeros(2, 1), v.T], 1)  # 2 x 64, feature 0 unused
    tokens, eps = 64, 1 / 6
    data = []
    for _ in range(4):
        q = torch.linalg.qr(torch.randn(tokens, tokens, generator=gen)).Q * tokens ** 0.5
        ordinary, sign = q[:, :IN - 1], q[:, IN - 1]
        x = torch.cat([30.0 * sign[:, None], ordinary], 1)
        y = ordinary @ v @ u[:, :2].T + eps * sign[:, None] * u[:, 2]
        data.append((x, y))

    def basis_rows(precondition):
        model = g.apply_giva(nn.Sequential(nn.Linear(IN, OUT, bias=False)),
                             g.GiVAConfig(r=2, target_modules=["0"], init_mode="VrUr", grad_batches=4,
                                          precondition=precondition))
        with torch.no_grad():
            model[0].base.weight.zero_()
        g.init_bases(model, data, sse, svd="dense", progress=False)
        return model[0].A

    plain, rms = basis_rows("none"), basis_rows("rms")
    assert plain[:, 0].abs().max() > 0.99, plain[:, 0]  # one basis row is the outlier feature
    assert torch.linalg.svdvals(plain @ teacher_rows.T).min() < 0.1
    cosines = torch.linalg.svdvals(rms @ teacher_rows.T)
    assert cosines.min() > 0.99, cosines


def test_feature_absent_from_the_first_batch_is_boosted_a_bounded_amount():
    data = batches()
    data[0][0][:, 5] = 0.0  # feature 5 is silent in the first batch only
    inv = inverse_rms(data[0][0])
    assert inv[5] == inv.max() and inv[5] <= 1 / (RMS_FLOOR * data[0][0].double().pow(2).mean().sqrt())
    model = model_with()
    g.init_bases(model, data, sse, svd="dense", progress=False)
    U, S, Vh = torch.linalg.svd(explicit(model, data))
    torch.testing.assert_close((model[0].A.double() @ Vh[:R].T).abs().diagonal(),
                               torch.ones(R, dtype=torch.float64), atol=1e-5, rtol=0)


def test_bad_precondition_is_refused_before_anything_changes():
    data = batches()
    model = model_with(precondition="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="precondition must be one of"):
        g.init_bases(model, data, sse, precondition="adam", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="GiVAConfig.precondition"):
        g.GiVAConfig(precondition="RMS")


def test_configs_saved_before_the_preconditioner_load_with_none():
    saved = {k: v for k, v in g.GiVAConfig(r=4).to_dict().items() if k != "precondition"}
    assert g.GiVAConfig.from_dict(saved).precondition == "none"
    assert g.GiVAConfig.from_dict(g.GiVAConfig(precondition="rms").to_dict()).precondition == "rms"
