"""Interruption: a save killed (SIGKILL) at random points of its write leaves the previous adapter
intact, and an init interrupted at any batch, by an exception or a kill, resumes from its cache to
bitwise the same bases as an uninterrupted run."""
import json
import os
import random
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext.serialization import CONFIG_NAME, WEIGHTS_NAME
from test_model import Net

TESTS = os.path.dirname(os.path.abspath(__file__))
fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def adapter_version(version: int) -> nn.Module:
    """Two adapters of one base model: version 0 and version 1 differ in every vector, and a wide
    head makes a save long enough (~1 MiB in 4 KiB writes) for kills to land inside it."""
    torch.manual_seed(0)
    model = Net()
    model.classifier = nn.Linear(16, 16384)
    g.apply_giva(model, g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    gen = torch.Generator().manual_seed(100 + version)
    with torch.no_grad():
        for layer in g.giva_layers(model).values():
            layer.lambda_s.normal_(generator=gen)
            layer.lambda_o.normal_(generator=gen)
        model.classifier.weight.normal_(generator=gen)
    return model


def plain_base() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    model.classifier = nn.Linear(16, 16384)
    return model


# Runs in a subprocess: for each "<version> <delay> <chunks>" line on stdin, forks a child that
# saves that adapter version into the folder. With chunks >= 0 the child SIGKILLs itself after
# writing that many 4 KiB chunks (a kill inside a write, for sure); else the worker SIGKILLs it
# after the delay (anywhere: serialising, writing, fsync, rename, between the two files, or after).
SAVE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    import torch
    torch.set_num_threads(1)  # nothing multi-threaded is running when the worker forks
    import giva_ext as g
    from test_interrupt import adapter_version
    folder = sys.argv[1]
    models = [adapter_version(0), adapter_version(1)]
    written, kill_after = 0, -1

    real_fdopen = os.fdopen
    class Chunked:  # the real file, written in 4 KiB system calls: many points to be killed at
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *exc): return self.f.__exit__(*exc)
        def write(self, data):
            global written
            for i in range(0, len(data), 4096):
                if written == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
                self.f.write(data[i:i + 4096]); self.f.flush()
                written += 1
        def flush(self): self.f.flush()
        def fileno(self): return self.f.fileno()
    os.fdopen = lambda fd, mode: Chunked(real_fdopen(fd, mode))

    start = time.perf_counter()
    g.save_adapter(models[0], folder + ".timing")
    print(json.dumps({"seconds": time.perf_counter() - start, "chunks": written}), flush=True)
    for line in sys.stdin:
        version, delay, chunks = line.split()
        pid = os.fork()
        if pid == 0:
            written, kill_after = 0, int(chunks)
            g.save_adapter(models[int(version)], folder)
            os._exit(0)
        if int(chunks) < 0:
            time.sleep(float(delay))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"finished": os.WIFEXITED(status)}), flush=True)
