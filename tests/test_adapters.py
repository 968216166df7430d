"""Several named adapters on one model (add, switch, disable, delete) and mixed-adapter batches,
against explicit oracles: the base model with each adapter's delta added to its weights by the
formula, and "run each adapter on the whole batch and keep its rows"."""
import contextlib
import copy

import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext import ops, reference

from test_model import Net


def fill_vectors(model, adapter, seed):
    """Random non-zero vectors for ``adapter`` on every layer holding it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in g.giva_layers(model, adapter).values():
            a = layer.adapters[adapter]
            a.lambda_s.copy_(torch.randn(a.r, generator=gen))
            a.lambda_o.copy_(torch.randn(layer.out_features, generator=gen))


def with_delta(plain, model, adapter):
    """Oracle: a copy of the plain model with W += diag(lo) B diag(ls) A of ``adapter``, by formula."""
    oracle = copy.deepcopy(plain)
    with torch.no_grad():
        for name, layer in g.giva_layers(model, adapter).items():
            a = layer.adapters[adapter]
            delta = torch.diag(a.lambda_o) @ a.B @ torch.diag(a.lambda_s) @ a.A
            oracle.get_submodule(name).weight.add_(delta)
    return oracle


@pytest.fixture
def three():
    """Net with "default" (r=4, all linear), "small" (r=2, query only) and "wide" (r=8, query and
    value), each with its own vectors; and the plain model they were built on."""
    torch.manual_seed(0)
    plain = Net()
    model = g.apply_giva(copy.deepcopy(plain), g.GiVAConfig(r=4, target_modules="all-linear"))
    g.add_adapter(model, "small", g.GiVAConfig(r=2, target_modules=["query"], seed=1))
    g.add_adapter(model, "wide", g.GiVAConfig(r=8, target_modules=["query", "value"], seed=2))
    for seed, name in enumerate(g.adapter_names(model)):
        fill_vectors(model, name, seed)
    return plain, model


IDS = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(3))


def test_add_switch_disable(three):
    plain, model = three
    assert g.adapter_names(model) == ["default", "small", "wide"]
    assert g.active_adapter(model) == "default"  # adding does not switch
    for name in g.adapter_names(model):
        g.set_adapter(model, name)
        assert g.active_adapter(model) == name and model.giva_config == model.giva_adapters[name]
        torch.testing.assert_close(model(IDS), with_delta(plain, model, name)(IDS))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in model.named_parameters() if f".adapters.{name}.lambda_" in n}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with g.disable_adapters(model):
        torch.testing.assert_close(model(IDS), plain(IDS))
        assert g.active_adapter(model) == "wide"  # only what this thread runs changes
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert g.active_adapter(model) == "wide"
    torch.testing.assert_close(model(IDS), with_delta(plain, model, "wide")(IDS))
    g.set_adapter(model, None)
    torch.testing.assert_close(model(IDS), plain(IDS))


def test_adapters_of_different_ranks_share_a_layer(three):
    _, model = three
    query = model.blocks[0].query
    assert {n: a.r for n, a in query.adapters.items()} == {"default": 4, "small": 2, "wide": 8}
    assert list(model.blocks[0].out.adapters) == ["default"]
    g.set_adapter(model, "small")
    assert set(g.giva_layers(model)) == {"blocks.0.query", "blocks.1.query"}


def test_training_one_adapter_leaves_the_others(three):
    plain, model = three
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g.set_adapter(model, "small")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS).square().sum().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters.small.lambda_" in k for k in changed)


@pytest.mark.filterwarnings("ignore:giva init:RuntimeWarning")  # wide's VrU2r needs the full 16x16 rank
def test_each_adapter_gets_its_own_init(three):
    _, model = three
    default_bases = {n: (l.A.clone(), l.B.clone()) for n, l in g.giva_layers(model).items()}
    g.set_adapter(model, "wide")
    batches = [torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    g.init_bases(model, batches, loss_fn=lambda m, ids: m(ids).square().mean(), svd="dense")
    for name, layer in g.giva_layers(model, "default").items():
        a = layer.adapters["default"]
        assert torch.equal(a.A, default_bases[name][0]) and torch.equal(a.B, default_bases[name][1])
    for layer in g.giva_layers(model, "wide").values():
        a = layer.adapters["wide"]  # orthonormal, gradient-informed, vectors reset
        torch.testing.assert_close(a.A @ a.A.t(), torch.eye(8), atol=1e-5, rtol=0)
        assert torch.equal(a.lambda_o, torch.zeros_like(a.lambda_o))


def test_delete(three):
    plain, model = three
    g.delete_adapter(model, "wide")
    assert g.adapter_names(model) == ["default", "small"] and g.active_adapter(model) == "default"
    torch.testing.assert_close(model(IDS), with_delta(plain, model, "default")(IDS))
    g.delete_adapter(model, "default")  # the active one: none is active now
    assert g.active_adapter(model) is None
    assert set(g.wrapped_layers(model)) == {"blocks.0.query", "blocks.1.query"}  # the others unwrapped
    assert isinstance(model.blocks[0].out, nn.Linear)
    torch.testing.assert_close(model(IDS), plain(IDS))
    with pytest.raises(ValueError, match="no adapter of the model is active"):
        g.merge(model)
    g.set_adapter(model, "small")
    torch.testing.assert_close(model(IDS), with_delta(plain, model, "small")(IDS))


def test_merge_acts_on_the_active_adapter(three):
    plain, model = three
    g.set_adapter(model, "wide")
    expected = with_delta(plain, model, "wide")(IDS)
    g.merge(model)
    torch.testing.assert_close(model(IDS), expected)
    with pytest.raises(RuntimeError, match="merged"):
        g.set_adapter(model, "default")
    with pytest.raises(RuntimeError, match="merged"):
        g.delete_adapter(model, "wide")
    g.unmerge(model)
    g.set_adapter(model, "default")
    torch.testing.assert_close(model(IDS), with_delta(plain, model, "default")(IDS))


def test_bad_names_are_refused_before_any_change(three):
    _, model = three
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="already has an adapter named 'small'"):
        g.add_adapter(model, "small", g.GiVAConfig(r=2))
    with pytest.raises(ValueError, match="adapter name"):
        g.add_adapter(model, "a.b", g.GiVAConfig(r=2))
    with pytest.raises(ValueError, match="modules_to_save"):
        g.add_adapter(model, "head", g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="needs rank"):
        g.add_adapter(model, "huge", g.GiVAConfig(r=16))
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        g.set_adapter(model, "nope")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        g.delete_adapter(model, "nope")
    assert g.adapter_names(model) == ["default", "small", "wide"]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["forward", "keys", "pop", "update", "training", "a\0b", "tab\there"])
def test_names_a_module_dict_or_a_folder_cannot_take_are_refused_up_front(name):
    """Before: apply_giva raised a raw KeyError from the ModuleDict with every parameter frozen."""
    model = Net()
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match="adapter name"):
        g.apply_giva(model, g.GiVAConfig(r=2), adapter_name=name)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not g.giva_layers(model)
    g.apply_giva(model, g.GiVAConfig(r=2))
    with pytest.raises(ValueError, match="adapter name"):
        g.add_adapter(model, name, g.GiVAConfig(r=2))
    assert g.adapter_names(model) == ["default"]


def test_save_adapters_checks_every_adapter_before_writing_any(three, tmp_path):
    _, model = three
    with torch.no_grad():
        next(iter(g.giva_layers(model, "wide").values())).adapters["wide"].lambda_o[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        g.save_adapters(model, tmp_path / "all")
    assert not (tmp_path / "all").exists()


# ---- mixed-adapter batches

def per_adapter_oracle(model, rows, ids):
    """Run the whole batch once per adapter (and once bare) and keep each row's own result."""
    previous = g.active_adapter(model)
    outputs = {}
    for name in {*rows}:
        g.set_adapter(model, name)
        outputs[name] = model(ids)
    g.set_adapter(model, previous)
    return torch.stack([outputs[name][i] for i, name in enumerate(rows)])


