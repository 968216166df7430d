"""Streamed gradient sketches and the randomized SVD: native ops against reference.py, the sketched
init against the exact SVD of the dense gradient, caches, and memory.

Accuracy on a flat spectrum (test_flat_spectrum_accuracy_per_passes: a Gaussian 192 x 256 gradient,
r = 8, VrU2r, default oversampling k = 33, k' = 67; mean cosine of the principal angles to the
exact top-r right vectors / exact left vectors r..2r-1 / worst relative error of the top 2r
singular values):
    passes=1: 0.31 / 0.27 / 158%   passes=2: 0.79 / 0.53 / 9.5%
    passes=3: 0.92 / 0.76 / 4.4%   passes=4: 0.97 / 0.89 / 2.3%
A flat spectrum has no dominant subspace for a sketch to find; one pass is accurate on the decaying
spectra gradients have (test_decaying_spectrum_*), and each extra pass multiplies the basis by the
spectrum once more.
"""
import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext import ops, reference
from giva_ext.rsvd import GradientSketch

native = pytest.mark.skipif(not (ops.HAS_NATIVE and ops._HAS_SKETCH["cpu"]),
                            reason=f"native sketch ops not built: {ops.LOAD_ERROR}")


def planted(out, n_in, spectrum, seed=0):
    """out x in matrix U diag(spectrum) V^T with random orthonormal U, V (float32)."""
    gen = torch.Generator().manual_seed(seed)
    m = min(out, n_in)
    u = torch.linalg.qr(torch.randn(out, m, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n_in, m, generator=gen, dtype=torch.float64)).Q
    return ((u * spectrum(m)) @ v.T).float()


def inner_product_loss(model, batch):
    return (model(batch[0]) * batch[1]).sum()


def init_on(G, r=8, batches=4, **kwargs):
    """init_bases on one bias-free layer whose gradient sums to exactly ``batches`` * G: the tokens
    are the rows of the identity and the output gradients the rows of G^T, split over batches."""
    out, n_in = G.shape
    model = g.apply_giva(nn.Sequential(nn.Linear(n_in, out, bias=False)),
                         g.GiVAConfig(r=r, target_modules=["0"], grad_batches=batches))
    eye = torch.eye(n_in)
    data = [(eye[i::batches], G.T[i::batches] * batches) for i in range(batches)]
    spectra = g.init_bases(model, data, inner_product_loss, progress=False, **kwargs)
    return model, data, spectra["0"]


def mean_cosine(a, b):
    """Mean cosine of the principal angles between the column spaces of orthonormal a and b."""
    return torch.linalg.svdvals(a.T.double() @ b.double()).mean().item()


def agreement(G, model, s, r=8):
    U, S, Vh = torch.linalg.svd(G.double())
    layer = model[0]
    right = mean_cosine(layer.A.T, Vh[:r].T)
    left = mean_cosine(layer.B, U[:, r:2 * r])
    sv = ((s.double() - S[:2 * r]).abs() / S[:2 * r]).max().item()
    return right, left, sv


# ---- the init against the exact SVD ----------------------------------------------------------------

def test_decaying_spectrum_one_pass_matches_exact_svd():
    G = planted(192, 256, lambda m: 0.8 ** torch.arange(m, dtype=torch.float64))
    model, _, s = init_on(G)
    right, left, sv = agreement(G, model, s)
    assert right >= 0.99 and left >= 0.99 and sv <= 0.01, (right, left, sv)


def test_slower_decay_needs_two_passes():
    G = planted(192, 256, lambda m: 0.9 ** torch.arange(m, dtype=torch.float64))
    model, _, s = init_on(G, passes=2)
    right, left, sv = agreement(G, model, s)
    assert right >= 0.99 and left >= 0.99 and sv <= 0.01, (right, left, sv)


def test_flat_spectrum_accuracy_per_passes():
    """The figures in this module's docstring; each extra pass must help."""
    G = torch.randn(192, 256, generator=torch.Generator().manual_seed(1))
    floors = {1: (0.25, 0.2), 2: (0.7, 0.45), 3: (0.88, 0.72), 4: (0.94, 0.85)}
    previous = 0.0
    for passes, (right_floor, left_floor) in floors.items():
        model, _, s = init_on(G, passes=passes)
        right, left, _ = agreement(G, model, s)
        assert right >= right_floor and left >= left_floor, (passes, right, left)
        assert right > previous
        previous = right


