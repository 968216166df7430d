"""The input scale (GiVAConfig.input_scale): delta W = diag(lambda_o) B diag(lambda_s) A diag(lambda_i),
against the explicit formula, autograd through it, and every path that uses the adapter (merge,
save/load, export to PEFT LoRA, mixed-adapter batches, init, compile)."""
import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext import GiVALinear, functional, giva_linear
from test_model import Net


def randomized(layer: GiVALinear, seed: int = 0) -> GiVALinear:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for vector in layer.adapter.vectors():
            vector.copy_(torch.randn(vector.shape, generator=gen, dtype=vector.dtype))
    return layer


def explicit_delta(layer: GiVALinear) -> torch.Tensor:
    """The update as a product of (out, in) matrices, from the layer's tensors alone."""
    return torch.diag(layer.lambda_o) @ layer.B @ torch.diag(layer.lambda_s) @ layer.A @ torch.diag(layer.lambda_i)


@pytest.fixture(params=["native", "reference"])
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(functional.ops, "supports", lambda x: False)
    elif not functional.ops.supports(torch.empty(1, 1)):
        pytest.skip("native ops not built")
    return request.param


def test_new_input_scaled_layer_is_exactly_the_base():
    layer = GiVALinear(24, 17, r=4, input_scale=True)
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer.lambda_i, torch.ones(24))
    assert torch.equal(layer(x), layer.base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_and_gradients_equal_the_explicit_formula(path, dtype):
    torch.manual_seed(0)
    layer = randomized(GiVALinear(19, 13, 5, dtype=dtype, input_scale=True))
    x = torch.randn(2, 7, 19, dtype=dtype, requires_grad=True)
    y = layer(x)
    expected = nn.functional.linear(x, layer.base.weight + explicit_delta(layer), layer.base.bias)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, expected, **tol)
    grad_y = torch.randn_like(y)
    leaves = [x, layer.lambda_s, layer.lambda_o, layer.lambda_i]
    for got, want in zip(torch.autograd.grad(y, leaves, grad_y), torch.autograd.grad(expected, leaves, grad_y)):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(layer.delta_weight(), explicit_delta(layer).detach(), **tol)


def test_gradcheck(path):
    torch.manual_seed(1)
    layer = GiVALinear(9, 6, 3, dtype=torch.float64)
    inputs = (torch.randn(5, 9, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
              torch.randn(6, dtype=torch.float64), torch.randn(9, dtype=torch.float64))
    inputs = tuple(t.requires_grad_() for t in inputs)

    def fn(x, lambda_s, lambda_o, lambda_i):
        return giva_linear(x, layer.base.weight, layer.base.bias, layer.A, layer.B, lambda_s, lambda_o,
                           lambda_i=lambda_i)
    assert torch.autograd.gradcheck(fn, inputs)


def test_bfloat16_layer_with_float32_vectors(path):
    """A bf16 base keeps its vectors (lambda_i too) in float32; the result is within bf16 rounding
    of the float64 formula, and the gradients come back in float32."""
    torch.manual_seed(2)
    layer = GiVALinear(32, 24, 4, dtype=torch.bfloat16, input_scale=True)
    assert layer.lambda_i.dtype == torch.float32
    randomized(layer)
    x = torch.randn(16, 32).to(torch.bfloat16)
    y = layer(x)
    y.float().square().sum().backward()
    assert layer.lambda_i.grad.dtype == torch.float32
    wide = {k: v.double() for k, v in layer.state_dict().items()}
    delta = (torch.diag(wide["adapters.default.lambda_o"]) @ wide["adapters.default.B"]
             @ torch.diag(wide["adapters.default.lambda_s"]) @ wide["adapters.default.A"]
             @ torch.diag(wide["adapters.default.lambda_i"]))
    expected = nn.functional.linear(x.double(), wide["base.weight"] + delta, wide["base.bias"])
    torch.testing.assert_close(y.double(), expected, rtol=3e-2, atol=3e-2)


def test_model_level_flags_counts_and_init():
    torch.manual_seed(0)
    model = g.apply_giva(Net(), g.GiVAConfig(r=2, input_scale=True, modules_to_save=["classifier"]))
    layers = g.giva_layers(model)
    vectors = {n for n, p in model.named_parameters() if p.requires_grad and "adapters" in n}
    assert vectors == {f"{name}.adapters.default.{v}" for name in layers
                       for v in ("lambda_s", "lambda_o", "lambda_i")}
    expected = sum(2 + 16 + 16 for _ in layers) + 16 * 3 + 3  # r + out + in per layer, plus the head
    assert g.trainable_parameters(model).trainable == expected
    # init_bases runs with the adapters at zero, and leaves lambda_i = 1 with the new bases.
    for layer in layers.values():
        randomized(layer)
    ids = torch.randint(0, 20, (4, 6))
    batch = (ids, torch.tensor([0, 1, 2, 0]))
    g.init_bases(model, [batch], lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), progress=False)
    for layer in layers.values():
        assert torch.equal(layer.lambda_i.detach(), torch.ones(16))
        assert torch.count_nonzero(layer.delta_weight()) == 0