MIXES = {
    "any": ["wide", None, "default", "small", "wide", "default"],
    "equal": ["small"] * 6,
    "none": [None] * 6,
}


@pytest.mark.parametrize("native", [True, False] if ops.HAS_NATIVE else [False])
@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_mixed_batch_matches_each_adapter_on_its_rows(three, monkeypatch, native, mix, mode):
    _, model = three
    if not native:
        monkeypatch.setattr(ops, "supports_mixed", lambda x: False)
    rows = MIXES[mix]
    with torch.no_grad():
        expected = per_adapter_oracle(model, rows, IDS)
    with getattr(torch, mode)(), g.mixed_adapters(model, rows):
        got = model(IDS)
    torch.testing.assert_close(got, expected)
    assert all(layer.mixed_state() is None for layer in g.wrapped_layers(model).values())


def in_another_thread(block, run):
    """Enter ``block`` in a second thread and call ``run`` here while it is open."""
    import threading

    entered, leave = threading.Event(), threading.Event()
    errors = []

    def hold():
        try:
            with block():
                entered.set()
                leave.wait(30)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            entered.set()

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(30)
    try:
        return run()
    finally:
        leave.set()
        thread.join(30)
        assert not errors, errors


@pytest.mark.parametrize("block", ["mixed", "disable"])
def test_a_block_in_one_thread_leaves_other_threads_alone(three, block):
    """Serving threads share the model: one thread's mixed_adapters or disable_adapters block must
    not change what another thread computes (before, the other thread got the bare model or an
    error)."""
    plain, model = three
    want = with_delta(plain, model, "default")(IDS)

    def other():
        return model(IDS)

    def enter():
        return _mixed_no_grad(model) if block == "mixed" else g.disable_adapters(model)

    got = in_another_thread(enter, other)
    torch.testing.assert_close(got, want)
    # and two threads may hold mixed blocks with different rows at once
    if block == "mixed":
        with torch.no_grad():
            expected = per_adapter_oracle(model, ["wide"] * 6, IDS)

        def mine():
            with torch.no_grad(), g.mixed_adapters(model, ["wide"] * 6):
                return model(IDS)

        torch.testing.assert_close(in_another_thread(enter, mine), expected)


