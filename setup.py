"""Builds the optional native library giva_ext._C; metadata lives in pyproject.toml.

GIVA_BUILD selects what is built:
  auto (default)  cuda when torch has CUDA and a CUDA toolkit is found, else cpu
  cpu             csrc/giva.cpp + csrc/cpu/*.cpp
  cuda            the cpu sources + csrc/cuda/*.cu
  none            no extension (the pure-PyTorch reference runs)
MAX_JOBS caps parallel compile jobs (ninja); TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX".

The built library gets its build record, giva_ext/_C.json (see giva_ext/buildinfo.py), and the
version its build as a local label: 0.1.0+cu130torch2.14, 0.1.0+cputorch2.13, or 0.1.0 for none.
"""
import glob
import importlib.util
import os
import shutil
import site
import sysconfig

from setuptools import setup
from setuptools.dist import Distribution

ROOT = os.path.dirname(os.path.abspath(__file__))
MODES = ("auto", "cpu", "cuda", "none")


def _load_file(name, path):
    """A module of giva_ext loaded by path: importing giva_ext itself needs a built package."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


buildinfo = _load_file("giva_buildinfo", "giva_ext/buildinfo.py")
BASE_VERSION = _load_file("giva_version", "giva_ext/version.py").__version__


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _nvidia_wheel_includes():
    """Headers shipped in torch's CUDA wheels (site-packages/nvidia/cu*/include)."""
    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return sorted({d for root in roots for d in glob.glob(os.path.join(root, "nvidia", "cu*", "include"))})


def _extensions():
    """(extensions, cmdclass, version) for GIVA_BUILD."""
    mode = os.environ.get("GIVA_BUILD", "auto").strip().lower()
    if mode not in MODES:
        raise SystemExit(f"GIVA_BUILD must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return [], {}, buildinfo.version_tag(BASE_VERSION, "none")

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
    record = buildinfo.make_record(mode, torch.__version__, torch.version.cuda,
                                   os.environ.get("TORCH_CUDA_ARCH_LIST"))
    version = buildinfo.version_tag(BASE_VERSION, mode, torch.__version__, torch.version.cuda)
    # BuildExtension compiles with ninja and honours MAX_JOBS.
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """Writes the build record next to the library it describes."""

        def finalize_options(self):
            super().finalize_options()
            # Always relink (ninja still skips up-to-date objects): a library skipped as up to date
            # may come from another torch, and the record must describe the library beside it.
            self.force = True

        def build_extension(self, ext):
            super().build_extension(ext)
            library = self.get_ext_fullpath(ext.name)
            buildinfo.write_record(os.path.join(os.path.dirname(library), buildinfo.RECORD_NAME),
                                   record)

        def copy_extensions_to_source(self):
            # In-place and editable builds copy the library into giva_ext/; the record goes with it.
            super().copy_extensions_to_source()
            built = os.path.join(self.build_lib, "giva_ext", buildinfo.RECORD_NAME)
            package_dir = self.get_finalized_command("build_py").get_package_dir("giva_ext")
            shutil.copyfile(built, os.path.join(package_dir, buildinfo.RECORD_NAME))

    return [ext], {"build_ext": BuildExt}, version


class TaggedDistribution(Distribution):
    """pyproject.toml reads the base version from giva_ext/version.py; this adds the build tag."""

    def parse_config_files(self, *args, **kwargs):
        super().parse_config_files(*args, **kwargs)
        self.metadata.version = VERSION


ext_modules, cmdclass, VERSION = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, distclass=TaggedDistribution)
