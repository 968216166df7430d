"""apply_giva, target matching, freezing, trainable report and merging on whole models."""
import pytest
import torch
from torch import nn

import giva_ext as g


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.out(torch.tanh(self.query(x)) * self.value(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(16, 3)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.classifier(h.mean(1))


def randomize(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in g.giva_layers(model).values():
            layer.lambda_s.copy_(torch.randn(layer.r, generator=gen))
            layer.lambda_o.copy_(torch.randn(layer.out_features, generator=gen))


@pytest.mark.parametrize("spec,expected", [
    (["query", "value"], {"blocks.0.query", "blocks.0.value", "blocks.1.query", "blocks.1.value"}),
    (r"blocks\.1\.(query|out)", {"blocks.1.query", "blocks.1.out"}),
    ("all-linear", {f"blocks.{i}.{n}" for i in (0, 1) for n in ("query", "value", "out")}),
])
def test_target_matching(spec, expected):
    model = g.apply_giva(Net(), g.GiVAConfig(r=2, target_modules=spec))
    assert set(g.giva_layers(model)) == expected


def test_freezing_and_trainable_report():
    model = g.apply_giva(Net(), g.GiVAConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.{n}.adapters.default.lambda_{v}" for i in (0, 1)
                for n in ("query", "value", "out") for v in "so"}
    expected |= {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    report = g.trainable_parameters(model)
    assert report.trainable == 6 * (4 + 16) + 16 * 3 + 3
    assert report.total == sum(p.numel() for p in model.parameters())
    assert f"trainable params: {report.trainable:,}" in str(report)
    assert report.percent == pytest.approx(100 * report.trainable / report.total)


def test_only_vectors_and_saved_modules_get_gradients():
    model = g.apply_giva(Net(), g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    randomize(model)
    nn.functional.cross_entropy(model(torch.randint(0, 20, (4, 5))), torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_model_equals_base_at_init():
    base = Net()
    ids = torch.randint(0, 20, (3, 7))
    expected = base(ids)
    model = g.apply_giva(base, g.GiVAConfig(r=3))
    assert torch.equal(model(ids), expected)


def test_merge_unmerge_merge_and_unload():
    model = g.apply_giva(Net(), g.GiVAConfig(r=3))
    randomize(model)
    ids = torch.randint(0, 20, (3, 7))
    y = model(ids)
    g.merge(model)
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)
    g.unmerge(model)
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)
    plain = g.merge_and_unload(model)
    assert not g.giva_layers(plain) and not hasattr(plain, "giva_config")
    assert all(type(m) is not g.GiVALinear for m in plain.modules())
    torch.testing.assert_close(plain(ids), y, rtol=1e-5, atol=1e-5)


def test_merge_in_bfloat16_within_dtype_tolerance():
    model = g.apply_giva(Net(), g.GiVAConfig(r=3)).to(torch.bfloat16)
    randomize(model)
    ids = torch.randint(0, 20, (3, 7))
    y = model(ids).float()
    plain = g.merge_and_unload(model)
    torch.testing.assert_close(plain(ids).float(), y, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("config,message", [
    (dict(target_modules=["nothing"]), "matches no module"),
    (dict(target_modules=["norm"]), "is a LayerNorm, not an nn.Linear"),
    (dict(r=9, init_mode="VrU2r"), "needs rank 18"),
    (dict(r=17, init_mode="VrUr"), "needs rank 17"),
    (dict(modules_to_save=["head"]), "'head' matches no module"),
    (dict(target_modules=["query"], modules_to_save=["query"]), "'blocks.0.query' is the target"),
    (dict(target_modules=["query"], modules_to_save=["blocks.1"]), "'blocks.1' holds the target 'blocks.1.query'"),
    (dict(target_modules=r"blocks\.0\.norm"), "matches no linear layer, only modules such as 'blocks.0.norm'"),
    (dict(target_modules="(unclosed"), "invalid"),
])
def test_bad_configs_fail_before_the_model_changes(config, message):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        g.apply_giva(model, g.GiVAConfig(**config))
    assert not g.giva_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", -2), ("init_mode", "svd"), ("grad_batches", 0), ("grad_batches", True),
    ("dropout", 1.0), ("dropout", "0.1"), ("dropout", True), ("target_modules", []),
    ("modules_to_save", "classifier"), ("seed", 2**70), ("seed", -2**64), ("seed", 1.5),
    ("input_scale", "yes")])
def test_config_validation(field, value):
    """Each bad value is a ValueError naming the field (never a raw TypeError later, never a
    string split into characters, never a seed the generator refuses at init)."""
    with pytest.raises(ValueError, match=f"GiVAConfig.{field}"):
        g.GiVAConfig(**{field: value})


def test_regex_targets_skip_the_containers_it_also_matches():
    model = g.apply_giva(Net(), g.GiVAConfig(r=2, target_modules=r"blocks\.0\..*"))
    assert set(g.giva_layers(model)) == {"blocks.0.query", "blocks.0.value", "blocks.0.out"}


def test_target_names_that_match_nothing_are_reported():
    with pytest.warns(UserWarning, match=r"\['qwery'\] match no module"):
        model = g.apply_giva(Net(), g.GiVAConfig(r=2, target_modules=["query", "qwery"]))
    assert set(g.giva_layers(model)) == {"blocks.0.query", "blocks.1.query"}


def test_apply_twice_is_refused():
    model = g.apply_giva(Net(), g.GiVAConfig(r=2))
    with pytest.raises(ValueError, match="already has GiVA layers"):
        g.apply_giva(model, g.GiVAConfig(r=2))
