"""Command line: ``giva <command>`` or ``python -m giva_ext <command>``."""
from __future__ import annotations

import argparse
import importlib.metadata
import platform

import torch

from . import demo, ops
from .version import __version__

# The dispatch keys whose kernels `giva env` lists for each op.
_DEVICE_KEYS = ("CPU", "CUDA")


def env(args: argparse.Namespace) -> int:
    """Print what runs here: versions, how _C was built, whether it loaded, the kernels per op."""
    cuda = torch.version.cuda
    try:
        installed = f"installed as {importlib.metadata.version('giva_ext')}"
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    print(f"giva_ext {__version__} ({installed})")
    print(f"python {platform.python_version()}")
    print(f"torch {torch.__version__} (CUDA {cuda})" if cuda else f"torch {torch.__version__} (CPU)")
    print(f"transformers {_version_of('transformers')}, peft {_version_of('peft')} (optional: the [hf] extra)")
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"GPUs: {', '.join(names) if names else 'none visible'}")
    info = ops.BUILD_INFO
    if info is None:
        print("build: no build record (the library is not built, or was not built by setup.py)")
    else:
        print(f"build: mode {info['mode']}, built for torch {info['torch']}, CUDA {info['cuda'] or 'none'}, "
              f"TORCH_CUDA_ARCH_LIST {info['arch_list'] or 'none'}")
    print("native ops: loaded" if ops.HAS_NATIVE else f"native ops: not loaded ({ops.LOAD_ERROR})")
    if ops.HAS_NATIVE:
        names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("giva::"))
        for name in names:
            keys = [k for k in _DEVICE_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
            print(f"  {name}: {', '.join(keys) if keys else 'no device kernels'}")
        print(f"CPU layer path: {_cpu_path()}")
    return 0


def _version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_path() -> str:
    """Which CPU kernels the fused layer's thin products use, and why (csrc/cpu/linear.cpp)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() not in ("x86_64", "AMD64") or capability != "AVX512":
        return (f"ATen GEMMs (this CPU's capability is {capability}; the blocked SIMD kernels need "
                "AVX-512, elsewhere they run far below BLAS)")
    return ("AVX-512 SIMD kernels for float32 layers whose basis panel r x max(in, out) is at most "
            "384 KiB (r = 8 up to 12288 wide); ATen GEMMs for bfloat16, float64 and wider panels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="giva", description="GiVA adapters for PyTorch.")
    parser.add_argument("--version", action="version", version=f"giva_ext {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    # One subparser per command; each sets ``func``, which takes the parsed args and returns an exit code.
    p = commands.add_parser(
        "demo", help="fine-tune all-MiniLM-L6-v2 on VADER sentiment: GiVA vs LoRA vs controls",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)

    p = commands.add_parser("env", help="versions, how the native ops were built, where they run",
                            description=env.__doc__)
    p.set_defaults(func=env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
