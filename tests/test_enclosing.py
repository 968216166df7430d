"""Model-level functions on a module that contains the adapted one: a custom head over an adapted
encoder, torch.compile's wrapper and DistributedDataParallel. The oracle is the same call on the
adapted module itself."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import giva_ext as g
from giva_ext.model import adapted_module
from giva_ext.serialization import WEIGHTS_NAME


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)

    def forward(self, ids):
        h = self.embed(ids)
        return h + torch.tanh(self.query(h)) * self.value(h)


class WithHead(nn.Module):
    """A custom head over an encoder, the encoder alone adapted (the most common set-up)."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.encoder(ids).mean(1))


CONFIG = g.GiVAConfig(r=2, target_modules=["query", "value"], grad_batches=2)


def loss_fn(model, batch):
    ids, labels = batch
    return nn.functional.cross_entropy(model(ids), labels)


def batches():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 30, (4, 5), generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(2)]


def adapted(seed=0):
    torch.manual_seed(seed)
    model = WithHead()
    g.apply_giva(model.encoder, CONFIG)
    return model


def test_init_bases_through_the_enclosing_model_equals_init_on_the_encoder():
    """init_bases(model) with the head's loss: the same bases as init_bases(model.encoder) with a
    loss that runs the same head, and the same returned spectra, named as in the encoder."""
    model, oracle = adapted(), adapted()
    got = g.init_bases(model, batches(), loss_fn, progress=False)
    want = g.init_bases(oracle.encoder, batches(),
                        lambda enc, batch: loss_fn(lambda ids: oracle.head(enc(ids).mean(1)), batch),
                        progress=False)
    assert set(got) == set(want) == {"query", "value"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
        for buffer in ("A", "B"):
            torch.testing.assert_close(getattr(g.giva_layers(model.encoder)[name], buffer),
                                       getattr(g.giva_layers(oracle.encoder)[name], buffer), rtol=0, atol=0)


def _randomized(model):
    with torch.no_grad():
        for i, layer in enumerate(g.giva_layers(model).values()):
            layer.lambda_o.copy_(torch.linspace(-1, 1, layer.out_features) * (i + 1))
    return model


def test_every_registry_function_works_through_the_enclosing_model(tmp_path):
    model = _randomized(adapted())
    assert adapted_module(model) is model.encoder
    assert g.adapter_names(model) == ["default"] and g.active_adapter(model) == "default"
    vectors = sum(layer.r + layer.out_features for layer in g.giva_layers(model.encoder).values())
    head = sum(p.numel() for p in model.head.parameters())  # outside the adapted module: still trains
    assert g.trainable_parameters(model).trainable == vectors + head
    g.save_adapter(model, tmp_path / "outer")
    g.save_adapter(model.encoder, tmp_path / "inner")
    assert (tmp_path / "outer" / WEIGHTS_NAME).read_bytes() == (tmp_path / "inner" / WEIGHTS_NAME).read_bytes()

    g.add_adapter(model, "other", CONFIG)
    assert g.adapter_names(model) == g.adapter_names(model.encoder) == ["default", "other"]
    g.set_adapter(model, "other")
    assert g.active_adapter(model.encoder) == "other"
    g.load_adapter(model, tmp_path / "inner", "other")  # the saved vectors into "other"
    ids = batches()[0][0]
    with torch.no_grad():
        with g.mixed_adapters(model, ["default", "other", None, "default"]):
            mixed = model(ids)
        g.set_adapter(model, "default")
        torch.testing.assert_close(mixed[[0, 1, 3]], model(ids)[[0, 1, 3]])
    g.delete_adapter(model, "other")
    assert g.adapter_names(model) == ["default"]

    g.save_adapters(model, tmp_path / "all")
    fresh = adapted(seed=0)
    g.load_adapters(fresh, tmp_path / "all")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)
    g.export_lora(model, tmp_path / "lora")
    g.merge(model)
    g.unmerge(model)
    plain = g.merge_and_unload(model)
    assert plain is model and not g.wrapped_layers(model) and "giva_adapters" not in vars(model.encoder)


def test_torch_compile_wrapper_reaches_the_adapted_module(tmp_path):
    model = _randomized(adapted())
    compiled = torch.compile(model)
    assert adapted_module(compiled) is model.encoder
    assert g.adapter_names(compiled) == ["default"]
    g.set_adapter(compiled, None)
    assert g.active_adapter(model) is None and "giva_active_adapter" not in vars(compiled)
    g.set_adapter(compiled, "default")
    g.save_adapter(compiled, tmp_path / "compiled")
    g.save_adapter(model.encoder, tmp_path / "plain")
    assert (tmp_path / "compiled" / WEIGHTS_NAME).read_bytes() == (tmp_path / "plain" / WEIGHTS_NAME).read_bytes()


def test_distributed_data_parallel_wrapper_reaches_the_adapted_module(tmp_path):
    """One gloo process: init_bases, save and load through DistributedDataParallel(model), the
    same as on the unwrapped model."""
    # A file rendezvous: no port to pick and lose to another process between the pick and the bind.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model, oracle = adapted(), adapted()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert adapted_module(ddp) is model.encoder
        got = g.init_bases(ddp, batches(), loss_fn, progress=False)
        want = g.init_bases(oracle, batches(), loss_fn, progress=False)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
        loss_fn(ddp, batches()[0]).backward()  # a training step through DDP still works after init
        g.save_adapter(ddp, tmp_path / "ddp")
        g.load_adapter(oracle, tmp_path / "ddp")
        for name, layer in g.giva_layers(oracle).items():
            torch.testing.assert_close(layer.A, g.giva_layers(model)[name].A, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_two_separately_adapted_modules_are_named():
    torch.manual_seed(0)
    pair = nn.ModuleDict({"left": Encoder(), "right": Encoder()})
    g.apply_giva(pair["left"], CONFIG)
    g.apply_giva(pair["right"], CONFIG)
    with pytest.raises(ValueError, match=r"2 separately adapted modules \('left', 'right'\)"):
        g.adapter_names(pair)
    with pytest.raises(ValueError, match=r"separately adapted"):
        g.init_bases(pair, batches(), loss_fn, progress=False)
    assert g.adapter_names(pair["left"]) == ["default"]  # each on its own still works


def test_a_plain_enclosing_model_loads_into_itself(tmp_path):
    """No adapted module inside: load_adapter applies the saved config to the model given."""
    model = _randomized(adapted())
    g.save_adapter(model, tmp_path / "a")
    torch.manual_seed(0)
    plain = WithHead()
    g.load_adapter(plain.encoder, tmp_path / "a")
    assert adapted_module(plain) is plain.encoder
    with torch.no_grad():
        ids = batches()[0][0]
        torch.testing.assert_close(plain(ids), model(ids), rtol=0, atol=0)
