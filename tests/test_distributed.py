"""init_bases under torch.distributed: two gloo processes on the CPU, each with half of the batches,
get the bases one process gets from all of them (sketches and dense gradients are sums)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import giva_ext as g

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
RUNS = {"sketch": dict(svd="sketch"), "sketch2": dict(svd="sketch", passes=2), "dense": dict(svd="dense")}


def _problem():
    """A 96x128 layer whose gradient over 4 batches is a planted matrix with a decaying spectrum."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(96, 96, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(128, 96, generator=gen, dtype=torch.float64)).Q
    G = ((u * 0.8 ** torch.arange(96, dtype=torch.float64)) @ v.T).float()
    eye = torch.eye(128)
    return [(eye[i::4], G.T[i::4]) for i in range(4)]


def _init(batches, **kwargs):
    torch.manual_seed(0)
    model = g.apply_giva(nn.Sequential(nn.Linear(128, 96, bias=False)),
                         g.GiVAConfig(r=4, target_modules=["0"]))
    s = g.init_bases(model, batches, lambda m, b: (m(b[0]) * b[1]).sum(), num_batches=len(batches),
                     progress=False, **kwargs)
    return {"A": model[0].A.clone(), "B": model[0].B.clone(), "s": s["0"].clone()}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mine = _problem()[rank::WORLD]
        results = {name: _init(mine, **kwargs) for name, kwargs in RUNS.items()}
        results["cached"] = _init(mine, cache=os.path.join(out_dir, "cache.safetensors"))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_bases_of_the_union(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert (tmp_path / "cache.safetensors.rank0").exists() and (tmp_path / "cache.safetensors.rank1").exists()
    batches = _problem()
    for name, kwargs in [*RUNS.items(), ("cached", RUNS["sketch"])]:
        single = _init(batches, **kwargs)
        for got in (results[name] for results in ranks):
            torch.testing.assert_close(got["s"], single["s"], rtol=1e-4, atol=0)
            # same subspaces, up to the sign of each vector
            torch.testing.assert_close((got["A"] @ single["A"].T).abs(), torch.eye(4), atol=1e-4, rtol=0)
            torch.testing.assert_close((got["B"].T @ single["B"]).abs(), torch.eye(4), atol=1e-4, rtol=0)
