"""csrc/cuda/linear.cu (kernels and host code) and mixed.cu run on the CPU under tests/cuda_emulation
and compared against giva_ext.reference with the tolerances of the CUDA tests.

The file is compiled as C++ against a CPU emulation of the CUDA features it uses (fibers for a
block's threads, barriers for __syncthreads and warp shuffles) and registered as
torch.ops.giva_cuda_emulation.*, taking CPU tensors. This checks the kernels' indexing, reductions,
tails, vector/scalar paths, grid geometry and the host code around them without a GPU. A missing
barrier shows only where the emulation's one fixed thread order exposes it, and speed not at all:
bench/gpu_check.sh (racecheck, benchmarks) covers those on a GPU. Above rank 8 the host code's cuBLAS
products run as CPU ATen calls. The emulated device has GIVA_EMULATED_SMS SMs (4 unless a test sets
it). Under tools/asan_check.sh the emulation is built with AddressSanitizer, which then reports any
access a kernel makes outside a tensor.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from giva_ext import reference
from test_adapters import op_args
from test_ops_cuda import (_args, _as, _assert_matches, _assert_starts_at_base, _inputs, _overflow_case,
                           _saved_s)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="the CUDA emulation is built on Linux (ucontext) with a C++ compiler")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (T, in, out, r): aligned, T=1/r=1, odd sizes, the largest fused rank, the cuBLAS path (r=9),
# several column tiles for every dtype (a tile is 1024 fp32 or 2048 fp16/bf16 columns), out=1, T=0.
SHAPES = [(64, 128, 96, 8), (1, 64, 32, 1), (37, 23, 29, 3), (5, 37, 23, 8), (50, 72, 80, 9),
          (19, 2100, 40, 4), (6, 16, 1, 1), (0, 16, 8, 4)]
_id = "x".join
MAIN_SOURCE = ROOT / "tests" / "cuda_emulation" / "cuda_ops_emulated.cpp"


def _build_emulation() -> Path:
    """Compiles cuda_ops_emulated.cpp into build/cuda_emulation (reused while the sources, the flags and
    torch are unchanged). GIVA_EMULATION_CFLAGS adds compiler flags (tools/asan_check.sh passes the
    sanitizers)."""
    from torch.utils import cpp_extension
    extra = os.environ.get("GIVA_EMULATION_CFLAGS", "").split()
    key = hashlib.sha1(" ".join([torch.__version__, *extra]).encode())
    for path in sorted([*(ROOT / "tests" / "cuda_emulation").iterdir(), *(ROOT / "csrc" / "cuda").iterdir(),
                        *(ROOT / "csrc" / "cpu").glob("*.h")]):
        key.update(path.read_bytes())
    lib = ROOT / "build" / "cuda_emulation" / f"giva_cuda_emulation_{key.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        torch_lib = Path(torch.__file__).parent / "lib"
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", "-fPIC", "-shared", *extra,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{p}" for p in cpp_extension.include_paths()), str(MAIN_SOURCE), "-o", str(tmp),
               f"-L{torch_lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"building the CUDA emulation failed:\n{done.stderr[-4000:]}"
        os.replace(tmp, lib)
    return lib


@pytest.fixture(scope="module")
def emulated():
    torch.ops.load_library(str(_build_emulation()))
    return torch.ops.giva_cuda_emulation


@pytest.fixture
def sms(monkeypatch):
    """Sets the emulated SM count (the grid geometry follows it)."""
    return lambda n: monkeypatch.setenv("GIVA_EMULATED_SMS", str(n))


def _cpu_inputs(*shape, dtype, **kw):
    return _inputs(*shape, dtype, device="cpu", **kw)


def _assert_forward(got, t, dtype):
    """(y, s) from the op against the reference on the layer tensors t (2x-composite rule)."""
    y, s = got
    y_c, s_c = reference.linear_forward(*_args(t))
    y_64, s_64 = reference.linear_forward(*_args(_as(t, torch.float64)))
    _assert_matches(y, y_c, y_64, dtype, "y")
    _assert_matches(s, s_c, s_64, reference.saved_s_dtype(dtype), "s")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: _id(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_reference(emulated, shape, dtype, bias):
    t = _cpu_inputs(*shape, dtype=dtype, bias=bias)
    _assert_forward(emulated.linear_forward(*_args(t)), t, dtype)


def _backward_case(T, n_in, n_out, r, dtype, seed=1):
    t = _cpu_inputs(T, n_in, n_out, r, dtype=dtype, seed=seed)
    gy = torch.randn(T, n_out, generator=torch.Generator().manual_seed(seed)).to(dtype)
    s = _saved_s(t)  # the saved activation, as the forward returns it
    return gy, s, (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])


def _assert_backward(got, gy, s, rest, dtype):
    composite = reference.linear_backward(gy, s, *rest)
    ref64 = reference.linear_backward(gy.double(), s.double(), *(v.double() for v in rest))
    for name, a, c, e in zip(("grad_x", "grad_lambda_s", "grad_lambda_o"), got, composite, ref64):
        _assert_matches(a, c, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: _id(map(str, s)))
def test_backward_matches_reference(emulated, shape, dtype):
    gy, s, rest = _backward_case(*shape, dtype)
    _assert_backward(emulated.linear_backward(gy, s, *rest, [True, True, True]), gy, s, rest, dtype)


def _with_float32_vectors(t, seed=3):
    """The vectors in float32, off the half-precision grid (so that their precision shows)."""
    gen = torch.Generator().manual_seed(seed)
    for k in ("lambda_s", "lambda_o"):
        t[k] = t[k].float() + 1e-3 * torch.randn(t[k].shape, generator=gen)
    return t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 23, 29, 3), (64, 128, 96, 8), (50, 72, 80, 9)],
                         ids=lambda s: _id(map(str, s)))
def test_float32_vectors_beside_half_data(emulated, shape, dtype):
    """The trainable vectors kept in float32 beside fp16/bf16 data (both rank paths): outputs in
    the data's dtype, vector gradients in float32, errors at most twice the composite's (which
    uses the vectors in the data's dtype)."""
    t = _with_float32_vectors(_cpu_inputs(*shape, dtype=dtype))
    _assert_forward(emulated.linear_forward(*_args(t)), t, dtype)
    gy, s, rest = _backward_case(*shape, dtype)
    rest = (*rest[:3], t["lambda_s"], t["lambda_o"])
    got = emulated.linear_backward(gy, s, *rest, [True, True, True])
    composite = reference.linear_backward(gy, s, *rest)
    ref64 = reference.linear_backward(gy.double(), s.double(), *(v.double() for v in rest))
    _assert_matches(got[0], composite[0], ref64[0], dtype, "grad_x")
    for name, a, c, e in zip(("grad_lambda_s", "grad_lambda_o"), got[1:], composite[1:], ref64[1:]):
        assert a.dtype == torch.float32 and c.dtype == torch.float32, name
        scale = e.abs().max().item()
        err, comp_err = ((v.double() - e).abs().max().item() for v in (a, c))
        assert err <= 2 * comp_err + torch.finfo(dtype).eps * scale, f"{name}: {err:.3g} vs {comp_err:.3g}"


@pytest.mark.parametrize("n_sms", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grid_geometry(emulated, sms, n_sms, dtype):
    """Row groups and expand tiles follow the SM count: one row group and blocks that loop over
    several row tiles (1 SM), a few groups with a ragged last one (3), one group per 4 rows (64):
    the results must not depend on the split."""
    sms(n_sms)
    shape = (150, 300, 260, 7)
    t = _cpu_inputs(*shape, dtype=dtype)
    _assert_forward(emulated.linear_forward(*_args(t)), t, dtype)
    gy, s, rest = _backward_case(*shape, dtype)
    _assert_backward(emulated.linear_backward(gy, s, *rest, [True, True, True]), gy, s, rest, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_results_do_not_depend_on_thread_order(emulated, monkeypatch, sms, dtype):
    """Every output, bit for bit, under other orders of the threads between barriers: a kernel that
    read what another thread writes without a barrier between would see a different value.
    1 SM: expand blocks loop over several row tiles, reusing their shared tile."""
    sms(1)
    shape = (150, 300, 260, 7)
    t = _cpu_inputs(*shape, dtype=dtype)
    gy, s, rest = _backward_case(*shape, dtype)

    def run():
        return (*emulated.linear_forward(*_args(t)),
                *emulated.linear_backward(gy, s, *rest, [True, True, True]))

    expected = run()
    for order in ("reverse", "shuffle:1", "shuffle:2"):
        monkeypatch.setenv("GIVA_EMULATED_ORDER", order)
        for name, a, b in zip(("y", "s", "grad_x", "grad_lambda_s", "grad_lambda_o"), run(), expected):
            assert torch.equal(a, b), f"{name} differs under thread order {order}"


@pytest.mark.parametrize("r", [6, 12], ids=["fused", "cublas"])
@pytest.mark.parametrize("mask", list(itertools.product([False, True], repeat=3)), ids=str)
def test_backward_output_mask(emulated, mask, r):
    gy, s, rest = _backward_case(40, 48, 56, r, torch.float32)
    full = emulated.linear_backward(gy, s, *rest, [True, True, True])
    got = emulated.linear_backward(gy, s, *rest, list(mask))
    for need, a, f in zip(mask, got, full):
        if need:
            torch.testing.assert_close(a, f, rtol=0, atol=0)
        else:
            assert a is None


@pytest.mark.parametrize("r", [4, 16], ids=["fused", "cublas"])
def test_fp16_lambda_gradients_past_fp16_range_of_M(emulated, r):
    """M = g^T s reaches 320 x 250 = 8e4, past fp16's 65504: both rank paths keep M in fp32."""
    T = 320
    t = _cpu_inputs(T, 64, 32, r, dtype=torch.float16, seed=2)
    gy = torch.ones(T, 32, dtype=torch.float16)
    s = torch.full((T, r), 250.0)  # fp32, as the forward saves it beside fp16
    t["B"] = (t["B"].float() * 1e-4).half()
    rest = (t["weight"], t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    _, grad_s, grad_o = emulated.linear_backward(gy, s, *rest, [False, True, True])
    _, want_s, want_o = reference.linear_backward(gy.double(), s.double(), *(v.double() for v in rest),
                                                  (False, True, True))
    for name, got, want in (("grad_lambda_s", grad_s, want_s), ("grad_lambda_o", grad_o, want_o)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=4e-3, atol=1e-2, msg=name)


@pytest.mark.parametrize("r", [4, 16], ids=["fused", "cublas"])
def test_fp16_s_past_fp16_range_starts_at_base(emulated, r):
    """s = x A^T past fp16's range at lambda_o = 0: y is the frozen layer's, bit for bit (s in fp32)."""
    t = _overflow_case(r, "cpu")
    _assert_starts_at_base(emulated.linear_forward, emulated.linear_backward, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["strided_columns", "padded_rows_aligned", "padded_rows_odd"])
def test_non_contiguous_x_and_grad_y(emulated, layout, dtype):
    """Views: copied (column stride 2), or read in place with a row stride (aligned vector loads,
    or the element-wise path for an odd offset)."""
    T, n_in, n_out = 45, 64, 40

    def view_of(a):
        if layout == "strided_columns":
            v = torch.zeros(a.shape[0], 2 * a.shape[1], dtype=a.dtype)
            v[:, ::2] = a
            return v[:, ::2]
        first = 0 if layout == "padded_rows_aligned" else 1
        v = torch.zeros(a.shape[0], a.shape[1] + 8, dtype=a.dtype)
        v[:, first:first + a.shape[1]] = a
        return v[:, first:first + a.shape[1]]

    t = _cpu_inputs(T, n_in, n_out, 5, dtype=dtype)
    _assert_forward(emulated.linear_forward(*_args({**t, "x": view_of(t["x"])})), t, dtype)
    gy, s, rest = _backward_case(T, n_in, n_out, 5, dtype)
    got = emulated.linear_backward(view_of(gy), s, *rest, [True, True, True])
    _assert_backward(got, gy, s, rest, dtype)


def test_unaligned_bias_view(emulated):
    t = _cpu_inputs(16, 32, 40, 4, dtype=torch.float16)
    t["bias"] = torch.randn(41).half()[1:]  # 2-byte offset: the element-wise store path
    y, _ = emulated.linear_forward(*_args(t))
    y_c, _ = reference.linear_forward(*_args(t))
    y_64, _ = reference.linear_forward(*_args(_as(t, torch.float64)))
    _assert_matches(y, y_c, y_64, torch.float16, "y")


def _adapter_case(T, n_in, n_out, r, dtype, base_layout="contiguous", seed=0):
    """x, a base output (the frozen layer's, as a quantized base would hand it over; contiguous, or
    a row-padded view aligned or at an odd offset) and the adapter's tensors."""
    t = _cpu_inputs(T, n_in, n_out, r, dtype=dtype, seed=seed)
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    if base_layout != "contiguous":
        first = 0 if base_layout == "padded_rows_aligned" else 1
        padded = torch.zeros(T, n_out + 8, dtype=dtype)
        padded[:, first:first + n_out] = base
        base = padded[:, first:first + n_out]
    return t["x"], base, (t["A"], t["B"], t["lambda_s"], t["lambda_o"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: _id(map(str, s)))
@pytest.mark.parametrize("base_layout", ["contiguous", "padded_rows_aligned", "padded_rows_odd"])
def test_adapter_ops_match_reference(emulated, shape, dtype, base_layout):
    """adapter_forward (expand_kernel starting from the base's rows: vector loads, or element-wise
    for an odd offset; the cuBLAS path above rank 8) and adapter_backward (no weight GEMM)."""
    x, base, rest = _adapter_case(*shape, dtype, base_layout)
    y, s = emulated.adapter_forward(x, base, *rest)
    y_c, s_c = reference.adapter_forward(x, base, *rest)
    y_64, s_64 = reference.adapter_forward(x.double(), base.double(), *(v.double() for v in rest))
    _assert_matches(y, y_c, y_64, dtype, "y")
    _assert_matches(s, s_c, s_64, reference.saved_s_dtype(dtype), "s")
    gy = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(1)).to(dtype)
    got = emulated.adapter_backward(gy, s_c, *rest, [True, True, True])
    composite = reference.adapter_backward(gy, s_c, *rest)
    ref64 = reference.adapter_backward(gy.double(), s_c.double(), *(v.double() for v in rest))
    for name, a, c, e in zip(("grad_x", "grad_lambda_s", "grad_lambda_o"), got, composite, ref64):
        _assert_matches(a, c, e, dtype, name)


@pytest.mark.parametrize("r", [4, 16], ids=["fused", "cublas"])
def test_adapter_fp16_s_past_fp16_range_starts_at_base(emulated, r):
    """As for the layer op: at lambda_o = 0 the adapter op returns the base output bit for bit."""
    t = _overflow_case(r, "cpu")
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    y, s = emulated.adapter_forward(t["x"], base, t["A"], t["B"], t["lambda_s"], t["lambda_o"])
    assert torch.equal(y, base) and s.dtype == torch.float32 and torch.isfinite(s).all()


def test_bad_input_names_the_argument(emulated):
    t = _cpu_inputs(8, 16, 12, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"\bA\b"):
        emulated.linear_forward(*_args({**t, "A": t["A"][:, :-1]}))
    with pytest.raises(RuntimeError, match=r"\bx\b.*Double"):
        emulated.linear_forward(*_args(_as(t, torch.float64)))  # no float64 CUDA kernel


def _lowered(args, dtype):
    """mixed_linear arguments (float64) with the floating tensors in dtype."""
    return [[t.to(dtype) for t in a] if isinstance(a, list) else
            a.to(dtype) if a is not None and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T", [0, 1, 37, 300])
@pytest.mark.parametrize("order", ["scattered", "sorted"])  # short runs (gathered rows), long runs (views)
@pytest.mark.parametrize("path", ["grouped", "per_row"])
def test_mixed_linear_matches_reference(emulated, dtype, bias, T, order, path):
    op = getattr(emulated, f"mixed_linear_{path}")
    args = list(op_args(T, 64, 48, [1, 8, 16], torch.float64, bias))
    if order == "sorted":
        args[-1] = args[-1].sort().values
    exact = reference.mixed_linear(*args)
    low = _lowered(args, dtype)
    _assert_matches(op(*low), reference.mixed_linear(*low), exact, dtype, "y")
    if dtype != torch.float32:  # the vectors as a half-precision model keeps them: float32
        low[5:7] = [[t.float() for t in args[5]], [t.float() for t in args[6]]]
        _assert_matches(op(*low), reference.mixed_linear(*low), exact, dtype, "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_per_row_many_adapters(emulated, dtype):
    """Two adapter tables (32 adapters per launch), ranks over several chunks of 8 (1 to 17), an
    odd in and an out over several column blocks, rows without an adapter in between."""
    ranks = [1, 3, 8, 9, 17] * 7  # 35 adapters
    args = list(op_args(90, 37, 300, ranks, torch.float64, bias=True, seed=3))
    args[-1] = torch.randint(-1, len(ranks), (90,), generator=torch.Generator().manual_seed(4))
    args[-1][:len(ranks)] = torch.arange(len(ranks))  # every adapter has a row
    low = _lowered(args, dtype)
    _assert_matches(emulated.mixed_linear_per_row(*low), reference.mixed_linear(*low),
                    reference.mixed_linear(*args), dtype, "y")


@pytest.mark.parametrize("order", ["scattered", "sorted"])
@pytest.mark.parametrize("path", ["grouped", "per_row"])
def test_mixed_fp16_s_past_fp16_range_starts_at_base(emulated, order, path):
    """Two fp16 adapters whose s = x A^T passes fp16's range, at lambda_o = 0: every row gets the
    frozen layer's output bit for bit (short runs gathered, long runs as views, or per row)."""
    cases = [_overflow_case(r, "cpu", T=40) for r in (4, 16)]
    t = cases[0]
    ids = torch.arange(40) % 3 - 1  # -1, 0, 1, -1, ...
    if order == "sorted":
        ids = ids.sort().values
    args = (t["x"], t["weight"], t["bias"], [c["A"] for c in cases], [c["B"] for c in cases],
            [c["lambda_s"] for c in cases], [c["lambda_o"] for c in cases], ids)
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    assert torch.equal(getattr(emulated, f"mixed_linear_{path}")(*args), base)
    assert torch.equal(reference.mixed_linear(*args), base)


def test_mixed_path_choice(emulated):
    """Small calls take the per-row path (sync-free); once T r_max (in + out) passes 2^26 the
    grouped one: bit-identical to the path's own op."""
    small = op_args(37, 64, 48, [1, 8, 16], torch.float32, seed=5)
    assert torch.equal(emulated.mixed_linear(*small), emulated.mixed_linear_per_row(*small))
    large = list(op_args(2100, 1024, 1024, [16], torch.float32, seed=6))  # 2100 * 16 * 2048 > 2^26
    large[-1] = large[-1].sort().values  # long runs: the grouped path's GEMMs, fast on the CPU
    assert torch.equal(emulated.mixed_linear(*large), emulated.mixed_linear_grouped(*large))


def test_mixed_per_row_bad_id_asserts():
    """A token id out of range stops the per-row kernel with a device-side assert naming it (run in
    a child process: the assert aborts it)."""
    code = ("import torch, sys; sys.path.insert(0, 'tests'); from test_adapters import op_args; "
            f"torch.ops.load_library({str(_build_emulation())!r}); "
            "args = list(op_args(8, 16, 12, [2, 3], torch.float32)); args[-1][5] = 2; "
            "torch.ops.giva_cuda_emulation.mixed_linear_per_row(*args)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "token id is outside [-1, number of adapters)" in done.stderr
