"""giva::mixed_linear on CUDA against the float64 reference on the CPU (skipped without a GPU).

fp32 matches tightly; fp16/bf16 stay within twice the error of the same-precision reference run
on the GPU (the flash-attention rule of tests/test_ops_cuda.py), plus one ulp of slack.
"""
from __future__ import annotations

import pytest
import torch

import giva_ext as g
from giva_ext import ops, reference

from test_adapters import fill_vectors, op_args, per_adapter_oracle
from test_model import Net

_HAS = torch.cuda.is_available() and ops.HAS_NATIVE and ops._HAS_MIXED.get("cuda", False)
pytestmark = pytest.mark.skipif(not _HAS, reason="no CUDA device or no CUDA kernel of giva::mixed_linear")

ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _on(args, device, dtype):
    def move(a):
        if isinstance(a, list):
            return [t.to(device, dtype) for t in a]
        if a is None:
            return None
        return a.to(device, dtype) if a.is_floating_point() else a.to(device)
    return [move(a) for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [0, 1, 37, 600])
def test_mixed_op_cuda(dtype, bias, T):
    args = op_args(T, 64, 48, [1, 8, 16], torch.float64, bias)
    exact = reference.mixed_linear(*args)
    got = torch.ops.giva.mixed_linear(*_on(args, "cuda", dtype))
    assert got.dtype == dtype and got.shape == (T, 48)
    if not T:
        return
    err = (got.double().cpu() - exact).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * exact.abs().max().item()
    else:
        composite = reference.mixed_linear(*_on(args, "cuda", dtype))
        bound = 2 * (composite.double().cpu() - exact).abs().max().item()
        assert err <= bound + ULP[dtype] * exact.abs().max().item()


def test_mixed_batch_on_a_cuda_model():
    torch.manual_seed(0)
    model = g.apply_giva(Net().cuda(), g.GiVAConfig(r=4, target_modules="all-linear"))
    g.add_adapter(model, "wide", g.GiVAConfig(r=8, target_modules=["query", "value"], seed=1))
    fill_vectors(model, "default", 0)
    fill_vectors(model, "wide", 1)
    ids = torch.randint(0, 20, (5, 6), device="cuda")
    rows = ["wide", None, "default", "wide", "default"]
    with torch.inference_mode():
        expected = per_adapter_oracle(model, rows, ids)
        with g.mixed_adapters(model, rows):
            got = model(ids)
    torch.testing.assert_close(got, expected)
