"""Markdown tables and a plot from the JSON of the benchmark suite.

    pytest bench/ --benchmark-json results.json
    python bench/report.py results.json [--markdown results.md] [--png results.png]

Prints the markdown and writes it (default: next to the JSON, .md) with a PNG (.png) of the layer
forward+backward overhead vs rank and vs T. A ratio to the floor divides a median by the median of
the frozen floor timed in alternation with it in the same run (bench/_cases.py, timed); a ratio to
PEFT LoRA divides two such ratios; init times divide by the exact SVD's (or the dense init's). A JSON
from a --benchmark-disable run has no timings: the report says so, still shows memory, trainable
parameters and file sizes, and writes no plot.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

MIB = 2**20
SHARED = 0.2  # cores other processes used during the run above which the report warns
# Peer and method keys (bench/_cases.py): the floor, the LoRA ratios also divide by, GiVA's native op.
FLOOR, LORA, GIVA = "frozen", "peft-lora", "giva-native"


def load(path: Path) -> tuple[dict, list[dict]]:
    """(machine details, one row per benchmark: its extra_info + median seconds or None)."""
    data = json.loads(path.read_text())
    rows = []
    for bench in data["benchmarks"]:
        stats = bench.get("stats")
        rows.append({**bench["extra_info"], "median": stats["median"] if stats else None})
    details = dict(data["machine_info"].get("giva", {}), pytest_benchmark=data.get("version"),
                   datetime=data.get("datetime"))
    return details, rows


def table(headers: list[str], body: list[list], align: str | None = None) -> str:
    """A markdown table; ``align`` has one 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def ratio(a, b) -> str:
    return "–" if a is None or b is None else f"{a / b:.3f}"


def overhead(row: dict | None, floor_row: dict | None) -> float | None:
    """row's median ÷ the floor's: the floor timed in alternation with it (floor_median_s) when the
    JSON has it, else the floor's own benchmark; None without timings."""
    if row is None or row["median"] is None:
        return None
    if row.get("floor_median_s"):
        return row["median"] / row["floor_median_s"]
    if floor_row is not None and floor_row["median"]:
        return row["median"] / floor_row["median"]
    return None


def fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def ms(seconds) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.2f}"


def mib(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / MIB:.2f}"


def layer_key(row) -> tuple:
    return row["dtype"], row["n_in"], row["n_out"], row["T"], row["r"]


def ordered_peers(rows) -> dict[str, dict]:
    """peer -> one of its rows, floor first, then in the order the JSON lists them."""
    peers = {}
    for row in sorted(rows, key=lambda r: r["peer"] != FLOOR):
        peers.setdefault(row["peer"], row)
    return peers


def header(details: dict, timed: bool) -> str:
    gpu = f", GPU {details['gpu']}" if details.get("gpu") else ""
    cuda = f" (CUDA {details['cuda']})" if details.get("cuda") else ""
    lines = [
        "# GiVA benchmark report", "",
        f"- Machine: {details.get('cpu')}, {details.get('cpu_count')} logical CPUs{gpu}; device "
        f"{details.get('device')}, {details.get('threads')} torch threads in every case.",
        f"- Versions: torch {details.get('torch')}{cuda}, giva_ext {details.get('giva_ext')} (native ops "
        f"loaded: {details.get('native_ops')}), peft {details.get('peft')}, transformers "
        f"{details.get('transformers')}, pytest-benchmark {details.get('pytest_benchmark')}.",
        f"- Size `{details.get('size')}`, {details.get('datetime')}. Other processes kept "
        f"{_cores(details.get('other_cores'))} cores busy on average during the run (/proc/stat less "
        f"this process); load average (1, 5, 15 min) at the start "
        f"{_load(details.get('load_at_start'))}, at the end {_load(details.get('load_at_end'))}.",
    ]
    if timed and (details.get("other_cores") or 0.0) > SHARED:
        lines.append("- **Shared machine**: contention slows the adapters' many small operations more "
                     "than one large GEMM, so ratios come out high; pin `--bench-threads` to the cores "
                     "left free, or rerun on an idle machine.")
    if timed:
        lines.append("- Times are medians over rounds after warm-up calls. Ratios to the floor divide "
                     "a median by the median of the frozen floor timed in alternation with it (one "
                     "floor call before each round), so both see the same load; ratios to PEFT LoRA "
                     "divide two such ratios.")
    else:
        lines.append("- **Timings absent** (a `--benchmark-disable` run): memory, trainable "
                     "parameters and file sizes only.")
    return "\n".join(lines)


def _load(values) -> str:
    return "?" if not values else " / ".join(f"{v:.2f}" for v in values)


def _cores(value) -> str:
    return "?" if value is None else f"{value:.2f}"