@contextlib.contextmanager
def _mixed_no_grad(model):
    with torch.no_grad(), g.mixed_adapters(model, [None] * 6):
        yield model


def test_mixed_batch_of_one_row_and_by_ids(three):
    _, model = three
    with torch.no_grad():
        expected = per_adapter_oracle(model, ["wide"], IDS[:1])
        with g.mixed_adapters(model, torch.tensor([2])):
            torch.testing.assert_close(model(IDS[:1]), expected)


@pytest.mark.parametrize("native", [True, False] if ops.HAS_NATIVE else [False])
def test_mixed_ids_written_in_place_take_effect(three, monkeypatch, native):
    """The block reads a LongTensor of ids at every forward (what a captured CUDA graph relies on),
    through each layer's lookup where the layer lacks some adapters ("value" holds two of three)."""
    _, model = three
    if not native:
        monkeypatch.setattr(ops, "supports_mixed", lambda x: False)
    names = g.adapter_names(model)
    first, second = [2, -1, 0, 1, 2, 0], [0, 1, -1, 2, 2, -1]
    with torch.no_grad():
        expected = [per_adapter_oracle(model, [names[i] if i >= 0 else None for i in rows], IDS)
                    for rows in (first, second)]
    ids = torch.tensor(first)
    with torch.inference_mode(), g.mixed_adapters(model, ids):
        got_first = model(IDS)
        ids.copy_(torch.tensor(second))
        got_second = model(IDS)
    torch.testing.assert_close(got_first, expected[0])
    torch.testing.assert_close(got_second, expected[1])


def test_mixed_batch_on_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    g.apply_giva(model, g.GiVAConfig(r=4, target_modules=["query", "value"]), adapter_name="en")
    g.add_adapter(model, "de", g.GiVAConfig(r=8, target_modules=["query", "value", "dense"]))
    fill_vectors(model, "en", 0)
    fill_vectors(model, "de", 1)
    ids = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(0))
    rows = ["de", "en", None, "de", "en"]
    with torch.inference_mode():
        expected = torch.stack([_logits(model, name, ids)[i] for i, name in enumerate(rows)])
        with g.mixed_adapters(model, rows):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)


def _logits(model, name, ids):
    previous = g.active_adapter(model)
    g.set_adapter(model, name)
    try:
        return model(input_ids=ids).logits
    finally:
        g.set_adapter(model, previous)


def test_mixed_batch_errors_before_running(three):
    _, model = three
    with pytest.raises(KeyError, match="row 1 names adapter 'nope'") as info:
        with g.mixed_adapters(model, ["wide", "nope"]):
            pass
    assert str(info.value).startswith("row 1")  # printed as written, not in quotes
    with pytest.raises(KeyError, match=r"names adapter 0 \(ids go in a LongTensor"):
        with g.mixed_adapters(model, [0, None]):
            pass
    with pytest.raises(ValueError, match="adapter id 3 of row 0 is not in"):
        with g.mixed_adapters(model, torch.tensor([3, 0])):
            pass
    with pytest.raises(ValueError, match="1-D int64"):
        with g.mixed_adapters(model, torch.tensor([0, 1], dtype=torch.int32)):
            pass
    with pytest.raises(ValueError, match="on meta but the model"):
        with g.mixed_adapters(model, torch.tensor([0, 1], device="meta")):
            pass
    with pytest.raises(ValueError, match="2 adapter ids for a batch of 6 rows"):
        with torch.no_grad(), g.mixed_adapters(model, ["wide", None]):
            model(IDS)
    with pytest.raises(RuntimeError, match="inference-only"):
        with g.mixed_adapters(model, ["wide"] * 6):
            model(IDS)
    with pytest.raises(RuntimeError, match="already in a mixed_adapters block"):
        with g.mixed_adapters(model, ["wide"] * 6), g.mixed_adapters(model, ["wide"] * 6):
            pass
    assert all(layer.mixed_state() is None for layer in g.wrapped_layers(model).values())


