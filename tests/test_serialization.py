"""save_adapter / load_adapter: round trips, fingerprints, atomicity."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import giva_ext as g
from giva_ext.serialization import CONFIG_NAME, WEIGHTS_NAME
from test_model import Net, randomize


def adapted(seed=0):
    torch.manual_seed(seed)
    model = g.apply_giva(Net(), g.GiVAConfig(r=3, modules_to_save=["classifier"], seed=seed))
    randomize(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    return model


def fresh_base(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_round_trip_onto_plain_model_is_bit_exact(tmp_path):
    model = adapted()
    ids = torch.randint(0, 20, (4, 6))
    y = model(ids)
    g.save_adapter(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / CONFIG_NAME).is_file()
    loaded = g.load_adapter(fresh_base(), tmp_path)
    assert torch.equal(loaded(ids), y)
    assert loaded.giva_config == model.giva_config
    assert g.trainable_parameters(loaded) == g.trainable_parameters(model)


def test_round_trip_onto_adapted_model(tmp_path):
    model = adapted()
    ids = torch.randint(0, 20, (4, 6))
    g.save_adapter(model, tmp_path)
    other = g.apply_giva(fresh_base(), g.GiVAConfig(r=3, modules_to_save=["classifier"], seed=5))
    g.load_adapter(other, tmp_path)
    assert torch.equal(other(ids), model(ids))


def test_files_hold_everything(tmp_path):
    model = adapted()
    g.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    layer = model.blocks[1].value
    for field in ("A", "B", "lambda_s", "lambda_o"):
        assert torch.equal(tensors[f"blocks.1.value.{field}"], getattr(layer, field))
    assert torch.equal(tensors["modules_to_save.classifier.weight"], model.classifier.weight)
    header = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert header["config"]["r"] == 3 and header["version"] == g.__version__
    names = [entry["name"] for entry in header["fingerprint"]]
    assert names == list(g.giva_layers(model))
    assert header["fingerprint"][0]["shape"] == [16, 16]


def test_loading_onto_another_base_names_the_layer(tmp_path):
    g.save_adapter(adapted(), tmp_path)
    other = fresh_base()
    with torch.no_grad():
        other.blocks[1].value.weight[0, 0] += 1e-3
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'blocks.1.value' has sha256"):
        g.load_adapter(other, tmp_path)
    assert not g.giva_layers(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_loading_with_other_rank_or_targets_is_refused(tmp_path):
    g.save_adapter(adapted(), tmp_path)
    other = g.apply_giva(fresh_base(), g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="rank 3 .* rank 2"):
        g.load_adapter(other, tmp_path)
    fewer = g.apply_giva(fresh_base(), g.GiVAConfig(r=3, target_modules=["query"]))
    with pytest.raises(ValueError, match="other layers"):
        g.load_adapter(fewer, tmp_path)


def test_merged_model_cannot_be_saved(tmp_path):
    model = adapted()
    g.merge(model)
    with pytest.raises(RuntimeError, match="merged"):
        g.save_adapter(model, tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_save_after_merge_and_unmerge_loads_onto_the_pretrained_base(tmp_path, dtype):
    """merge + unmerge leaves W a rounding away from the pretrained bytes (here some entries
    differ), yet the adapter saved then still names the pretrained base; a real change to W
    after the unmerge is still found."""
    model = adapted().to(dtype)
    pristine = fresh_base().to(dtype)
    g.merge(model)
    g.unmerge(model)
    weights = [(layer.base.weight, pristine.get_submodule(name).weight)
               for name, layer in g.giva_layers(model).items()]
    assert any(not torch.equal(w, p) for w, p in weights)  # the round trip did round
    g.save_adapter(model, tmp_path)
    ids = torch.randint(0, 20, (4, 6))
    loaded = g.load_adapter(pristine, tmp_path)
    with torch.no_grad():
        for name, layer in g.giva_layers(loaded).items():
            model.get_submodule(name).base.weight.copy_(layer.base.weight)  # outputs comparable
    assert torch.equal(loaded(ids), model(ids))

    with torch.no_grad():
        model.blocks[1].value.base.weight[0, 0] += 1  # a real change: the remembered digest is dropped
    g.save_adapter(model, tmp_path / "changed")
    with pytest.raises(ValueError, match="layer 'blocks.1.value' has sha256"):
        g.load_adapter(fresh_base().to(dtype), tmp_path / "changed")


def test_weight_digests_are_cached_until_the_weight_changes():
    import hashlib
    from giva_ext.layer import weight_digests

    def fresh(t):
        sha = lambda u: hashlib.sha256(u.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
        extra = ({f"sha256_{n}": sha(t.to(getattr(torch, n))) for n in ("bfloat16", "float16")}
                 if t.dtype == torch.float32 else {})
        return {"sha256": sha(t), **extra}

    w = torch.nn.Parameter(torch.randn(8, 5))
    assert weight_digests(w) == {"sha256": fresh(w)["sha256"]}
    assert weight_digests(w, cast=True) == fresh(w) and len(fresh(w)) == 3
    with torch.no_grad():
        w.mul_(2)  # in place: version counter
    assert weight_digests(w, cast=True) == fresh(w)
    w.data = torch.randn(8, 5)  # new storage
    assert weight_digests(w, cast=True) == fresh(w)
    with torch.inference_mode():
        t = torch.randn(3, 3, dtype=torch.bfloat16)  # no version counter: never cached
        assert weight_digests(t, cast=True) == fresh(t) and len(fresh(t)) == 1
        t.add_(1)
        assert weight_digests(t, cast=True) == fresh(t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adapter_of_a_float32_base_loads_onto_its_half_precision_copy(tmp_path, dtype):
    """Train in fp32, serve in bf16/fp16: the file's digests of the base cast to those dtypes
    identify the cast copy exactly; a half-precision copy of another base is still refused."""
    model = adapted()
    g.save_adapter(model, tmp_path)
    served = g.load_adapter(fresh_base().to(dtype), tmp_path)
    ids = torch.randint(0, 20, (4, 6))
    torch.testing.assert_close(served(ids).float(), model(ids), rtol=0.05, atol=0.05)
    for name, layer in g.giva_layers(served).items():  # float32 vectors (autocast_adapter_dtype)
        assert layer.lambda_o.dtype == torch.float32 and layer.A.dtype == dtype
        assert torch.equal(layer.lambda_o, model.get_submodule(name).lambda_o)
    other = fresh_base()
    with torch.no_grad():
        other.blocks[1].value.weight[0, 0] += 1e-2
    with pytest.raises(ValueError, match="layer 'blocks.1.value' has sha256"):
        g.load_adapter(other.to(dtype), tmp_path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        g.load_adapter(fresh_base(), tmp_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="not a giva_ext file"):
        g.load_adapter(fresh_base(), tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        g.load_adapter(fresh_base(), tmp_path)


def test_interrupted_save_keeps_previous_adapter(tmp_path):
    """A process killed in the middle of writing the new file leaves the old adapter loadable."""
    model = adapted()
    ids = torch.randint(0, 20, (4, 6))
    y = model(ids)
    g.save_adapter(model, tmp_path)
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path[:0] = {sys.path!r}
        import giva_ext as g, giva_ext.serialization as ser
        from test_model import Net, randomize
        model = g.apply_giva(Net(), g.GiVAConfig(r=3, modules_to_save=["classifier"]))
        randomize(model)
        real_fdopen = os.fdopen
        class Dying:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *a): return False
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush()
                os._exit(9)  # killed mid-write
        ser.os.fdopen = lambda fd, mode: Dying(real_fdopen(fd, mode))
        g.save_adapter(model, {str(tmp_path)!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed save should have left its temporary file behind"
    loaded = g.load_adapter(fresh_base(), tmp_path)
    assert torch.equal(loaded(ids), y)


def test_a_write_through_data_is_never_certified(tmp_path):
    """weight.data.copy_ changes neither the version counter nor the storage: the fingerprint must
    still be of the bytes as they are now, at save and at load."""
    other = fresh_base(seed=1).get_submodule("blocks.1.value").weight
    model = adapted()
    g.save_adapter(model, tmp_path / "first")  # hashes (and remembers) the pretrained bytes
    model.blocks[1].value.base.weight.data.copy_(other)
    g.save_adapter(model, tmp_path / "second")  # must record the changed bytes
    with pytest.raises(ValueError, match="layer 'blocks.1.value' has sha256"):
        g.load_adapter(fresh_base(), tmp_path / "second")

    target = g.load_adapter(fresh_base(), tmp_path / "first")  # hashes the target's bytes
    target.blocks[1].value.base.weight.data.copy_(other)
    with pytest.raises(ValueError, match="layer 'blocks.1.value' has sha256"):
        g.load_adapter(target, tmp_path / "first")


def test_a_save_killed_in_its_first_file_leaves_no_stale_temporary_of_the_second(tmp_path, monkeypatch):
    """A writer killed inside adapter_config.json's write leaves its temporary; the next save,
    killed inside adapter_model.safetensors' (its first file), must already have removed it: every
    stale temporary of the folder goes before the first write (the random-kill test in
    test_interrupt.py found two left behind, one per file)."""
    from giva_ext import serialization
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".{CONFIG_NAME}.{int(dead.stdout)}.abc123.tmp"
    stale.write_bytes(b"partial")

    def killed(path, data):
        raise KeyboardInterrupt  # stands for the kill inside the first write

    monkeypatch.setattr(serialization, "_atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        g.save_adapter(adapted(), tmp_path)
    assert not stale.exists()


def test_a_save_removes_only_the_temporary_files_of_dead_writers(tmp_path):
    """Temporary files are named .<file>.<pid>.<random>.tmp; a save removes those whose process is
    gone and keeps a live writer's and every other name."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    tmp_path.mkdir(exist_ok=True)
    left = tmp_path / f".{WEIGHTS_NAME}.{dead_pid}.abc123.tmp"
    live = tmp_path / f".{WEIGHTS_NAME}.{os.getpid()}.def456.tmp"
    foreign = [tmp_path / f".{WEIGHTS_NAME}.notapid.tmp", tmp_path / f".other.{dead_pid}.x.tmp"]
    for path in (left, live, *foreign):
        path.write_bytes(b"partial")
    g.save_adapter(adapted(), tmp_path)
    assert not left.exists()
    assert live.exists() and all(path.exists() for path in foreign)
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted(p.name for p in (live, *foreign))