""")


def start_worker(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, *sys.path]))
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


@fork_only
def test_save_killed_at_random_points_leaves_an_intact_adapter(tmp_path):
    folder = tmp_path / "adapter"
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    versions = []  # (weights bytes, config text, outputs) of each version
    for v in (0, 1):
        model = adapter_version(v)
        g.save_adapter(model, tmp_path / f"v{v}")
        versions.append(((tmp_path / f"v{v}" / WEIGHTS_NAME).read_bytes(),
                         (tmp_path / f"v{v}" / CONFIG_NAME).read_text(), model(ids)))
    g.save_adapter(adapter_version(0), folder)
    current = 0
    worker = start_worker(SAVE_WORKER, str(folder))
    try:
        timing = json.loads(worker.stdout.readline())
        rng = random.Random(0)
        mid_write = switched = 0
        loaded = set()
        for i in range(30):
            # Even rounds: a kill inside a write (of either file); odd rounds: a kill at any time.
            chunks = rng.randrange(timing["chunks"]) if i % 2 == 0 else -1
            tmp_before = set(folder.glob(".*.tmp"))
            worker.stdin.write(f"{1 - current} {rng.uniform(0, 4 * timing['seconds']):.6f} {chunks}\n")
            worker.stdin.flush()
            finished = json.loads(worker.stdout.readline())["finished"]
            tmp_after = set(folder.glob(".*.tmp"))
            mid_write += bool(tmp_after - tmp_before)
            assert len(tmp_after) <= 1, "each save removes what the killed ones before it left"
            data = (folder / WEIGHTS_NAME).read_bytes()
            assert data in (versions[0][0], versions[1][0]), "the adapter file is neither version"
            assert (folder / CONFIG_NAME).read_text() in (versions[0][1], versions[1][1])
            now = 0 if data == versions[0][0] else 1
            assert not finished or now == 1 - current
            switched += now != current
            current = now
            state = (now, (folder / CONFIG_NAME).read_text())
            if state not in loaded:  # each pair of files once: the same bytes load the same way
                loaded.add(state)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # killed between the two files: the config lags
                    model = g.load_adapter(plain_base(), folder)
                assert torch.equal(model(ids), versions[current][2])
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
    # Every even round died inside a write; some rounds got as far as replacing the adapter.
    assert mid_write >= 15 and switched >= 3, (mid_write, switched)
    g.save_adapter(adapter_version(0), folder)
    assert not list(folder.glob(".*.tmp")), "a save removes the temporary files of killed saves"


# ---- init_bases resumed from its cache ---------------------------------------------------------------

def init_model(svd: str, precondition: str = "none") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 64))
    mode = "Vr" if svd == "dense" else "VrU2r"  # Vr also draws from the seeded generator after the SVD
    return g.apply_giva(model, g.GiVAConfig(r=3, target_modules=["0", "2"], grad_batches=4, init_mode=mode,
                                            precondition=precondition))


def init_batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 48, generator=gen), torch.randn(32, 64, generator=gen)) for _ in range(4)]


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def bases(model) -> list[torch.Tensor]:
    return [t.clone() for layer in g.giva_layers(model).values() for t in (layer.A, layer.B)]


def run_init(svd: str, passes: int, batches, cache=None, precondition="none") -> tuple[nn.Module, dict]:
    model = init_model(svd, precondition)
    spectra = g.init_bases(model, batches, mse, svd=svd, passes=passes, cache=cache, progress=False)
    return model, spectra


class Stop(Exception):
    pass


class StopsAt:
    """The batches, re-iterable, raising Stop at the n-th batch drawn over all passes."""

    def __init__(self, batches, n):
        self.batches, self.n, self.drawn = batches, n, 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            if self.drawn == self.n:
                raise Stop
            yield batch


@pytest.mark.parametrize("svd,passes,precondition", [("sketch", 1, "none"), ("sketch", 2, "none"),
                                                     ("dense", 1, "none"), ("sketch", 2, "rms"),
                                                     ("dense", 1, "rms")])
def test_init_interrupted_at_any_batch_resumes_to_the_same_bases(tmp_path, svd, passes, precondition):
    """The preconditioner's feature scales come from the first batch: a resumed init reads them
    from the cache (a stop after batch 1 must not take them from the next batch it sees)."""
    data = init_batches()
    want_model, want_spectra = run_init(svd, passes, data, precondition=precondition)
    for n in range(1, 4 * passes + 1):
        cache = tmp_path / f"{svd}{passes}{precondition}-{n}.safetensors"
        model = init_model(svd, precondition)
        untouched = bases(model)
        with pytest.raises(Stop):
            g.init_bases(model, StopsAt(data, n), mse, svd=svd, passes=passes, cache=cache, progress=False)
        assert all(torch.equal(a, b) for a, b in zip(bases(model), untouched))
        spectra = g.init_bases(model, data, mse, svd=svd, passes=passes, cache=cache, progress=False)
        assert all(torch.equal(a, b) for a, b in zip(bases(model), bases(want_model))), n
        assert all(torch.equal(spectra[k], want_spectra[k]) for k in want_spectra), n


# Runs in a subprocess: forks children that run init_bases with a cache, each killed (SIGKILL) at
# another point: by itself at its n-th batch or inside its first cache write (n-th 256-byte chunk),
# or by the worker after a random delay; then one more runs to the end. Prints the kills.
INIT_WORKER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)
    import giva_ext as g
    from test_interrupt import init_batches, init_model, mse
    cache, seed = sys.argv[1], int(sys.argv[2])
    data = init_batches()
    kill = {"batch": -1, "chunk": -1}
    drawn = written = 0

    def die_at(kind, count):
        if count == kill[kind]:
            os.kill(os.getpid(), signal.SIGKILL)

    class Batches:  # slowed down, so a delay can land anywhere
        def __iter__(self):
            global drawn
            for batch in data:
                drawn += 1
                die_at("batch", drawn)
                time.sleep(0.005)
                yield batch

    real_fdopen = os.fdopen
    class Chunked:
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *exc): return self.f.__exit__(*exc)
        def write(self, data):
            global written
            for i in range(0, len(data), 256):
                written += 1
                die_at("chunk", written)
                self.f.write(data[i:i + 256]); self.f.flush()
        def flush(self): self.f.flush()
        def fileno(self): return self.f.fileno()
    os.fdopen = lambda fd, mode: Chunked(real_fdopen(fd, mode))

    rng = random.Random(seed)
    # Any incomplete init draws the 4 batches of its pass and writes a cache of several KiB, so
    # each of these dies where it is told to.
    plan = [("batch", rng.randint(1, 4)) if i % 2 else ("chunk", rng.randint(1, 8)) for i in range(6)]
    plan += [("delay", rng.uniform(0, 0.1)) for _ in range(6)] + [("end", None)]
    kills = 0
    for kind, where in plan:
        pid = os.fork()
        if pid == 0:
            if kind in kill:
                kill[kind] = where
            g.init_bases(init_model("sketch"), Batches(), mse, passes=2, cache=cache, progress=False)
            os._exit(0)
        if kind == "delay":
            time.sleep(where)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) == (kind == "end") or kind == "delay", (kind, where, status)
        kills += os.WIFSIGNALED(status)
    print(json.dumps({"kills": kills}), flush=True)
""")


@fork_only
def test_init_killed_anywhere_resumes_to_the_same_bases(tmp_path):
    """Processes killed at many points (between batches, inside cache writes, at random times), then
    one that finishes: the cache then holds bitwise the result of one uninterrupted run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker: results are bitwise stable for a thread count
    try:
        want_model, want_spectra = run_init("sketch", 2, init_batches())
        cache = tmp_path / "init.safetensors"
        worker = start_worker(INIT_WORKER, str(cache), "0")
        kills = json.loads(worker.stdout.readline())["kills"]
        assert worker.wait(timeout=120) == 0
        model, spectra = run_init("sketch", 2, None, cache)  # a finished cache needs no batches
    finally:
        torch.set_num_threads(threads)
    assert kills >= 6, kills
    assert all(torch.equal(a, b) for a, b in zip(bases(model), bases(want_model)))
    assert all(torch.equal(spectra[k], want_spectra[k]) for k in want_spectra)
