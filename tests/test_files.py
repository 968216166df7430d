"""Damaged, foreign and mismatched files: adapters and init caches truncated at many offsets,
bit-flipped, with a wrong header schema, from another format, holding NaN, for another model.
Every case must be a ValueError naming the file, and the model must be exactly as before."""
import json
import random
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

import giva_ext as g
from giva_ext import serialization as ser
from giva_ext.serialization import CONFIG_NAME, METADATA_KEY, WEIGHTS_NAME
from test_model import Net
from test_serialization import adapted

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def fresh_base():
    torch.manual_seed(0)
    return Net()


def targets(plain: bool):
    """A model to load into: the plain base, or the base already adapted (other bases and vectors)."""
    return fresh_base() if plain else g.apply_giva(
        fresh_base(), g.GiVAConfig(r=3, modules_to_save=["classifier"], seed=9))


def snapshot(model: nn.Module) -> dict:
    """Everything load_adapter could change: the module tree, tensors, flags and attributes."""
    return {"modules": [(n, id(m)) for n, m in model.named_modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "attrs": {k: (v, dict(v) if isinstance(v, dict) else None)
                      for k, v in vars(model).items() if not k.startswith("_")}}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now["modules"] == before["modules"]
    assert now["state"].keys() == before["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in before["state"].items())
    assert now["flags"] == before["flags"]
    assert now["attrs"].keys() == before["attrs"].keys()
    for key, (value, contents) in before["attrs"].items():
        assert now["attrs"][key][0] is value and now["attrs"][key][1] == contents, key


def refused(folder, model=None, match=None, file=WEIGHTS_NAME):
    """Load must raise a ValueError naming the file and leave the model untouched."""
    model = model if model is not None else fresh_base()
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        g.load_adapter(model, folder)
    message = str(info.value)
    assert str(folder / file) in message, message
    if match is not None:
        assert match in message, message
    assert_unchanged(model, before)
    return message


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved adapter: (folder, file bytes, config text, outputs of the model it came from)."""
    folder = tmp_path_factory.mktemp("adapter")
    model = adapted()
    g.save_adapter(model, folder)
    ids = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    return folder, (folder / WEIGHTS_NAME).read_bytes(), (folder / CONFIG_NAME).read_text(), ids, model(ids)


def copy_of(saved, tmp_path, data=None, config=None):
    folder, original, config_text, *_ = saved
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / WEIGHTS_NAME).write_bytes(original if data is None else data)
    (tmp_path / CONFIG_NAME).write_text(config_text if config is None else config)
    return tmp_path


def metadata_text(data: bytes) -> str:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size])["__metadata__"][METADATA_KEY]


def header_of(data: bytes) -> tuple[dict, dict]:
    """(the giva header without its checksum record, the tensors) of adapter bytes."""
    header = json.loads(metadata_text(data))
    del header["sha256"]
    return header, load_bytes(data)


def repacked(data: bytes, header=None, tensors=None, checksums=True) -> bytes:
    """The adapter rewritten with another header or tensors and fresh (valid) checksums: what another
    writer, another version or a hand edit would produce."""
    old_header, old_tensors = header_of(data)
    header = old_header if header is None else header
    tensors = old_tensors if tensors is None else tensors
    if checksums and isinstance(header, dict):  # a header that is no JSON object has no place for them
        return ser.pack(tensors, METADATA_KEY, header)[0]
    return save_bytes(tensors, metadata={METADATA_KEY: json.dumps(header, indent=2)})


# ---- damaged bytes ------------------------------------------------------------------------------

@pytest.mark.parametrize("plain", [True, False])
def test_truncated_at_any_offset_is_refused(saved, tmp_path, plain):
    data = saved[1]
    size = int.from_bytes(data[:8], "little")
    # Every offset in the length prefix and around the header's end, and 60 more spread over it all.
    offsets = set(range(0, 16)) | set(range(size, size + 24)) | set(range(0, len(data), len(data) // 60))
    model = targets(plain)
    for n in sorted(offsets):
        refused(copy_of(saved, tmp_path, data[:n]), model)


@pytest.mark.parametrize("plain", [True, False])
def test_bit_flips_anywhere_are_refused(saved, tmp_path, plain):
    """Single-bit flips anywhere (length prefix, safetensors header, giva header, checksum record,
    tensor data): the checksums catch what the safetensors layout check does not."""
    data = saved[1]
    size = int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    header_bits = rng.sample(range(8 * (8 + size)), 200 if plain else 60)
    data_bits = rng.sample(range(8 * (8 + size), 8 * len(data)), 60 if plain else 20)
    model = targets(plain)
    for bit in header_bits + data_bits:
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        refused(copy_of(saved, tmp_path, bytes(damaged)), model)


def test_damage_is_named(saved, tmp_path):
    """A value changed with the checksum record kept: the message names what no longer matches."""
    data, text = saved[1], metadata_text(saved[1])
    _, tensors = header_of(data)
    tensors["blocks.0.query.lambda_o"][3] += 1.0
    forged = save_bytes(tensors, metadata={METADATA_KEY: text})
    refused(copy_of(saved, tmp_path, forged), match="tensor 'blocks.0.query.lambda_o' is damaged")
    forged = save_bytes(header_of(data)[1], metadata={METADATA_KEY: text.replace('"r": 3', '"r": 2')})
    refused(copy_of(saved, tmp_path, forged), match="its header is damaged")


def test_foreign_and_garbage_files(saved, tmp_path):
    refused(copy_of(saved, tmp_path, save_bytes({"x": torch.zeros(2)})), match="not a giva_ext file")
    refused(copy_of(saved, tmp_path, b""), match="not a readable safetensors file")
    refused(copy_of(saved, tmp_path, b"\xff" * 64), match="not a readable safetensors file")
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        g.load_adapter(fresh_base(), tmp_path)


# ---- headers from another version or writer -------------------------------------------------------

def test_other_format_or_library_is_refused(saved, tmp_path):
    header, _ = header_of(saved[1])
    future = {**header, "format": 3, "version": "9.0.0"}
    message = refused(copy_of(saved, tmp_path, repacked(saved[1], future)), match="adapter format 3")
    assert "9.0.0" in message and "reads formats [1, 2]" in message
    refused(copy_of(saved, tmp_path, repacked(saved[1], {**header, "library": "peft"})),
            match="library 'peft'")
    # Format 2 without its checksum record: damaged (the record cannot be dropped silently).
    refused(copy_of(saved, tmp_path, repacked(saved[1], checksums=False)), match="checksum record is missing")


def test_format_1_file_without_checksums_still_loads(saved, tmp_path):
    """Files written before the checksum record (format 1) load, checked in every other way."""
    header, _ = header_of(saved[1])
    folder = copy_of(saved, tmp_path, repacked(saved[1], {**header, "format": 1}, checksums=False),
                     config=json.dumps({**header, "format": 1}))
    ids, want = saved[3], saved[4]
    assert torch.equal(g.load_adapter(fresh_base(), folder)(ids), want)


WRONG_HEADERS = [
    ("not a dict", lambda h: [h]),
    ("config missing", lambda h: {k: v for k, v in h.items() if k != "config"}),
    ("config not a dict", lambda h: {**h, "config": "r=3"}),
    ("unknown config field", lambda h: {**h, "config": {**h["config"], "alpha": 16}}),
    ("rank as a string", lambda h: {**h, "config": {**h["config"], "r": "3"}}),
    ("rank 0", lambda h: {**h, "config": {**h["config"], "r": 0}}),
    ("other rank", lambda h: {**h, "config": {**h["config"], "r": 2}}),
    ("modules_to_save an int", lambda h: {**h, "config": {**h["config"], "modules_to_save": 7}}),
    ("head not in the model", lambda h: {**h, "config": {**h["config"], "modules_to_save": ["pooler"]}}),
    ("targets match nothing", lambda h: {**h, "config": {**h["config"], "target_modules": ["nope"]}}),
    ("other fused chunks", lambda h: {**h, "config": {**h["config"], "fused_chunks": {"query": 3}}}),
    ("fingerprint not a list", lambda h: {**h, "fingerprint": {"blocks.0.query": "x"}}),
    ("fingerprint entry without sha256",
     lambda h: {**h, "fingerprint": [{k: v for k, v in e.items() if k != "sha256"}
                                     for e in h["fingerprint"]]}),
    ("fingerprint shape a string",
     lambda h: {**h, "fingerprint": [{**e, "shape": "16x16"} for e in h["fingerprint"]]}),
    ("fingerprint of other layers", lambda h: {**h, "fingerprint": h["fingerprint"][1:]}),
    ("fingerprint of another weight",
     lambda h: {**h, "fingerprint": [{**e, "sha256": "0" * 64} for e in h["fingerprint"]]}),
]


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("name,change", WRONG_HEADERS, ids=[n for n, _ in WRONG_HEADERS])
def test_wrong_header_schema_is_refused(saved, tmp_path, plain, name, change):
    header, _ = header_of(saved[1])
    refused(copy_of(saved, tmp_path, repacked(saved[1], change(json.loads(json.dumps(header))))),
            targets(plain))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) |
                    st.text(max_size=12) | st.sampled_from(["all-linear", "query", "VrUr", "classifier"]),
                    lambda inner: (st.lists(inner, max_size=3) |
                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=6)


@SETTINGS
@given(path=st.sampled_from([("library",), ("version",), ("format",), ("config",), ("fingerprint",),
                             ("config", "r"), ("config", "target_modules"), ("config", "init_mode"),
                             ("config", "grad_batches"), ("config", "dropout"), ("config", "modules_to_save"),
                             ("config", "seed"), ("config", "fused_chunks")]),
       value=JSON, plain=st.booleans())
def test_any_header_value_loads_exactly_or_is_refused(saved, tmp_path, path, value, plain):
    """A header field replaced by any JSON value: the adapter loads exactly (the field did not
    matter, e.g. a seed) or a ValueError names the file; never another exception, never half-loaded."""
    header, _ = header_of(saved[1])
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    folder = copy_of(saved, tmp_path, repacked(saved[1], header))
    model = targets(plain)
    before = snapshot(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # adapter_config.json no longer matches: a warning
            g.load_adapter(model, folder)
    except ValueError as exc:
        assert str(folder / WEIGHTS_NAME) in str(exc)
        assert_unchanged(model, before)
        return
    assert torch.equal(model(saved[3]), saved[4])


def test_nan_in_a_saved_vector_is_refused(saved, tmp_path):
    _, tensors = header_of(saved[1])
    tensors["blocks.1.value.lambda_s"][0] = float("nan")
    refused(copy_of(saved, tmp_path, repacked(saved[1], tensors=tensors)),
            match="tensor 'blocks.1.value.lambda_s' holds NaN or Inf")
    _, tensors = header_of(saved[1])
    tensors["modules_to_save.classifier.bias"][1] = float("inf")
    refused(copy_of(saved, tmp_path, repacked(saved[1], tensors=tensors)), targets(False),
            match="'modules_to_save.classifier.bias' holds NaN or Inf")


def test_save_refuses_non_finite_values_and_keeps_the_previous_adapter(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    model = adapted()
    with torch.no_grad():
        model.blocks[0].out.lambda_o[2] = float("inf")
    with pytest.raises(ValueError, match="'blocks.0.out.lambda_o' holds NaN or Inf; nothing was written"):
        g.save_adapter(model, folder)
    assert (folder / WEIGHTS_NAME).read_bytes() == saved[1]
    assert (folder / CONFIG_NAME).read_text() == saved[2]


def test_wrong_tensor_dtype_or_shape_is_refused(saved, tmp_path):
    _, tensors = header_of(saved[1])
    for name, value, match in [
            ("blocks.0.query.A", tensors["blocks.0.query.A"].t().contiguous(),
             "has shape (16, 3), the model needs (3, 16)"),
            ("blocks.0.query.B", tensors["blocks.0.query.B"].to(torch.int32), "has dtype torch.int32"),
            ("extra", torch.zeros(1), "unexpected ['extra']")]:
        refused(copy_of(saved, tmp_path, repacked(saved[1], tensors={**tensors, name: value})), match=match)


# ---- adapter_config.json: informational, compared, never trusted --------------------------------

@pytest.mark.parametrize("config,why", [
    ("{not json", "unreadable"),
    (None, "config.r"),
    ("[]", "the whole file"),
])
def test_damaged_or_mismatched_config_file_warns_and_loads_from_safetensors(saved, tmp_path, config, why):
    if config is None:
        header = json.loads(saved[2])
        config = json.dumps({**header, "config": {**header["config"], "r": 64}})
    folder = copy_of(saved, tmp_path, config=config)
    match = rf"{CONFIG_NAME} does not match {WEIGHTS_NAME} \({why}"
    with pytest.warns(RuntimeWarning, match=match) as record:
        model = g.load_adapter(fresh_base(), folder)
    assert str(folder / CONFIG_NAME) in str(record[0].message)
    assert torch.equal(model(saved[3]), saved[4])


def test_missing_config_file_is_fine(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / CONFIG_NAME).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = g.load_adapter(fresh_base(), folder)
    assert torch.equal(model(saved[3]), saved[4])


# ---- failures while the model changes: all or nothing ---------------------------------------------

class Refuse(Exception):
    pass


def failing_head(model, exc):
    """Make the head's load_state_dict fail (after the GiVA layers were already written)."""
    def hook(*args):
        raise exc
    model.classifier._register_load_state_dict_pre_hook(hook)
    return model


@pytest.mark.parametrize("plain", [True, False])
def test_failure_in_modules_to_save_leaves_the_model_as_before(saved, plain):
    model = failing_head(targets(plain), RuntimeError("disk on fire"))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="disk on fire") as info:
        g.load_adapter(model, saved[0])
    assert str(saved[0] / WEIGHTS_NAME) in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("plain", [True, False])
def test_keyboard_interrupt_mid_load_leaves_the_model_as_before(saved, plain):
    model = failing_head(targets(plain), KeyboardInterrupt())
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        g.load_adapter(model, saved[0])
    assert_unchanged(model, before)
    assert bool(g.giva_layers(model)) != plain and hasattr(model, "giva_config") != plain


def test_head_that_cannot_train_leaves_the_model_as_before(saved):
    """apply_giva fails half-way (an inference-mode head cannot require grad): undone too."""
    model = fresh_base()
    with torch.inference_mode():
        model.classifier = nn.Linear(16, 3)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inference"):
        g.load_adapter(model, saved[0])
    assert_unchanged(model, before)
    assert not g.giva_layers(model) and not hasattr(model, "giva_config")


# ---- init caches ------------------------------------------------------------------------------------

def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def cache_case(seed=0):
    torch.manual_seed(seed)
    model = g.apply_giva(nn.Sequential(nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 32)),
                         g.GiVAConfig(r=2, target_modules=["0", "2"], grad_batches=3))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 48, generator=gen), torch.randn(16, 32, generator=gen)) for _ in range(3)]
    return model, batches