def test_dense_path_matches_exact_svd():
    G = planted(96, 80, lambda m: 0.9 ** torch.arange(m, dtype=torch.float64))
    model, _, s = init_on(G, svd="dense")
    right, left, sv = agreement(G, model, s)
    assert right > 0.9999 and left > 0.9999 and sv < 1e-4


def test_sketch_of_batches_in_any_order_and_split_equals_the_whole():
    gen = torch.Generator().manual_seed(3)
    x, gy = torch.randn(300, 70, generator=gen), torch.randn(300, 50, generator=gen)
    whole = GradientSketch("layer", 50, 70, k=9, passes=1, seed=5, device="cpu")
    whole.update(x, gy)
    parts = GradientSketch("layer", 50, 70, k=9, passes=1, seed=5, device="cpu")
    for idx in [torch.arange(200, 300), torch.arange(0, 7), torch.arange(7, 200)]:
        parts.update(x[idx], gy[idx])
    shuffled = GradientSketch("layer", 50, 70, k=9, passes=1, seed=5, device="cpu")
    perm = torch.randperm(300, generator=gen)
    for chunk in perm.split(64):
        shuffled.update(x[chunk], gy[chunk])
    for other in (parts, shuffled):
        for key in ("Y", "Z"):
            torch.testing.assert_close(other.state()[key], whole.state()[key], rtol=1e-5, atol=1e-4)
    # and the sketch is exactly the sketch of the dense gradient
    omega, psi = whole.test_matrices()
    G = gy.double().T @ x.double()
    torch.testing.assert_close(whole.Y.double(), G @ omega.double(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(whole.Z.double(), psi.double() @ G, rtol=1e-5, atol=1e-3)


def test_bfloat16_model_sketches_in_float32():
    G = planted(96, 128, lambda m: 0.7 ** torch.arange(m, dtype=torch.float64))
    model = g.apply_giva(nn.Sequential(nn.Linear(128, 96, bias=False)),
                         g.GiVAConfig(r=4, target_modules=["0"])).to(torch.bfloat16)
    data = [(torch.eye(128, dtype=torch.bfloat16), G.T.to(torch.bfloat16))]
    g.init_bases(model, data, inner_product_loss, progress=False)
    U, _, Vh = torch.linalg.svd(G.double())
    assert mean_cosine(model[0].A.float().T, Vh[:4].T) > 0.99
    assert mean_cosine(model[0].B.float(), U[:, 4:8]) > 0.98


def test_one_shot_iterator_with_passes_is_refused():
    model = g.apply_giva(nn.Sequential(nn.Linear(48, 40, bias=False)), g.GiVAConfig(r=2, target_modules=["0"]))
    batches = (b for b in [(torch.eye(48), torch.randn(48, 40))])
    with pytest.raises(ValueError, match="one-shot iterator"):
        g.init_bases(model, batches, inner_product_loss, passes=2, progress=False)


def test_batches_that_change_between_passes_are_refused():
    model = g.apply_giva(nn.Sequential(nn.Linear(64, 48, bias=False)), g.GiVAConfig(r=2, target_modules=["0"]))

    class Reshuffled:  # re-iterable, but yields new random batches every time
        def __iter__(self):
            return iter([(torch.randn(16, 64), torch.randn(16, 48))])

    with pytest.raises(ValueError, match="same in every pass"):
        g.init_bases(model, Reshuffled(), inner_product_loss, passes=2, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(svd="exact"), "svd must be one of"),
    (dict(svd="dense", passes=2), "svd='sketch' only"),
    (dict(passes=0), "passes must be an int >= 1"),
    (dict(oversample=-1), "oversample must be"),
    (dict(cache_every=0), "cache_every must be"),
])
def test_bad_arguments(kwargs, match):
    model = g.apply_giva(nn.Sequential(nn.Linear(8, 8)), g.GiVAConfig(r=1, target_modules=["0"]))
    with pytest.raises(ValueError, match=match):
        g.init_bases(model, [(torch.randn(2, 8), torch.randn(2, 8))], inner_product_loss,
                     progress=False, **kwargs)


