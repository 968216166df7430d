"""A batch whose sequences use different adapters: the mixed-adapter op against the alternatives.

    python bench/mixed_adapters.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                   [--sequences 64] [--seq-len 32] [--adapters 16] [--r 8]
                                   [--dims 1024 4096] [--json out.json]

One GiVALinear (in = out = dim) holds ``--adapters`` adapters of rank r; the batch is ``--sequences``
sequences of ``--seq-len`` tokens, spread evenly over the adapters in shuffled order. Forward only,
under torch.inference_mode (serving). Cases, timed in the same run with repetitions interleaved:
  frozen nn.Linear     the bare base layer (the floor)
  single adapter       the whole batch on one adapter (what a server with one adapter pays)
  mixed op             mixed_adapters: base GEMM once, each adapter on its own rows
  loop over adapters   set_adapter + forward on each adapter's rows, scattered back
  merge per adapter    W + delta of each adapter, then a plain linear on its rows
The ratio to "single adapter" is the figure to read (target for the mixed op: <= 1.2).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

from _cases import add_script_options, interleaved_medians, script_setup
from giva_ext import GiVALinear, mixed_adapters, ops


def build_layer(dim: int, adapters: int, r: int, device, dtype) -> GiVALinear:
    base = nn.Linear(dim, dim, device=device, dtype=dtype)
    layer = GiVALinear.from_linear(base, r, adapter_name="a0")
    for i in range(1, adapters):
        layer.add_adapter(f"a{i}", r)
    with torch.no_grad():  # trained-looking vectors, so no path can skip an update as zero
        for adapter in layer.adapters.values():
            adapter.lambda_s.normal_()
            adapter.lambda_o.normal_()
    return layer.requires_grad_(False)


def row_adapters(sequences: int, adapters: int, seed: int = 0) -> list[str]:
    """The adapter of each sequence: every adapter equally often, in shuffled order."""
    order = torch.randperm(sequences, generator=torch.Generator().manual_seed(seed)).tolist()
    return [f"a{order[i] % adapters}" for i in range(sequences)]


def build_cases(layer: GiVALinear, row_names: list[str], x: torch.Tensor) -> dict:
    """name -> a call with no arguments running that case on x."""
    names = list(layer.adapters)
    rows = {n: torch.tensor([i for i, m in enumerate(row_names) if m == n], device=x.device) for n in names}

    def mixed():
        with mixed_adapters(layer, row_names):
            return layer(x)

    def loop():
        y = torch.empty(*x.shape[:-1], layer.out_features, device=x.device, dtype=x.dtype)
        for n in names:
            layer.set_adapter(n)
            y[rows[n]] = layer(x[rows[n]])
        layer.set_adapter(names[0])
        return y

    def merge_each():
        y = torch.empty(*x.shape[:-1], layer.out_features, device=x.device, dtype=x.dtype)
        for n in names:
            layer.set_adapter(n)
            y[rows[n]] = F.linear(x[rows[n]], layer.weight + layer.delta_weight(), layer.bias)
        layer.set_adapter(names[0])
        return y

    return {"frozen nn.Linear": lambda: layer.base(x), "single adapter": lambda: layer(x),
            "mixed op": mixed, "loop over adapters": loop, "merge per adapter": merge_each}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_script_options(parser)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--dims", nargs="+", type=int, default=[1024, 4096])
    args = parser.parse_args(argv)

    device, dtype, report = script_setup(args)
    row_names = row_adapters(args.sequences, args.adapters)
    report.update(native=ops.supports_mixed(torch.empty(0, device=device, dtype=dtype)),
                  sequences=args.sequences, seq_len=args.seq_len, adapters=args.adapters, r=args.r)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"native mixed op: {report['native']}; {args.sequences} sequences x {args.seq_len} tokens "
          f"over {args.adapters} adapters of rank {args.r}")
    with torch.inference_mode():
        for dim in args.dims:
            layer = build_layer(dim, args.adapters, args.r, device, dtype)
            x = torch.randn(args.sequences, args.seq_len, dim, device=device, dtype=dtype)
            medians = interleaved_medians(build_cases(layer, row_names, x), device, args.reps, args.warmup)
            single = medians["single adapter"]
            print(f"\n{dim}x{dim} (T = {args.sequences * args.seq_len})")
            print(f"  {'case':<20}{'ms':>10}{'vs single':>11}")
            for name, seconds in medians.items():
                print(f"  {name:<20}{seconds * 1e3:>10.2f}{seconds / single:>11.3f}")
                report["results"].append({"dim": dim, "case": name, "median_s": seconds,
                                          "vs_single": seconds / single})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
