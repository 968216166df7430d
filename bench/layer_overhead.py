"""Forward+backward cost of an adapted linear layer relative to a frozen nn.Linear (the floor).

    python bench/layer_overhead.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                   [--shapes 2048x1024x1024 ...] [--ranks 8 64] [--json out.json]
                                   [--profile ["GiVA native" "PEFT VeRA" ...]]

Shapes are TxINxOUT (tokens x in_features x out_features).  Every case of one (shape, rank) is
timed in the same run, interleaved repetition by repetition, so machine noise hits them alike: the
ratio to the floor is the figure to read, not the absolute time.  Cases: the frozen nn.Linear
(x requires grad, the weight does not), GiVALinear on the native op, GiVALinear's math on the
pure-PyTorch reference, the unfused autograd composite, a plain-PyTorch LoRA, and PEFT LoRA / VeRA
of the same rank (dropout 0, the layer's dtype) when peft is installed; built as in the pytest
suite (bench/_cases.py).  "adapter ms" is a case's time minus the floor's: what the adapter adds.
"saved MiB" is what autograd keeps for backward beyond parameters and buffers.  On CUDA the times
are GPU times between events, with the host's issuing hidden behind a queued spin kernel (see
interleaved_medians in bench/_cases.py).

Below each table, "one pass over a T x in tensor" is what reading such a tensor costs right after
the frozen layer's GEMM (a sum over a tensor of x's size that the GEMM did not touch), as a
fraction of the floor: the adapter reads x once more in the forward (s = x A^T) and grad_y once
more in the backward (M = grad_y^T s), and rebuilds W_eff (a read and a write of W) when it merges,
so a few such passes bound how close to 1 an adapter on top of a black-box GEMM can get.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from _cases import (ReferenceGiVA, add_script_options, clear_grads, interleaved_medians, layer_peer,
                    native_supported, saved_bytes, script_setup)
from giva_ext import ops

try:
    import peft
except ImportError:
    peft = None


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        T, n_in, n_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be TxINxOUT, e.g. 2048x1024x1024, got {text!r}")
    return T, n_in, n_out


def build_cases(base: nn.Linear, r: int, device) -> tuple[dict, list]:
    """(name -> callable(x) -> y, all on the same frozen base layer; the modules they use)."""
    layer = layer_peer("giva-native", base, r)
    cases = {"nn.Linear (floor)": base}
    if native_supported(device, base.weight.dtype):
        cases["GiVA native"] = layer
    cases["GiVA reference"] = ReferenceGiVA(layer)
    def unfused(x):  # the vectors in x's dtype, as the unfused authors' code computes
        lambda_s, lambda_o = layer.lambda_s.to(x.dtype), layer.lambda_o.to(x.dtype)
        return base(x) + lambda_o * ((lambda_s * (x @ layer.A.t())) @ layer.B.t())

    cases["GiVA unfused"] = unfused
    cases["LoRA (plain PyTorch)"] = layer_peer("lora-torch", base, r)
    if peft is not None:
        cases["PEFT LoRA"] = layer_peer("peft-lora", base, r)
        cases["PEFT VeRA"] = layer_peer("peft-vera", base, r)
    return cases, [layer, *(fn for fn in cases.values() if isinstance(fn, nn.Module))]


def saved_mib(fn, x, grad_y, modules) -> float:
    """MiB of tensors autograd saves for backward, not counting parameters and buffers."""
    nbytes, y = saved_bytes(lambda: fn(x), modules)
    y.backward(grad_y)
    clear_grads(x, *modules)
    return nbytes / 2**20


def pass_cost(base: nn.Linear, x: torch.Tensor, device, reps: int, warmup: int) -> float:
    """Median seconds to read a tensor of x's size that the frozen layer's forward did not touch,
    timed right after that forward (the state an adapter's extra pass meets)."""
    probe = torch.randn_like(x, requires_grad=False)
    x0 = x.detach()
    with torch.no_grad():
        return interleaved_medians({"pass": probe.sum}, device, reps, warmup,
                                   before=lambda: base(x0))["pass"]


def kernel_profile(call, before, device, iters: int = 3, top: int = 8) -> list[dict]:
    """The ``top`` kernels (CUDA) or operators (CPU) by self time per call, from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            before()
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def self_us(event) -> float:
        if device.type == "cuda":
            return getattr(event, "self_device_time_total", None) or event.self_cuda_time_total
        return event.self_cpu_time_total

    events = sorted((e for e in prof.key_averages() if self_us(e) > 0), key=self_us, reverse=True)
    return [{"name": e.key, "us_per_call": self_us(e) / iters, "calls_per_call": e.count / iters}
            for e in events[:top]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_script_options(parser)
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[(2048, 1024, 1024), (1024, 4096, 4096)], help="TxINxOUT")
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--profile", nargs="*", metavar="CASE",
                        help="also list each named case's top kernels (CUDA) or operators (CPU) "
                             "by self time per call (torch.profiler); no names: the floor and GiVA native")
    args = parser.parse_args(argv)

    device, dtype, report = script_setup(args)
    report.update(native=ops.HAS_NATIVE, peft=None if peft is None else peft.__version__, passes=[])
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"native op: {ops.supports(torch.empty(0, device=device, dtype=dtype))}")
    for T, n_in, n_out in args.shapes:
        base = nn.Linear(n_in, n_out, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(T, n_in, device=device, dtype=dtype, requires_grad=True)
        grad_y = torch.randn(T, n_out, device=device, dtype=dtype)
        for r in args.ranks:
            cases, modules = build_cases(base, r, device)
            calls = {name: (lambda fn=fn: fn(x).backward(grad_y)) for name, fn in cases.items()}
            medians = interleaved_medians(calls, device, args.reps, args.warmup,
                                          before=lambda: clear_grads(x, *modules))
            floor = medians["nn.Linear (floor)"]
            print(f"\nT={T}, {n_in}x{n_out}, r={r}")
            print(f"  {'case':<20}{'ms':>10}{'ratio':>8}{'adapter ms':>12}{'saved MiB':>11}")
            for name, seconds in medians.items():
                mib = saved_mib(cases[name], x, grad_y, modules)
                print(f"  {name:<20}{seconds * 1e3:>10.3f}{seconds / floor:>8.3f}"
                      f"{(seconds - floor) * 1e3:>12.3f}{mib:>11.2f}")
                report["results"].append({"T": T, "in": n_in, "out": n_out, "r": r, "case": name,
                                          "median_s": seconds, "ratio": seconds / floor,
                                          "adapter_s": seconds - floor, "saved_mib": mib})
            if args.profile is not None:
                for name in args.profile or ["nn.Linear (floor)", "GiVA native"]:
                    if name not in calls:
                        continue
                    rows = kernel_profile(calls[name], lambda: clear_grads(x, *modules), device)
                    print(f"  profile of {name} (self time per call):")
                    for row in rows:
                        print(f"    {row['us_per_call']:>10.1f} us  x{row['calls_per_call']:<4g} {row['name'][:90]}")
                    report.setdefault("profiles", []).append(
                        {"T": T, "in": n_in, "out": n_out, "r": r, "case": name, "top": rows})
        pass_s = pass_cost(base, x, device, args.reps, args.warmup)
        floor = next(row["median_s"] for row in reversed(report["results"])
                     if row["case"] == "nn.Linear (floor)")
        print(f"  one pass over a T x in tensor after the GEMM: {pass_s * 1e3:.2f} ms "
              f"({pass_s / floor:.3f} of the floor)")
        report["passes"].append({"T": T, "in": n_in, "out": n_out, "pass_s": pass_s,
                                 "of_floor": pass_s / floor})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