def test_summary_is_logged(caplog):
    G = planted(96, 128, lambda m: 0.7 ** torch.arange(m, dtype=torch.float64))
    with caplog.at_level("INFO", logger="giva_ext.init"):
        init_on(G, r=4)
    assert "0: rank 8 used (sketch k=17, k'=35, 1 pass(es)); sigma_8/sigma_1=" in caplog.text


# ---- cache --------------------------------------------------------------------------------------------

class Interrupt(Exception):
    pass


def test_cache_resumes_an_interrupted_init_to_the_same_bases(tmp_path):
    G = planted(96, 128, lambda m: 0.8 ** torch.arange(m, dtype=torch.float64))
    reference_model, data, s_ref = init_on(G, r=4, passes=2)
    cache = tmp_path / "init.safetensors"

    def interrupted():  # dies in pass 2, after its first batch
        for i, batch in enumerate(data):
            if i == 1 and calls["n"] >= len(data):
                raise Interrupt
            calls["n"] += 1
            yield batch

    class Once:
        def __iter__(self):
            return interrupted()

    calls = {"n": 0}
    model = g.apply_giva(nn.Sequential(nn.Linear(128, 96, bias=False)),
                         g.GiVAConfig(r=4, target_modules=["0"], grad_batches=4))
    before = model[0].A.clone()
    with pytest.raises(Interrupt):
        g.init_bases(model, Once(), inner_product_loss, passes=2, cache=cache, progress=False)
    assert torch.equal(model[0].A, before) and cache.exists()
    s = g.init_bases(model, data, inner_product_loss, passes=2, cache=cache, progress=False)
    torch.testing.assert_close(s["0"], s_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(model[0].A, reference_model[0].A, rtol=0, atol=1e-5)
    # A finished cache needs no batches at all.
    again = g.init_bases(model, None, inner_product_loss, passes=2, cache=cache, progress=False)
    torch.testing.assert_close(again["0"], s_ref, rtol=1e-5, atol=0)


def test_cache_from_other_settings_or_model_is_refused(tmp_path):
    G = torch.randn(40, 48)
    model, data, _ = init_on(G, r=2, batches=2)
    cache = tmp_path / "c.safetensors"
    g.init_bases(model, data, inner_product_loss, cache=cache, progress=False)
    with pytest.raises(ValueError, match=r"c\.safetensors was made with passes=1 but this init has passes=2"):
        g.init_bases(model, data, inner_product_loss, cache=cache, passes=2, progress=False)
    with pytest.raises(ValueError, match="made with init_mode='VrU2r' but this init has init_mode='VrUr'"):
        g.init_bases(model, data, inner_product_loss, cache=cache, init_mode="VrUr", progress=False)
    with torch.no_grad():
        model[0].base.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"made for another model: layer '0' has sha256"):
        g.init_bases(model, data, inner_product_loss, cache=cache, progress=False)


# ---- native ops against the reference --------------------------------------------------------------

@native
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
@pytest.mark.parametrize("T,n_in,out,k,k2", [(0, 8, 6, 3, 7), (1, 5, 4, 1, 3), (3000, 40, 24, 9, 19),
                                             (70, 33, 21, 0, 5), (70, 33, 21, 4, 0)])
def test_sketch_update_native_matches_reference(dtype, tol, T, n_in, out, k, k2):
    gen = torch.Generator().manual_seed(0)
    acc = reference.sketch_accumulator_dtype(dtype)
    x = torch.randn(T, n_in, generator=gen).to(dtype)
    gy = torch.randn(T, out, generator=gen).to(dtype)
    args = [torch.randn(*shape, generator=gen).to(acc) for shape in ((n_in, k), (k2, out), (out, k), (k2, n_in))]
    got = torch.ops.giva.sketch_update(x, gy, *args)
    want = reference.sketch_update(x, gy, *args)
    for a, b in zip(got, want):
        assert a.dtype == acc and a.shape == b.shape
        if b.numel():
            assert (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1.0)