def layer_tables(rows: list[dict]) -> list[str]:
    out = []
    for mode in ("forward+backward", "forward"):
        mode_rows = [r for r in rows if r.get("bench") == "layer" and r["mode"] == mode]
        if not mode_rows or all(r["median"] is None for r in mode_rows):
            continue
        peers = ordered_peers(mode_rows)
        found = {(layer_key(r), r["peer"]): r for r in mode_rows}
        others = [p for p in peers if p != FLOOR]
        body = []
        for key in sorted({layer_key(r) for r in mode_rows}):
            floor = found.get((key, FLOOR))
            over = {p: overhead(found.get((key, p)), floor) for p in others}
            giva_vs_lora = None if None in (over.get(GIVA), over.get(LORA)) else over[GIVA] / over[LORA]
            dtype, n_in, n_out, T, r = key
            body.append([dtype, f"{n_in}×{n_out}", T, r, ms(floor and floor["median"]),
                         *(fmt(over[p]) for p in others), fmt(giva_vs_lora)])
        what = "no grad" if mode == "forward" else "x requires grad, the weight does not"
        out.append(f"## Layer {mode} ({what}): time ÷ frozen nn.Linear\n\n"
                   + table(["dtype", "in×out", "T", "r", "floor ms", *(peers[p]["label"] for p in others),
                            "GiVA native ÷ PEFT LoRA"], body, "llrrr" + "r" * (len(others) + 1))
                   + "\n\nPeers: " + "; ".join(f"{peers[p]['label']}: {peers[p]['impl']}" for p in peers)
                   + ". PEFT peers with dropout 0 and the layer's dtype (`autocast_adapter_dtype=False`),"
                     " LoRA with alpha = r; GiVA with its default float32 vectors.")
    return out


def by_method(rows: list[dict], bench: str) -> dict[str, dict]:
    return {r["method"]: r for r in rows if r.get("bench") == bench}


def train_table(rows: list[dict]) -> list[str]:
    timed, memory = by_method(rows, "train"), by_method(rows, "memory-train")
    methods = list(timed) or list(memory)
    if not methods:
        return []
    any_row = (timed or memory)[methods[0]]
    floor = timed.get(FLOOR)
    lora = overhead(timed.get(LORA), floor)
    body = []
    for m in methods:
        t, mem = timed.get(m), memory.get(m, {})
        row = t or mem
        over = overhead(t, floor)
        body.append([row["label"], f"{row['trainable']:,}", ms(t and t["median"]), fmt(over),
                     fmt(None if None in (over, lora) else over / lora), mib(mem.get("saved_bytes")),
                     mib(mem.get("peak_bytes"))])
    n, length = any_row["batch"]
    return [f"## Training step, all-MiniLM-L6-v2 ({n} × {length} tokens, {any_row['dtype']}, AdamW)\n\n"
            + table(["method", "trainable params", "ms / step", "÷ floor", "÷ PEFT LoRA",
                     "saved for backward MiB", "peak MiB"], body)
            + "\n\nThe floor is the frozen model with the full backward pass (input gradients only); "
              "every method adapts the same 36 layers and trains nothing else."]


def mixed_table(rows: list[dict]) -> list[str]:
    found = by_method(rows, "mixed")
    if not found:
        return []
    first = next(iter(found.values()))
    body = [[row["label"], ms(row["median"]), ms(row.get("floor_median_s")), fmt(overhead(row, None))]
            for row in found.values()]
    return [f"## Mixed-adapter batch ({first['sequences']} sequences × {first['seq_len']} tokens over "
            f"{first['adapters']} adapters of rank {first['r']}, {first['n_in']}×{first['n_out']}, "
            f"{first['dtype']}, forward)\n\n"
            + table(["method", "ms", "single adapter ms", "÷ single adapter"], body)
            + "\n\nEach method is timed in alternation with the whole batch on one adapter; the "
              "mixed op's target is at most 1.2× that."]


def init_tables(rows: list[dict]) -> list[str]:
    out = []
    layer = [r for r in rows if r.get("bench") == "init-layer"]
    if layer:
        exact = {r["n"]: r["median"] for r in layer if r["method"] == "dense+exact"}
        body = [[f"{r['n']}×{r['n']}", r["method"], ms(r["median"]), ratio(r["median"], exact.get(r["n"])),
                 mib(r["held_bytes"]), f"{r['cos_right']:.4f}", f"{r['cos_left']:.4f}"] for r in layer]
        first = layer[0]
        out.append(f"## Init of one layer: {first['batches']} gradient batches of {first['tokens']} tokens "
                   f"→ bases, r={first['r']} (VrU2r)\n\n"
                   + table(["layer", "method", "ms", "÷ exact SVD", "held MiB", "cos right (0..r)",
                            "cos left (r..2r)"], body, "llrrrrr")
                   + "\n\nheld: what the method keeps per layer (sketch vs dense gradient); cos: mean "
                     "cosine of the principal angles to the exact singular vectors VrU2r uses.")
    model = by_method(rows, "init-model")
    if model and any(r["median"] is not None for r in model.values()):
        dense = model.get("dense", {}).get("median")
        first = next(iter(model.values()))
        n, length = first["batch"]
        out.append(f"## init_bases on all-MiniLM-L6-v2 ({first['batches']} batches of {n} × {length} "
                   f"tokens, 36 layers, r={first['r']})\n\n"
                   + table(["svd", "ms", "÷ dense"], [[m, ms(r["median"]), ratio(r["median"], dense)]
                                                      for m, r in model.items()]))
    return out