def cache_refused(model, batches, cache, match=None):
    bases = {n: (layer.A.clone(), layer.B.clone()) for n, layer in g.giva_layers(model).items()}
    with pytest.raises(ValueError) as info:
        g.init_bases(model, batches, mse, cache=cache, progress=False)
    assert f"init cache {cache}" in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    for n, layer in g.giva_layers(model).items():
        assert torch.equal(layer.A, bases[n][0]) and torch.equal(layer.B, bases[n][1])


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    model, batches = cache_case()
    cache = tmp_path_factory.mktemp("cache") / "init.safetensors"
    g.init_bases(model, batches, mse, cache=cache, progress=False)
    return cache.read_bytes()


def test_damaged_cache_is_refused(cache_file, tmp_path):
    model, batches = cache_case()
    cache = tmp_path / "init.safetensors"
    size = int.from_bytes(cache_file[:8], "little")
    for n in sorted(set(range(0, 16)) | set(range(0, len(cache_file), len(cache_file) // 40))):
        cache.write_bytes(cache_file[:n])
        cache_refused(model, batches, cache)
    rng = random.Random(1)
    header_bits = rng.sample(range(8 * (8 + size)), 120)
    for bit in header_bits + rng.sample(range(8 * (8 + size), 8 * len(cache_file)), 80):
        damaged = bytearray(cache_file)
        damaged[bit // 8] ^= 1 << (bit % 8)
        cache.write_bytes(bytes(damaged))
        cache_refused(model, batches, cache)


def test_cache_of_another_model_or_settings_or_format_is_refused(cache_file, tmp_path):
    cache = tmp_path / "init.safetensors"
    cache.write_bytes(cache_file)
    other, batches = cache_case(seed=1)  # same shapes, other weights
    cache_refused(other, batches, cache, match="was made for another model: layer '0' has sha256")
    model, batches = cache_case()
    with pytest.raises(ValueError, match="was made with r=2 but this init has r=3"):
        g.init_bases(g.apply_giva(nn.Sequential(nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 32)),
                                  g.GiVAConfig(r=3, target_modules=["0", "2"], grad_batches=3)),
                     batches, mse, cache=cache, progress=False)
    size = int.from_bytes(cache_file[:8], "little")
    header = json.loads(json.loads(cache_file[8:8 + size])["__metadata__"]["giva_init_cache"])
    del header["sha256"]
    tensors = load_bytes(cache_file)
    for changed, match in [({**header, "format": 1}, "has format 1, this version reads 2"),
                           ({**header, "progress": {**header["progress"], "pass": "0"}}, "wrong schema"),
                           ({**header, "settings": []}, "wrong schema"),
                           ({k: v for k, v in header.items() if k != "fingerprint"}, "fingerprint")]:
        cache.write_bytes(ser.pack(tensors, "giva_init_cache", changed)[0])
        cache_refused(model, batches, cache, match=match)
    cache.write_bytes(save_bytes(tensors, metadata={"giva_init_cache": json.dumps(header)}))
    cache_refused(model, batches, cache, match="checksum record is missing")


# ---- deeply nested JSON, special files, regexes that backtrack (each refused or warned, in time)

NESTED = "[" * 100000 + "]" * 100000


def test_deeply_nested_json_is_refused_or_warned_not_a_recursion_error(saved, tmp_path):
    _, original, _, ids, outputs = saved
    # In adapter_config.json (only compared with the header): a warning, and the adapter loads.
    folder = copy_of(saved, tmp_path / "config", config=NESTED)
    with pytest.warns(RuntimeWarning, match="nested too deeply"):
        model = g.load_adapter(fresh_base(), folder)
    assert torch.equal(model(ids), outputs)
    # As the header text in the safetensors metadata: a ValueError naming the file, model unchanged.
    tensors = header_of(original)[1]
    refused(copy_of(saved, tmp_path / "header", data=save_bytes(tensors, metadata={METADATA_KEY: NESTED})),
            match="nested too deeply")
    # As adapters.json.
    index = tmp_path / "index"
    g.save_adapters(adapted(), index)
    (index / ser.INDEX_NAME).write_text(NESTED)
    model = fresh_base()
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapters.json.*nested too deeply"):
        g.load_adapters(model, index)
    assert_unchanged(model, before)


def load_in_time(fifo, load):
    """Run ``load``; fail instead of hanging if it blocks opening ``fifo`` (a writer unblocks it)."""
    import threading

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_outcome(load)), daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        with open(fifo, "w"):  # let the blocked open return, so the thread ends
            pass
        pytest.fail(f"loading blocked on the FIFO {fifo}")
    return outcome["result"]


def _outcome(load):
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return load(), [str(w.message) for w in caught]
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        return exc, []


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("which", [CONFIG_NAME, WEIGHTS_NAME, "adapters.json"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(saved, tmp_path, which):
    import os

    _, _, _, ids, outputs = saved
    if which == "adapters.json":
        folder = tmp_path / "all"
        g.save_adapters(adapted(), folder)
        load = lambda: g.load_adapters(fresh_base(), folder)  # noqa: E731
    else:
        folder = copy_of(saved, tmp_path)
        load = lambda: g.load_adapter(fresh_base(), folder)  # noqa: E731
    (folder / which).unlink()
    os.mkfifo(folder / which)
    result, warned = load_in_time(folder / which, load)
    if which == CONFIG_NAME:  # only compared with the header: a warning, and the adapter loads
        assert torch.equal(result(ids), outputs)
        assert any("not a regular file" in w for w in warned), warned
    else:
        assert isinstance(result, ValueError) and "not a regular file" in str(result), result


@pytest.mark.parametrize("pattern", ["(.|.)*Z", "(a+)+b", "(?:x+y)*", ".*.*.*.*.*Z"])
def test_a_backtracking_regex_in_a_file_is_refused(saved, tmp_path, pattern):
    """The regex is matched against every module name: (.|.)*Z took 5.5 s on a 26-character name."""
    header, _ = header_of(saved[1])
    header["config"]["target_modules"] = pattern
    refused(copy_of(saved, tmp_path, repacked(saved[1], header)), match="catastrophic backtracking")


def test_target_regexes_users_write_still_load(saved, tmp_path):
    header, _ = header_of(saved[1])
    header["config"]["target_modules"] = r"^(?!.*classifier).*\.(query|value|out)"
    model = g.load_adapter(fresh_base(), copy_of(saved, tmp_path, repacked(saved[1], header)))
    assert g.giva_layers(model)