@native
def test_sketch_update_checks_arguments():
    x, gy = torch.randn(5, 4), torch.randn(5, 3)
    om, ps, Y, Z = torch.randn(4, 2), torch.randn(6, 3), torch.randn(3, 2), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match=r"g must have shape \(T, out\) = \(5, \?\), got \(4, 3\)"):
        torch.ops.giva.sketch_update(x, gy[:4], om, ps, Y, Z)
    with pytest.raises(RuntimeError, match=r"omega must have dtype Float \(the sketch accumulator dtype"):
        torch.ops.giva.sketch_update(x, gy, om.double(), ps, Y, Z)
    with pytest.raises(RuntimeError, match=r"Z must have shape \(k', in\) = \(6, 4\)"):
        torch.ops.giva.sketch_update(x, gy, om, ps, Y, Z[:5])


@native
def test_rsvd_native_matches_reference_2d_and_batched():
    gen = torch.Generator().manual_seed(0)
    for shape, omega_shape in [((120, 90), (90, 20)), ((3, 64, 100), (3, 100, 12))]:
        A = torch.randn(*shape, generator=gen, dtype=torch.float64)
        omega = torch.randn(*omega_shape, generator=gen, dtype=torch.float64)
        for got, want in zip(torch.ops.giva.rsvd(A, omega, 8, 2), reference.rsvd(A, omega, 8, 2)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # a batch equals its matrices one by one
    A = torch.randn(3, 64, 100, generator=gen, dtype=torch.float64)
    omega = torch.randn(3, 100, 12, generator=gen, dtype=torch.float64)
    U, S, V = torch.ops.giva.rsvd(A, omega, 8, 2)
    for i in range(3):
        Ui, Si, Vi = torch.ops.giva.rsvd(A[i], omega[i], 8, 2)
        torch.testing.assert_close(S[i], Si)
        torch.testing.assert_close(U[i] * S[i] @ V[i].T, Ui * Si @ Vi.T)


@native
def test_rsvd_checks_arguments():
    A, omega = torch.randn(10, 8), torch.randn(8, 4)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, l = 4\], got 5"):
        torch.ops.giva.rsvd(A, omega, 5, 1)
    with pytest.raises(RuntimeError, match=r"omega must have shape \(n, l\) = \(8, \?\)"):
        torch.ops.giva.rsvd(A, omega[:7], 2, 1)
    with pytest.raises(RuntimeError, match=r"A must have dtype in"):
        torch.ops.giva.rsvd(A.bfloat16(), omega.bfloat16(), 2, 1)


@native
def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    x, gy = torch.randn(50, 12, generator=gen), torch.randn(50, 10, generator=gen)
    sketch_args = (torch.randn(12, 3), torch.randn(7, 10), torch.randn(10, 3), torch.randn(7, 12))
    torch.library.opcheck(torch.ops.giva.sketch_update.default, (x, gy, *sketch_args))
    torch.library.opcheck(torch.ops.giva.sketch_update.default,
                          (x.bfloat16(), gy.bfloat16(), *sketch_args))
    A = torch.randn(40, 30, generator=gen)
    torch.library.opcheck(torch.ops.giva.rsvd.default, (A, torch.randn(30, 10, generator=gen), 6, 2))
    torch.library.opcheck(torch.ops.giva.rsvd.default,
                          (A.expand(2, 40, 30).contiguous(), torch.randn(2, 30, 10, generator=gen), 6, 1))


