"""torch.distributed on two gloo processes on the CPU: init_bases with half of the batches each gets
the bases one process gets from all of them (sketches and dense gradients are sums); DDP training
equals one process on the global batches; the torchrun example runs."""
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

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
        # One warning for the whole job (the batches of all processes ran out), from process 0.
        ran_out = pytest.warns(RuntimeWarning, match="ran out") if case == "empty" and rank == 0 else nullcontext()
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


def _killed_worker(rank, init_file, out_dir, phase):
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        calls = []

        def loss(m, b):
            calls.append(1)
            if phase == "killed" and rank == 1 and len(calls) == 2:
                os._exit(9)  # killed after its first batch reached its cache: no cleanup, no error
            return (m(b[0]) * b[1]).sum()

        result = _init_with(_problem()[rank::WORLD], loss, cache=os.path.join(out_dir, "cache.safetensors"))
        torch.save({**result, "calls": len(calls)}, os.path.join(out_dir, f"{phase}{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_init_with_a_rank_killed_midway_resumes_to_the_same_bases(tmp_path):
    """Process 1 is killed (os._exit) after its first batch, so the job dies; restarted with the
    same cache path, both processes resume (process 0 runs no batch again, process 1 only its
    second) and get the bases of an uninterrupted run over all batches."""
    with pytest.raises(Exception):
        mp.spawn(_killed_worker, args=(str(tmp_path / "rendezvous1"), str(tmp_path), "killed"),
                 nprocs=WORLD, join=True)
    assert (tmp_path / "cache.safetensors.rank1").exists()
    mp.spawn(_killed_worker, args=(str(tmp_path / "rendezvous2"), str(tmp_path), "resumed"), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"resumed{r}.pt") for r in range(WORLD)]
    assert got[1]["calls"] == 1 and got[0]["calls"] <= 2
    single = _init(_problem())
    for result in got:
        torch.testing.assert_close(result["s"], single["s"], rtol=1e-4, atol=0)
        torch.testing.assert_close((result["A"] @ single["A"].T).abs(), torch.eye(4), atol=1e-4, rtol=0)
        torch.testing.assert_close((result["B"].T @ single["B"]).abs(), torch.eye(4), atol=1e-4, rtol=0)


# ---- training across processes: DDP, the example under torchrun -----------------------------------

DDP_STEPS = 5


def _pretrained():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Linear(10, 3))


def _classifier(init_mode="VrUr"):
    """Two GiVA targets and a trained head. The last target's gradient has rank <= 3 (it feeds a
    3-class head): enough for VrUr at r = 2, below the 2r = 4 directions VrU2r uses (a
    rank-deficiency warning, and arbitrary completing directions)."""
    return g.apply_giva(_pretrained(), g.GiVAConfig(r=2, target_modules=["0", "2"], init_mode=init_mode,
                                                    modules_to_save=["3"]))


def _global_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(2 + DDP_STEPS)]


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]).float(), batch[1])


