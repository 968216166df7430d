"""Builds the optional native library giva_ext._C; metadata lives in pyproject.toml.

GIVA_BUILD selects what is built:
  auto (default)  cuda when torch has CUDA and a CUDA toolkit is found, else cpu
  cpu             csrc/giva.cpp + csrc/cpu/*.cpp
  cuda            the cpu sources + csrc/cuda/*.cu
  none            no extension (the pure-PyTorch reference runs)
MAX_JOBS caps parallel compile jobs (ninja); TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX".
"""
import glob
import os
import site
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODES = ("auto", "cpu", "cuda", "none")


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _nvidia_wheel_includes():
    """Headers shipped in torch's CUDA wheels (site-packages/nvidia/cu*/include)."""
    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return sorted({d for root in roots for d in glob.glob(os.path.join(root, "nvidia", "cu*", "include"))})


def _extensions():
    mode = os.environ.get("GIVA_BUILD", "auto").strip().lower()
    if mode not in MODES:
        raise SystemExit(f"GIVA_BUILD must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME when imported; a wrapper nvcc on PATH can make its
    # guess wrong, so prefer the standard toolkit location when it is complete.
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    if mode == "auto":
        mode = "cuda" if torch.version.cuda and cpp_extension.CUDA_HOME else "cpu"

    sources = _sources("csrc/giva.cpp") + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]
    kwargs = dict(extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    if mode == "cuda":
        if not torch.version.cuda:
            raise SystemExit("GIVA_BUILD=cuda, but this torch was built without CUDA")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        # torch disables the half/bfloat16 operators by default; the kernels convert to fp32 to
        # accumulate and want them back.
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                      "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
                      "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags
        ext = cpp_extension.CUDAExtension("giva_ext._C", sources + _sources("csrc/cuda/*.cu"),
                                          include_dirs=_nvidia_wheel_includes(), **kwargs)
    else:
        ext = cpp_extension.CppExtension("giva_ext._C", sources, **kwargs)
    # BuildExtension compiles with ninja and honours MAX_JOBS.
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