@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
@pytest.mark.parametrize("niter", [0, 2])
def test_randomized_svd_at_least_as_accurate_as_svd_lowrank(spectrum, niter):
    """Same q = k + oversample and niter: the error of the top-k singular values and of the rank-k
    approximation is no worse than torch.svd_lowrank's (averaged over seeds)."""
    k, q = 10, 18
    if spectrum == "decaying":
        A = planted(300, 200, lambda m: 0.85 ** torch.arange(m, dtype=torch.float64))
    else:
        A = torch.randn(300, 200, generator=torch.Generator().manual_seed(4))
    S_exact = torch.linalg.svdvals(A.double())[:k]
    ours, theirs = [0.0, 0.0], [0.0, 0.0]
    for seed in range(3):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(A, q=q, niter=niter)
        U, S, V = U[:, :k], S[:k], V[:, :k]
        theirs[0] += ((S.double() - S_exact).abs() / S_exact).max().item()
        theirs[1] += torch.linalg.norm(A - U * S @ V.T).item()
        U, S, V = g.randomized_svd(A, k, oversample=q - k, niter=niter,
                                   generator=torch.Generator().manual_seed(seed))
        ours[0] += ((S.double() - S_exact).abs() / S_exact).max().item()
        ours[1] += torch.linalg.norm(A - U * S @ V.T).item()
    assert ours[0] <= 1.1 * theirs[0] + 1e-5, (ours, theirs)
    assert ours[1] <= 1.01 * theirs[1] + 1e-4, (ours, theirs)


def test_orthonormalize_falls_back_on_rank_deficient_and_ill_conditioned_input():
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(50, 3, generator=gen) @ torch.randn(3, 8, generator=gen)
    graded = torch.randn(50, 8, generator=gen) * torch.logspace(0, -12, 8)
    for y in (low_rank, graded, torch.zeros(50, 8)):
        q = reference.orthonormalize(y)
        torch.testing.assert_close(q.T @ q, torch.eye(8), atol=1e-5, rtol=0)
    # a well-conditioned input keeps its column space
    y = torch.randn(50, 8, generator=gen)
    q = reference.orthonormalize(y)
    torch.testing.assert_close(q @ (q.T @ y), y, atol=1e-4, rtol=0)


# ---- memory ------------------------------------------------------------------------------------------

def _peak_bytes_allocated(fn) -> int:
    """Peak of CPU tensor memory allocated while fn runs, above what was live when it started, from
    the profiler's memory timeline (every tensor allocation and free, attributed in time)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max(sum(s) for s in sizes) - sum(sizes[0])


def test_sketch_init_peak_memory_is_far_below_dense():
    """Four 1024x1024 targets, r = 8 (VrU2r: k = 33, k' = 67), 2 batches of 16 tokens so that the
    accumulators, not the activations, dominate. Measured: the tensors the init holds per layer are
    4 MiB (dense) against 0.40 MiB (sketch), a ratio of in*out / (out*k + k'*in) = 10.1 against
    in*out / ((in+out)*k) = 15.5 (k' = 2k + 1 is the overhead); the extra peak of CPU tensor memory
    during init_bases (profiler timeline, activations and SVD work included) is 17.4 MiB (dense)
    against 4.4 MiB (sketch)."""
    width, layers_n, r = 1024, 4, 8
    k, k2 = 33, 67
    dense_state = width * width * 4
    sketch_state = GradientSketch.floats(width, width, k) * 4
    assert sketch_state == (width * k + k2 * width) * 4
    factor = width * width / ((width + width) * k)
    assert dense_state / sketch_state >= factor / 1.6

    torch.manual_seed(0)
    batches = [(torch.randn(16, width), torch.randn(16, width)) for _ in range(2)]
    peaks = {}
    for svd in ("dense", "sketch"):
        blocks = []
        for _ in range(layers_n):
            blocks += [nn.Linear(width, width), nn.Tanh()]
        model = g.apply_giva(nn.Sequential(*blocks), g.GiVAConfig(r=r, target_modules="all-linear",
                                                                 grad_batches=2))
        peaks[svd] = _peak_bytes_allocated(lambda: g.init_bases(
            model, batches, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), progress=False, svd=svd))
    assert peaks["dense"] >= layers_n * dense_state  # the dense accumulators are all live at once
    # what the sketch saves is the accumulators' difference; the rest (activations, g, SVD work) is
    # common to both
    assert peaks["dense"] - peaks["sketch"] >= 0.9 * layers_n * (dense_state - sketch_state), peaks
    assert peaks["dense"] >= 3.5 * peaks["sketch"], peaks
    print(f"extra peak during init_bases: dense {peaks['dense'] / 2**20:.2f} MiB, "
          f"sketch {peaks['sketch'] / 2**20:.2f} MiB")