# ---- the op itself, with scattered rows (the gather path) and every CPU dtype

def op_args(T, n_in, n_out, ranks, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (rnd(T, n_in), rnd(n_out, n_in) / n_in ** 0.5, rnd(n_out) if bias else None,
            [rnd(r, n_in) / n_in ** 0.5 for r in ranks], [rnd(n_out, r) / n_out ** 0.5 for r in ranks],
            [rnd(r) for r in ranks], [rnd(n_out) for r in ranks],
            torch.randint(-1, len(ranks), (T,), generator=gen))


needs_native = pytest.mark.skipif(not ops.HAS_NATIVE, reason=f"native ops not built: {ops.LOAD_ERROR}")


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [0, 1, 37, 300])
@pytest.mark.parametrize("order", ["scattered", "sorted"])  # short runs (per-row kernel), long runs (views)
def test_mixed_op_against_reference(dtype, tol, bias, T, order):
    args = op_args(T, 24, 20, [1, 5, 8], dtype, bias)
    if order == "sorted":
        args = (*args[:-1], args[-1].sort().values)
    expected = reference.mixed_linear(*[_to64(a) for a in args])
    got = torch.ops.giva.mixed_linear(*args)
    assert got.dtype == dtype and got.shape == (T, 20)
    if T:
        err = (got.double() - expected).abs().max() / expected.abs().max()
        assert err <= tol


@needs_native
@pytest.mark.parametrize("T", [1, 37, 300])
@pytest.mark.parametrize("order", ["scattered", "sorted"])
def test_mixed_op_takes_float32_vectors_beside_bfloat16(T, order):
    """The vectors as a bf16 model keeps them (float32): same answer as with them in bf16 up to
    their own rounding, and within bf16 precision of float64."""
    args = list(op_args(T, 24, 20, [1, 5, 8], torch.bfloat16))
    if order == "sorted":
        args[-1] = args[-1].sort().values
    fp32 = [*args[:5], [v.float() + 1e-3 for v in args[5]], [v.float() + 1e-3 for v in args[6]], args[7]]
    got = torch.ops.giva.mixed_linear(*fp32)
    expected = reference.mixed_linear(*[_to64(a) for a in fp32])
    assert got.dtype == torch.bfloat16
    err = (got.double() - expected).abs().max() / expected.abs().max()
    assert err <= 3e-2
    torch.library.opcheck(torch.ops.giva.mixed_linear, fp32)


def _to64(a):
    if isinstance(a, list):
        return [t.double() for t in a]
    return a.double() if a is not None and a.is_floating_point() else a


@needs_native
def test_mixed_op_opcheck():
    torch.library.opcheck(torch.ops.giva.mixed_linear, op_args(40, 12, 10, [2, 3], torch.float32))
    torch.library.opcheck(torch.ops.giva.mixed_linear, op_args(40, 12, 10, [2, 3], torch.float32, bias=False))


def test_reference_refuses_ids_out_of_range():
    x, w, b, A, B, ls, lo, _ = op_args(4, 8, 5, [2, 3], torch.float32)
    with pytest.raises(ValueError, match=r"adapter ids must be in \[-1, 2\)"):
        reference.mixed_linear(x, w, b, A, B, ls, lo, torch.tensor([0, 1, 2, -1]))


@needs_native
def test_mixed_op_bad_input_names_the_argument():
    x, w, b, A, B, ls, lo, ids = op_args(6, 8, 5, [2, 3], torch.float32)
    with pytest.raises(RuntimeError, match=r"B\[1\] must have shape \(out, r\) = \(5, 3\)"):
        torch.ops.giva.mixed_linear(x, w, b, A, [B[0], B[0]], ls, lo, ids)
    with pytest.raises(RuntimeError, match="one tensor per adapter"):
        torch.ops.giva.mixed_linear(x, w, b, A, B[:1], ls, lo, ids)
    with pytest.raises(RuntimeError, match=r"token_ids\[2\] = 5 is not in \[-1, 2\)"):
        torch.ops.giva.mixed_linear(x, w, b, A, B, ls, lo, torch.tensor([0, 1, 5, 0, 0, 0]))
    with pytest.raises(RuntimeError, match="token_ids must have dtype int64"):
        torch.ops.giva.mixed_linear(x, w, b, A, B, ls, lo, ids.int())
    with pytest.raises(RuntimeError, match=r"token_ids must have shape \(T,\) = \(6,\)"):
        torch.ops.giva.mixed_linear(x, w, b, A, B, ls, lo, ids[:4])