def _train(model, batches):
    """AdamW on the vectors and head over ``batches``; ``model`` may be the DDP wrapper."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for batch in batches:
        optimizer.zero_grad()
        _ce(model, batch).backward()
        optimizer.step()


def _trained_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("A", "B", "lambda_s", "lambda_o")) or k.startswith("3.")}


def _one_process_on_the_global_batches():
    """The oracle of the multi-process runs: init and training in one process on whole batches."""
    single = _classifier()
    batches = _global_batches()
    g.init_bases(single, batches[:2], _ce, num_batches=2, progress=False)
    _train(single, batches[2:])
    return _trained_state(single)


def _ddp_worker(rank, init_file, out_dir):
    import datetime
    import warnings

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mine = [(x[rank::WORLD], y[rank::WORLD]) for x, y in _global_batches()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g.init_bases(_classifier("VrU2r"), mine[:2], _ce, num_batches=2, progress=False)
        model = _classifier()
        g.init_bases(model, mine[:2], _ce, num_batches=2, progress=False)
        ddp = nn.parallel.DistributedDataParallel(model)
        _train(ddp, mine[2:])
        folder = os.path.join(out_dir, "adapter")
        if rank == 0:
            g.save_adapter(ddp, folder)
        dist.barrier()
        loaded = g.load_adapter(_pretrained(), folder)
        torch.save({"trained": _trained_state(model), "loaded": _trained_state(loaded),
                    "warnings": [str(w.message) for w in caught if "informative directions" in str(w.message)]},
                   os.path.join(out_dir, f"ddp{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_training_equals_one_process_on_the_global_batch(tmp_path):
    """Two gloo processes, each on half of every global batch: init_bases (the bases of all the
    batches), DistributedDataParallel training, save on rank 0, load on every rank. The vectors and
    head equal one process trained on the whole global batches; each rank loads exactly what it
    trained; the rank-deficiency warning comes from rank 0 only."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    want = _one_process_on_the_global_batches()
    for rank, result in enumerate(got):
        trained = result["trained"]
        assert set(trained) == set(want)
        for key, value in want.items():
            torch.testing.assert_close(result["loaded"][key], trained[key], rtol=0, atol=0, msg=key)
            if key.endswith("A"):  # a singular pair (A_j, B_j) may come out with both signs flipped
                sign = torch.sign((trained[key] * value).sum(1, keepdim=True))
                torch.testing.assert_close(trained[key] * sign, value, rtol=0, atol=1e-5, msg=key)
                B = key[:-1] + "B"
                torch.testing.assert_close(trained[B] * sign.T, want[B], rtol=0, atol=1e-5, msg=B)
            elif not key.endswith("B"):  # the vectors and the head: a sign flip of a pair leaves them
                torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5, msg=key)
        assert len(result["warnings"]) == (1 if rank == 0 else 0), result["warnings"]


def _fsdp_worker(rank, init_file, out_dir, bf16):
    import datetime

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from giva_ext import functional
    from giva_ext.distributed import gathered

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mine = [(x[rank::WORLD], y[rank::WORLD]) for x, y in _global_batches()]
        model = _classifier()
        g.init_bases(model, mine[:2], _ce, num_batches=2, progress=False)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None)
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in (model[0], model[2], model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        refused = {}
        for action, call in (("init_bases", lambda: g.init_bases(model, mine[:2], _ce, num_batches=2, progress=False)),
                             ("load_adapter", lambda: g.load_adapter(model, os.path.join(out_dir, "none"))),
                             ("merge", lambda: g.merge(model))):
            try:
                call()
                refused[action] = None
            except ValueError as exc:
                refused[action] = str(exc)
        native = []
        original = functional.ops.linear

        def counted(x, *args):
            native.append(str(x.dtype))
            return original(x, *args)

        functional.ops.linear = counted
        try:
            _train(model, mine[2:])
        finally:
            functional.ops.linear = original
        trained = {k: gathered(v).detach().clone() for k, v in model.state_dict().items()
                   if k.endswith(("A", "B", "lambda_s", "lambda_o")) or k.startswith("3.")}
        folder = os.path.join(out_dir, f"fsdp-{bf16}")
        g.save_adapter(model, folder)  # every process: the shards are gathered, process 0 writes
        dist.barrier()
        loaded = _trained_state(g.load_adapter(_pretrained(), folder))
        torch.save({"trained": trained, "loaded": loaded, "refused": refused, "native": sorted(set(native))},
                   os.path.join(out_dir, f"fsdp-{bf16}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-mixed-precision"])
def test_fsdp2_training_saving_and_what_it_refuses(tmp_path, bf16):
    """FSDP2 (fully_shard on both targets and the root) on two gloo processes, after init_bases:
    training runs the native op (in bf16 under a bf16 MixedPrecisionPolicy) and gives the vectors
    and head of one process on the global batches (to fp32 tolerance; bf16 within 2e-2);
    save_adapter on every process gathers the shards and writes once, and every process loads
    exactly what it trained; init_bases, load_adapter and merge on the sharded model are refused
    with an error that says to call them before fully_shard."""
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), bf16), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"fsdp-{bf16}-{r}.pt") for r in range(WORLD)]
    want = _one_process_on_the_global_batches()
    for result in got:
        assert result["native"] == (["torch.bfloat16"] if bf16 else ["torch.float32"])
        assert all(message and "before fully_shard" in message for message in result["refused"].values()), \
            result["refused"]
        for key, value in want.items():
            torch.testing.assert_close(result["loaded"][key], result["trained"][key], rtol=0, atol=0, msg=key)
            if not key.endswith(("A", "B")):
                torch.testing.assert_close(result["trained"][key], value, rtol=1e-4 if not bf16 else 0,
                                           atol=1e-5 if not bf16 else 2e-2, msg=key)