def layer_memory_table(rows: list[dict]) -> list[str]:
    mem = [r for r in rows if r.get("bench") == "memory-layer"]
    if not mem:
        return []
    peers = ordered_peers(mem)
    cells = {(layer_key(r), r["peer"]): f"{mib(r['saved_bytes'])} / {mib(r['peak_bytes'])}" for r in mem}
    body = []
    for key in sorted({layer_key(r) for r in mem}):
        dtype, n_in, n_out, T, r = key
        body.append([dtype, f"{n_in}×{n_out}", T, r, *(cells.get((key, p), "–") for p in peers)])
    return ["## Memory of one layer step: saved for backward / peak of forward+backward, MiB\n\n"
            + table(["dtype", "in×out", "T", "r", *(peers[p]["label"] for p in peers)], body,
                    "llrr" + "r" * len(peers))
            + f"\n\nSaved: tensors autograd keeps for backward (saved_tensors_hooks), parameters and "
              f"buffers not counted. Peak: {mem[0]['peak_method']}."]


def file_table(rows: list[dict]) -> list[str]:
    files = by_method(rows, "file")
    if not files:
        return []
    lora = files.get(LORA, {}).get("weights_bytes")
    body = [[r["label"], f"{r['trainable']:,}", f"{r['weights_bytes']:,}", f"{r['total_bytes']:,}",
             ratio(r["weights_bytes"], lora)] for r in files.values()]
    return ["## Adapter files, all-MiniLM-L6-v2 (36 layers, fp32)\n\n"
            + table(["adapter", "trainable params", "safetensors bytes", "folder bytes", "÷ PEFT LoRA"],
                    body)
            + "\n\nGiVA: `giva_ext.save_adapter` (stores the frozen bases A, B with the vectors: the "
              "bases are task-specific); LoRA and VeRA: PEFT `save_pretrained` (VeRA with its shared "
              "projections)."]


def plot(rows: list[dict], details: dict, path: Path) -> str | None:
    """Layer forward+backward time ÷ floor vs rank and vs T; why not, when it cannot."""
    timed = [r for r in rows if r.get("bench") == "layer" and r["mode"] == "forward+backward"
             and r["median"] is not None]
    if not timed:
        return "no layer forward+backward timings in this JSON"
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = {layer_key(r): r for r in timed if r["peer"] == FLOOR}
    peers = [p for p in ordered_peers(timed) if p != FLOOR]
    labels = {r["peer"]: r["label"] for r in timed}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # Each panel takes the slice of the grid with the most points along its axis.
    for ax, axis in zip(axes, ("r", "T"), strict=True):
        fixed = [k for k in ("dtype", "n_in", "n_out", "T", "r") if k != axis]
        slices = defaultdict(set)
        for r in timed:
            slices[tuple(r[k] for k in fixed)].add(r[axis])
        chosen = max(slices, key=lambda s: len(slices[s]))
        where = dict(zip(fixed, chosen, strict=True))
        for peer in peers:
            points = sorted((r[axis], overhead(r, floor.get(layer_key(r)))) for r in timed
                            if r["peer"] == peer and all(r[k] == where[k] for k in fixed))
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=labels[peer])
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(slices[chosen]), [str(v) for v in sorted(slices[chosen])])
        ax.set_xlabel("rank r" if axis == "r" else "tokens T")
        ax.set_ylabel("time ÷ frozen nn.Linear")
        rest = ", ".join(f"{k}={where[k]}" for k in ("T", "r") if k != axis)
        ax.set_title(f"{where['n_in']}×{where['n_out']}, {rest}, {where['dtype']}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Layer forward+backward overhead: {details.get('cpu')}, {details.get('device')}, "
                 f"{details.get('threads')} threads, torch {details.get('torch')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def render(details: dict, rows: list[dict]) -> str:
    timed = any(r["median"] is not None for r in rows)
    sections = [header(details, timed), *layer_tables(rows), *train_table(rows), *mixed_table(rows),
                *init_tables(rows), *layer_memory_table(rows), *file_table(rows)]
    return "\n\n".join(sections) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="from pytest bench/ --benchmark-json PATH")
    parser.add_argument("--markdown", type=Path, help="default: the JSON's path with .md")
    parser.add_argument("--png", type=Path, help="default: the JSON's path with .png")
    args = parser.parse_args(argv)
    details, rows = load(args.json)
    text = render(details, rows)
    markdown = args.markdown or args.json.with_suffix(".md")
    png = args.png or args.json.with_suffix(".png")
    why_not = plot(rows, details, png)
    if why_not is None:
        text += f"\n![layer overhead vs rank and vs T]({os.path.relpath(png, markdown.parent)})\n"
    else:
        text += f"\nNo plot: {why_not}.\n"
    markdown.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