def test_only_the_active_adapters_input_scale_trains():
    model = g.apply_giva(Net(), g.GiVAConfig(r=2, input_scale=True))
    g.add_adapter(model, "plain", g.GiVAConfig(r=2))
    g.set_adapter(model, "plain")
    layer = next(iter(g.giva_layers(model).values()))
    assert layer.lambda_i is None and not layer.adapters["default"].lambda_i.requires_grad
    g.set_adapter(model, "default")
    assert layer.lambda_i.requires_grad


def test_merge_save_load_and_mismatch(tmp_path):
    torch.manual_seed(0)
    model = g.apply_giva(Net(), g.GiVAConfig(r=3, input_scale=True, modules_to_save=["classifier"]))
    for layer in g.giva_layers(model).values():
        randomized(layer)
    ids = torch.randint(0, 20, (4, 6))
    y = model(ids)
    g.merge(model)
    torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)
    g.unmerge(model)
    g.save_adapter(model, tmp_path / "scaled")
    torch.manual_seed(0)
    loaded = g.load_adapter(Net(), tmp_path / "scaled")
    assert torch.equal(loaded(ids), y)
    assert loaded.giva_config.input_scale
    # Onto an adapter of the same name without an input scale: refused, nothing changes.
    torch.manual_seed(0)
    plain = g.apply_giva(Net(), g.GiVAConfig(r=3, modules_to_save=["classifier"]))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="input_scale"):
        g.load_adapter(plain, tmp_path / "scaled")
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


def test_mixed_batch_rows_match_their_own_adapters():
    torch.manual_seed(0)
    model = g.apply_giva(Net(), g.GiVAConfig(r=2, input_scale=True), adapter_name="scaled")
    g.add_adapter(model, "plain", g.GiVAConfig(r=3, seed=1))
    for name in ("scaled", "plain"):
        g.set_adapter(model, name)
        for layer in g.giva_layers(model).values():
            randomized(layer, seed=len(name))
    ids = torch.randint(0, 20, (3, 5))
    rows = ["scaled", "plain", None]
    expected = []
    with torch.no_grad():
        for i, name in enumerate(rows):
            if name is None:
                with g.disable_adapters(model):
                    expected.append(model(ids[i:i + 1]))
            else:
                g.set_adapter(model, name)
                expected.append(model(ids[i:i + 1]))
        with g.mixed_adapters(model, rows):
            got = model(ids)
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_exported_lora_gives_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    from test_hf_models import outputs, tiny
    model, batch = tiny("bert")
    g.apply_giva(model, g.GiVAConfig(r=2, input_scale=True, modules_to_save=["classifier"]))
    for layer in g.giva_layers(model).values():
        randomized(layer)
    expected = outputs(model, batch)
    g.export_lora(model, tmp_path)
    lora = peft.PeftModel.from_pretrained(tiny("bert")[0], tmp_path).eval()
    torch.testing.assert_close(outputs(lora, batch), expected, rtol=1e-5, atol=1e-5)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager = randomized(GiVALinear(24, 16, 4, input_scale=True))
    compiled_layer = GiVALinear(24, 16, 4, input_scale=True)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = torch.randn(3, 5, 24)
    for layer, fn in ((eager, eager), (compiled_layer, compiled)):
        opt = torch.optim.AdamW(layer.adapter.vectors(), lr=1e-2)
        for _ in range(3):
            fn(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for got, want in zip(compiled_layer.adapter.vectors(), eager.adapter.vectors()):
        torch.testing.assert_close(got, want)



def test_configs_saved_before_the_input_scale_load_without_it():
    saved = {k: v for k, v in g.GiVAConfig(r=4).to_dict().items() if k != "input_scale"}
    assert g.GiVAConfig.from_dict(saved).input_scale is False
    assert g.GiVAConfig.from_dict(g.GiVAConfig(input_scale=True).to_dict()).input_scale is True
