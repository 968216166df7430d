"""The CUDA kernels of giva::sketch_update and giva::rsvd against giva_ext.reference (skipped without
a GPU or CUDA kernels), and the sketched init of a model on the GPU."""
import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext import ops, reference


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not ops.HAS_NATIVE:
        return f"giva_ext._C is not loaded ({ops.LOAD_ERROR})"
    if not (ops._HAS_SKETCH["cuda"] and ops._HAS_RSVD["cuda"]):
        return "giva_ext._C was built without CUDA sketch kernels (GIVA_BUILD=cuda)"
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,n_in,out,k,k2", [(0, 8, 6, 3, 7), (1, 5, 4, 1, 3), (70000, 96, 40, 9, 19),
                                             (513, 1024, 768, 33, 67)])
def test_sketch_update_matches_reference(dtype, T, n_in, out, k, k2):
    """Both accumulate in fp32 from the same (rounded) inputs, so they agree to fp32 round-off."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, n_in, generator=gen).to("cuda", dtype)
    gy = torch.randn(T, out, generator=gen).to("cuda", dtype)
    args = [torch.randn(*s, generator=gen).cuda() for s in ((n_in, k), (k2, out), (out, k), (k2, n_in))]
    got = torch.ops.giva.sketch_update(x, gy, *args)
    want = reference.sketch_update(x.cpu().double(), gy.cpu().double(), *(a.cpu().double() for a in args))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.is_cuda and a.shape == b.shape
        if b.numel():
            scale = b.abs().max().item()
            assert (a.cpu().double() - b).abs().max().item() <= 1e-4 * max(scale, 1.0)


@pytest.mark.parametrize("shape,omega_shape", [((1024, 768), (768, 40)), ((4, 512, 640), (4, 640, 24))])
def test_rsvd_matches_reference(shape, omega_shape):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, generator=gen, dtype=torch.float64)
    omega = torch.randn(*omega_shape, generator=gen, dtype=torch.float64)
    U, S, V = torch.ops.giva.rsvd(A.cuda(), omega.cuda(), 16, 2)
    U0, S0, V0 = reference.rsvd(A, omega, 16, 2)
    torch.testing.assert_close(S.cpu(), S0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ V.mT, ((U0 * S0.unsqueeze(-2)) @ V0.mT).cuda(),
                               rtol=1e-7, atol=1e-7)


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    x, gy = torch.randn(50, 12, generator=gen).cuda(), torch.randn(50, 10, generator=gen).cuda()
    args = [torch.randn(*s, generator=gen).cuda() for s in ((12, 3), (7, 10), (10, 3), (7, 12))]
    torch.library.opcheck(torch.ops.giva.sketch_update.default, (x, gy, *args))
    torch.library.opcheck(torch.ops.giva.sketch_update.default, (x.half(), gy.half(), *args))
    A = torch.randn(40, 30, generator=gen).cuda()
    torch.library.opcheck(torch.ops.giva.rsvd.default, (A, torch.randn(30, 10, generator=gen).cuda(), 6, 2))


def test_wrong_device_is_named():
    x, gy = torch.randn(5, 4, device="cuda"), torch.randn(5, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"omega must be on device cuda"):
        torch.ops.giva.sketch_update(x, gy, torch.randn(4, 2), *(torch.randn(*s, device="cuda")
                                     for s in ((6, 3), (3, 2), (6, 4))))


def test_init_on_gpu_matches_cpu():
    """The same model and batches give the same bases on the GPU as on the CPU (the test matrices
    are drawn on the CPU, so both sketch the same thing)."""
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(256, 192), nn.Tanh(), nn.Linear(192, 128))
    batches = [(torch.randn(64, 256), torch.randn(64, 128)) for _ in range(3)]
    gpu = nn.Sequential(nn.Linear(256, 192), nn.Tanh(), nn.Linear(192, 128)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    config = g.GiVAConfig(r=4, target_modules="all-linear", grad_batches=3)
    g.apply_giva(cpu, config)
    g.apply_giva(gpu, config)
    mse = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    s_cpu = g.init_bases(cpu, batches, mse, progress=False)
    s_gpu = g.init_bases(gpu, [(x.cuda(), y.cuda()) for x, y in batches], mse, progress=False)
    for name in s_cpu:
        torch.testing.assert_close(s_gpu[name].cpu(), s_cpu[name], rtol=1e-3, atol=1e-6)
    for a, b in ((cpu[0].A, gpu[0].A), (cpu[2].B, gpu[2].B)):
        cosines = torch.linalg.svdvals(a @ b.cpu().T if a.shape[0] < a.shape[1] else a.T @ b.cpu())
        assert cosines.min() > 0.99
