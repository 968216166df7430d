"""Build records, the load check in giva_ext.ops, `giva env` and the wheel version tags."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from giva_ext import buildinfo, cli, ops
from giva_ext.version import __version__

CPU_213 = buildinfo.make_record("cpu", "2.13.0+cpu", None, None)
CUDA_214 = buildinfo.make_record("cuda", "2.14.1+cu130", "13.0", "8.0;9.0+PTX")


def test_record_keeps_cuda_fields_for_cuda_builds_only():
    assert CUDA_214 == {"mode": "cuda", "torch": "2.14.1+cu130", "cuda": "13.0",
                        "arch_list": "8.0;9.0+PTX"}
    # A cpu build under a CUDA torch records no CUDA: the library does not use it.
    assert buildinfo.make_record("cpu", "2.14.1+cu130", "13.0", "8.0") == {
        "mode": "cpu", "torch": "2.14.1+cu130", "cuda": None, "arch_list": None}
    with pytest.raises(ValueError, match="needs torch's CUDA version"):
        buildinfo.make_record("cuda", "2.14.1", None, None)


def test_record_round_trip_and_bad_records(tmp_path):
    path = str(tmp_path / buildinfo.RECORD_NAME)
    buildinfo.write_record(path, CUDA_214)
    assert buildinfo.read_record(path) == CUDA_214
    (tmp_path / buildinfo.RECORD_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        buildinfo.read_record(path)
    (tmp_path / buildinfo.RECORD_NAME).write_text('{"mode": "gpu"}')
    with pytest.raises(ValueError, match="is not a giva_ext build record"):
        buildinfo.read_record(path)


@pytest.mark.parametrize("record, torch_version, cuda, reason", [
    (CPU_213, "2.13.1+cpu", None, None),              # patch releases share the ABI
    (CPU_213, "2.13.0+cu130", "13.0", None),          # a cpu build runs under a CUDA torch
    (CUDA_214, "2.14.0", "13.2", None),               # same CUDA major
    (CPU_213, "2.14.1", None, "built for torch 2.13 (CPU), running torch 2.14 (CPU)"),
    (CUDA_214, "2.13.0+cpu", None, "built for torch 2.14 + CUDA 13, running torch 2.13 (CPU)"),
    (CUDA_214, "2.14.1+cpu", None, "built for torch 2.14 + CUDA 13, running torch 2.14 (CPU)"),
    (CUDA_214, "2.14.1+cu128", "12.8",
     "built for torch 2.14 + CUDA 13, running torch 2.14 + CUDA 12"),
])
def test_mismatch(record, torch_version, cuda, reason):
    assert buildinfo.mismatch(record, torch_version, cuda) == reason


def test_version_tags():
    assert buildinfo.version_tag("0.1.0", "cuda", "2.14.1+cu130", "13.0") == "0.1.0+cu130torch2.14"
    assert buildinfo.version_tag("0.1.0", "cuda", "2.14.1", "12.8") == "0.1.0+cu128torch2.14"
    assert buildinfo.version_tag("0.1.0", "cpu", "2.13.0+cpu") == "0.1.0+cputorch2.13"
    assert buildinfo.version_tag("0.1.0", "none") == "0.1.0"
    with pytest.raises(ValueError, match="build mode"):
        buildinfo.version_tag("0.1.0", "rocm", "2.13.0")


def test_setup_py_version_for_a_pure_python_build():
    env = {**os.environ, "GIVA_BUILD": "none"}
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=_root(), env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == buildinfo.version_tag(__version__, "none") == __version__


def _root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _built():
    if ops.BUILD_INFO is None:
        pytest.skip("giva_ext._C was not built by setup.py")


def test_matching_build_loads():
    _built()
    assert ops.HAS_NATIVE and ops.LOAD_ERROR is None
    assert buildinfo.mismatch(ops.BUILD_INFO, torch.__version__, torch.version.cuda) is None
    assert buildinfo.major_minor(ops.BUILD_INFO["torch"]) == buildinfo.major_minor(torch.__version__)


MISMATCH_SCRIPT = """
import warnings
import torch
torch.__version__ = "2.99.0"   # pretend another torch is running
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import giva_ext
    from giva_ext import ops
native = [w for w in caught if "native ops unavailable" in str(w.message)]
assert len(native) == 1 and native[0].category is RuntimeWarning, [str(w.message) for w in caught]
print(native[0].message)
assert not ops.HAS_NATIVE and not ops.supports(torch.zeros(2, 4))
assert "giva::linear_forward" not in torch._C._dispatch_get_all_op_names()  # _C never loaded
layer = giva_ext.GiVALinear(4, 3, r=2)
layer.set_bases(torch.randn(2, 4), torch.randn(3, 2))
x = torch.randn(5, 4, requires_grad=True)
layer(x).sum().backward()
assert x.grad.shape == (5, 4) and layer.lambda_o.grad is not None
"""


def test_mismatched_build_warns_once_and_falls_back():
    _built()
    out = subprocess.run([sys.executable, "-c", MISMATCH_SCRIPT], cwd=_root(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    built = buildinfo.describe(ops.BUILD_INFO["torch"], ops.BUILD_INFO["cuda"])
    assert (f"native ops unavailable (built for {built}, running torch 2.99 "
            f"{'+ CUDA ' + torch.version.cuda.split('.')[0] if torch.version.cuda else '(CPU)'}; "
            "rebuild giva_ext for this torch)") in out.stdout


def test_env_command(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    if ops.HAS_NATIVE:
        assert "native ops: loaded" in out
        assert "giva::linear_forward: CPU" in out
    else:
        assert f"native ops: not loaded ({ops.LOAD_ERROR})" in out
    if ops.BUILD_INFO is not None:
        assert f"build: mode {ops.BUILD_INFO['mode']}, built for torch {ops.BUILD_INFO['torch']}" in out
        if ops.BUILD_INFO["cuda"] is None:
            assert "CUDA none, TORCH_CUDA_ARCH_LIST none" in out  # not Python's None
    assert "None" not in out
    assert "transformers " in out and ", peft " in out
    if ops.HAS_NATIVE:
        assert "CPU layer path: " in out
        assert ("AVX-512 SIMD" in out.split("CPU layer path: ")[1]) == (
            torch.backends.cpu.get_cpu_capability() == "AVX512" and platform.machine() in ("x86_64", "AMD64"))
