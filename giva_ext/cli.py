"""Command line: ``giva <command>`` or ``python -m giva_ext <command>``."""
from __future__ import annotations

import argparse

from . import demo
from .version import __version__


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