# ---- saving and loading by name

def outputs_per_adapter(model):
    previous = g.active_adapter(model)
    result = {}
    for name in g.adapter_names(model):
        g.set_adapter(model, name)
        result[name] = model(IDS)
    g.set_adapter(model, previous)
    return result


def test_save_and_load_all_adapters(three, tmp_path):
    plain, model = three
    g.set_adapter(model, "small")
    g.save_adapters(model, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["adapters.json", "default", "small", "wide"]
    fresh = g.load_adapters(copy.deepcopy(plain), tmp_path / "all")
    assert g.adapter_names(fresh) == ["default", "small", "wide"] and g.active_adapter(fresh) == "small"
    expected, got = outputs_per_adapter(model), outputs_per_adapter(fresh)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    rows = ["wide", None, "default", "small", "wide", "default"]
    with torch.no_grad(), g.mixed_adapters(fresh, rows):
        torch.testing.assert_close(fresh(IDS), per_adapter_oracle(model, rows, IDS))


def test_save_one_by_name_and_add_it_elsewhere(three, tmp_path):
    plain, model = three
    g.save_adapter(model, tmp_path / "wide", "wide")  # not the active one
    other = g.apply_giva(copy.deepcopy(plain), g.GiVAConfig(r=4, target_modules="all-linear"), "base")
    g.load_adapter(other, tmp_path / "wide", "wide")  # a new name: added, "base" stays active
    assert g.adapter_names(other) == ["base", "wide"] and g.active_adapter(other) == "base"
    g.set_adapter(other, "wide")
    expected = outputs_per_adapter(model)["wide"]
    torch.testing.assert_close(other(IDS), expected, rtol=0, atol=0)
    fill_vectors(other, "wide", 7)  # loading again under the same name overwrites it
    g.load_adapter(other, tmp_path / "wide", "wide")
    torch.testing.assert_close(other(IDS), expected, rtol=0, atol=0)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        g.save_adapter(model, tmp_path / "x", "nope")


def test_load_adapters_is_all_or_nothing(three, tmp_path):
    plain, model = three
    g.save_adapters(model, tmp_path / "all")
    data = bytearray((tmp_path / "all" / "wide" / "adapter_model.safetensors").read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the last adapter's tensors
    (tmp_path / "all" / "wide" / "adapter_model.safetensors").write_bytes(bytes(data))
    target = g.apply_giva(copy.deepcopy(plain), g.GiVAConfig(r=2, target_modules=["out"]), "mine")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="wide"):
        g.load_adapters(target, tmp_path / "all")
    assert g.adapter_names(target) == ["mine"] and g.active_adapter(target) == "mine"
    assert target.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    with pytest.raises(ValueError, match="adapters.json"):
        g.load_adapters(target, tmp_path / "nowhere")


def test_wrapped_layers_lists_what_named_modules_lists():
    """The pruned walk (it never enters a GiVALinear) finds the same layers, in the same order, as
    filtering named_modules(): nested containers, a module reachable twice, many adapters, and a
    bare GiVALinear."""
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"enc": nn.ModuleDict({"q": nn.Linear(8, 8), "act": nn.ReLU(), "v": nn.Linear(8, 8)}),
                           "shared": shared, "more": nn.ModuleDict({"again": shared, "o": nn.Linear(8, 8)})})
    g.apply_giva(model, g.GiVAConfig(r=2, target_modules=["q", "v", "shared", "o"]))
    for i in range(1, 6):
        g.add_adapter(model, f"a{i}", g.GiVAConfig(r=2, target_modules=["q", "o"]))
    want = [(n, m) for n, m in model.named_modules() if isinstance(m, g.GiVALinear)]
    got = list(g.wrapped_layers(model).items())
    assert [n for n, _ in got] == [n for n, _ in want] == ["enc.q", "enc.v", "shared", "more.o"]
    assert all(a is b for (_, a), (_, b) in zip(got, want))
    layer = model["enc"]["q"]
    assert g.wrapped_layers(layer) == {"": layer}