def _trainer_worker(rank, port, out_dir):
    """Two Trainer runs on this process pair: 6 steps, then 3 more resumed from the first run's
    checkpoint-3 on a freshly built model; rank 0 keeps both runs' trained tensors."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import transformers

    from giva_ext.hf import GiVAInitCallback
    from test_hf_models import tiny
    from test_trainer import dataset

    def run(folder, resume=None):
        model, _ = tiny("bert")
        g.apply_giva(model, g.GiVAConfig(r=2, modules_to_save=["classifier"]))
        args = transformers.TrainingArguments(
            output_dir=folder, max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
            lr_scheduler_type="constant", weight_decay=0.0, save_strategy="steps", save_steps=3,
            report_to=[], use_cpu=True, disable_tqdm=True, seed=0, ddp_backend="gloo")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                       callbacks=[GiVAInitCallback(progress=False)])
        assert trainer.args.world_size == WORLD
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in model.state_dict().items()
                if ".adapters." in k or k.startswith("classifier.")}

    whole = run(os.path.join(out_dir, "a"))
    resumed = run(os.path.join(out_dir, "b"), resume=os.path.join(out_dir, "a", "checkpoint-3"))
    if rank == 0:
        torch.save({"whole": whole, "resumed": resumed}, os.path.join(out_dir, "trainer.pt"))


def test_two_process_trainer_run_resumed_from_an_adapter_only_checkpoint_is_identical(tmp_path):
    """The Hugging Face Trainer on two gloo processes (its own DDP, the init callback on each
    process's shard): a run resumed from checkpoint 3 of 6, whose model.safetensors holds only the
    adapter and head, ends bit for bit where the uninterrupted run does."""
    pytest.importorskip("transformers")
    from test_hf_models import tiny  # noqa: F401 - importable before spawning
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_trainer_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "trainer.pt")
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "a" / "checkpoint-3" / "model.safetensors")) == set(got["whole"])
    for key, value in got["whole"].items():
        assert torch.equal(got["resumed"][key], value), key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun example on Linux")
def test_trainer_example_runs_under_torchrun(tmp_path):
    """examples/train_with_trainer.py --tiny under torchrun with two CPU processes: the Trainer's own
    DDP, the init callback on each process's shard, one adapter written by process 0."""
    pytest.importorskip("transformers")
    pytest.importorskip("vaderSentiment")
    example = Path(__file__).resolve().parent.parent / "examples" / "train_with_trainer.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(example), "--tiny", "--train-size", "256", "--no-progress",
                           "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("on 2 process(es)") == 1, done.stdout
    assert (tmp_path / "giva_adapter" / "adapter_model.safetensors").is_file()
    checkpoints = list(tmp_path.glob("checkpoint-*"))
    assert checkpoints and all((c / "giva_adapter" / "adapter_model.safetensors").is_file() for c in checkpoints)
    from safetensors.torch import load_file
    saved = set(load_file(checkpoints[0] / "model.safetensors"))  # the adapter and head only
    assert saved and all(".adapters." in k or k.startswith("classifier.") for k in saved), sorted(saved)[:5]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun example on Linux")
def test_distributed_example_runs_under_torchrun(tmp_path):
    """examples/train_distributed.py --tiny under torchrun with two CPU processes: it trains, saves
    on rank 0 and every rank reloads identical outputs (the script exits non-zero otherwise)."""
    pytest.importorskip("transformers")
    pytest.importorskip("vaderSentiment")
    example = Path(__file__).resolve().parent.parent / "examples" / "train_distributed.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(example), "--tiny", "--steps", "10",
                           "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical outputs" in done.stdout, done.stdout
    assert (tmp_path / "giva_adapter" / "adapter_model.safetensors").is_file()
