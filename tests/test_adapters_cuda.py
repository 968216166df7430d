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


def _captured(call):
    """(graph, output) of call captured in a CUDA graph, after a warm-up call off the capture stream
    (as torch.cuda.graph asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


def _expected_fp32(args, ids):
    """The float64 reference on the CPU for args (on CUDA) with the given ids."""
    cpu = _on(args, "cpu", torch.float64)
    return reference.mixed_linear(*cpu[:-1], ids.cpu())


@pytest.mark.parametrize("T,n,ranks", [(64, 96, [4, 8]), (2100, 1024, [16])],
                         ids=["decode", "past-the-per-row-budget"])
def test_mixed_op_replays_in_a_cuda_graph(T, n, ranks):
    """Captured once, replayed for new token ids written in place: the op reads nothing on the host
    while capturing (the second case takes the grouped path outside a graph)."""
    args = _on(op_args(T, n, n, ranks, torch.float64, True), "cuda", torch.float32)
    ids = args[-1].clone()
    graph, y = _captured(lambda: torch.ops.giva.mixed_linear(*args[:-1], ids))
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        ids.copy_(torch.randint(-1, len(ranks), (T,), generator=gen))
        graph.replay()
        exact = _expected_fp32(args, ids)
        assert (y.double().cpu() - exact).abs().max().item() <= 1e-4 * exact.abs().max().item()


def test_mixed_adapters_decode_step_in_a_cuda_graph():
    """A model's forward inside one mixed_adapters block, captured once and replayed after the
    rows' adapters change in place (the ids tensor), against each adapter run on its own."""
    torch.manual_seed(0)
    model = g.apply_giva(Net().cuda(), g.GiVAConfig(r=4, target_modules="all-linear"))
    g.add_adapter(model, "wide", g.GiVAConfig(r=8, target_modules=["query", "value"], seed=1))
    fill_vectors(model, "default", 0)
    fill_vectors(model, "wide", 1)
    tokens = torch.randint(0, 20, (5, 6), device="cuda")
    steps = ([1, -1, 0, 1, 0], [0, 0, 1, -1, 1], [-1, 1, 1, 0, -1])
    with torch.inference_mode():
        expected = [per_adapter_oracle(model, [None if i < 0 else ("default", "wide")[i] for i in rows],
                                       tokens) for rows in steps]
        rows = torch.tensor(steps[0], device="cuda")
        with g.mixed_adapters(model, rows):
            graph, out = _captured(lambda: model(tokens))
            for new, want in zip(steps, expected):
                rows.copy_(torch.tensor(new))
                graph.replay()
                torch.testing.assert_close(out, want)
