"""init_bases under torch.distributed: two gloo processes on the CPU, each with half of the batches,
get the bases one process gets from all of them (sketches and dense gradients are sums)."""
import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import giva_ext as g

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
RUNS = {"sketch": dict(svd="sketch"), "sketch2": dict(svd="sketch", passes=2), "dense": dict(svd="dense")}
PRECONDITIONED = {"rms-sketch2": dict(svd="sketch", passes=2, precondition="rms"),
                  "rms-dense": dict(svd="dense", precondition="rms")}


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
        results.update({name: _init(mine, **kwargs) for name, kwargs in PRECONDITIONED.items()})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Both processes' results (spawned once for the tests below) and their folder."""
    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(folder / "rendezvous"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)], folder


def test_two_processes_give_the_bases_of_the_union(two_processes):
    ranks, tmp_path = two_processes
    assert (tmp_path / "cache.safetensors.rank0").exists() and (tmp_path / "cache.safetensors.rank1").exists()
    batches = _problem()
    for name, kwargs in [*RUNS.items(), ("cached", RUNS["sketch"])]:
        single = _init(batches, **kwargs)
        for got in (results[name] for results in ranks):
            torch.testing.assert_close(got["s"], single["s"], rtol=1e-4, atol=0)
            # same subspaces, up to the sign of each vector
            torch.testing.assert_close((got["A"] @ single["A"].T).abs(), torch.eye(4), atol=1e-4, rtol=0)
            torch.testing.assert_close((got["B"].T @ single["B"]).abs(), torch.eye(4), atol=1e-4, rtol=0)


def test_two_processes_precondition_with_the_first_batches_of_both(two_processes):
    """precondition="rms" scales by the feature RMS of the first batch, summed over processes: the
    bases of one process whose first batch is the two processes' first batches together."""
    ranks, _ = two_processes
    b = _problem()  # process 0 gets batches 0 and 2, process 1 gets 1 and 3
    joined = [(torch.cat([b[0][0], b[1][0]]), torch.cat([b[0][1], b[1][1]])), b[2], b[3]]
    for name, kwargs in PRECONDITIONED.items():
        single = _init(joined, **kwargs)
        for got in (results[name] for results in ranks):
            # 4 batches there, 3 here: the same sum, another mean
            torch.testing.assert_close(got["s"] * 4, single["s"] * 3, rtol=1e-4, atol=0)
            torch.testing.assert_close((got["A"] @ single["A"].T).abs(), torch.eye(4), atol=1e-4, rtol=0)
            torch.testing.assert_close((got["B"].T @ single["B"]).abs(), torch.eye(4), atol=1e-4, rtol=0)


def _edge_worker(rank, init_file, out_dir, case):
    import datetime

    # A mismatched collective would hang: the timeout turns that into a failure of the test.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mine = _problem()[:2] if rank == 0 else []  # process 1 has no batches at all
        loss = lambda m, b: (m(b[0]) * b[1]).sum()  # noqa: E731
        if case == "fails" and rank == 1:
            mine = _problem()[2:]
            loss = lambda m, b: 1 / 0  # noqa: E731 - fails before its first batch's statistics
        ran_out = pytest.warns(RuntimeWarning, match="ran out") if case == "empty" else nullcontext()
        try:
            with ran_out:  # 2 batches of the 4 asked for
                result = _init_with(mine, loss, precondition="rms", svd="dense")
        except Exception as exc:  # noqa: BLE001 - what each process saw is the result
            result = {"error": f"{type(exc).__name__}: {exc}"}
        torch.save(result, os.path.join(out_dir, f"{case}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _init_with(batches, loss, **kwargs):
    torch.manual_seed(0)
    model = g.apply_giva(nn.Sequential(nn.Linear(128, 96, bias=False)),
                         g.GiVAConfig(r=4, target_modules=["0"]))
    s = g.init_bases(model, batches, loss, num_batches=2, progress=False, **kwargs)
    return {"A": model[0].A.clone(), "B": model[0].B.clone(), "s": s["0"].clone()}


@pytest.mark.parametrize("case", ["empty", "fails"])
def test_preconditioned_init_with_a_process_without_a_first_batch(tmp_path, case):
    """A process with no batches still takes part in summing the first batch's statistics (the
    bases are those of the other's batches); one that fails before it stops both, with an error."""
    mp.spawn(_edge_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), case), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"{case}{r}.pt") for r in range(WORLD)]
    if case == "fails":
        assert got[1]["error"].startswith("ZeroDivisionError"), got[1]
        assert got[0]["error"] == "RuntimeError: init_bases failed in another process (see its error)", got[0]
        return
    single = _init_with(_problem()[:2], lambda m, b: (m(b[0]) * b[1]).sum(), precondition="rms", svd="dense")
    for result in got:
        assert "error" not in result, result
        torch.testing.assert_close((result["A"] @ single["A"].T).abs(), torch.eye(4), atol=1e-4, rtol=0)
        torch.testing.assert_close((result["B"].T @ single["B"]).abs(), torch.eye(4), atol=1e-4, rtol=0)


def _resume_worker(rank, init_file, out_dir):
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mine = _problem()[rank::WORLD]
        cache = os.path.join(out_dir, "cache.safetensors")
        calls = []

        def loss(m, b, fail_at=None):
            calls.append(1)
            if len(calls) == fail_at:
                raise ValueError("interrupted")
            return (m(b[0]) * b[1]).sum()

        with pytest.raises(ValueError, match="interrupted"):  # both stop after their first batch
            _init_with(mine, lambda m, b: loss(m, b, fail_at=2), precondition="rms", svd="dense", cache=cache)
        dist.barrier()
        if rank == 1:  # this process's cache is lost: it starts over, process 0 resumes
            os.remove(f"{cache}.rank1")
        dist.barrier()
        calls.clear()
        result = _init_with(mine, loss, precondition="rms", svd="dense", cache=cache)
        torch.save({**result, "calls": len(calls)}, os.path.join(out_dir, f"resumed{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_preconditioned_init_resumes_when_only_one_process_kept_its_cache(tmp_path):
    """The feature scales process 0 restores from its cache reach process 1, which lost its own:
    the bases are those of an uninterrupted run, and process 0 skips the batch it holds."""
    mp.spawn(_resume_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"resumed{r}.pt") for r in range(WORLD)]
    assert [result["calls"] for result in got] == [1, 2]
    b = _problem()
    joined = [(torch.cat([b[0][0], b[1][0]]), torch.cat([b[0][1], b[1][1]])), b[2], b[3]]
    single = _init(joined, **PRECONDITIONED["rms-dense"])
    for result in got:
        torch.testing.assert_close((result["A"] @ single["A"].T).abs(), torch.eye(4), atol=1e-4, rtol=0)
        torch.testing.assert_close((result["B"].T @ single["B"]).abs(), torch.eye(4), atol=1e-4, rtol=0)
