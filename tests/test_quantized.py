"""Quantized frozen bases are refused by name, before the model changes: bitsandbytes' Linear4bit
(which subclasses nn.Linear, so "all-linear" finds it, and whose packed weight would otherwise be
used as if it were the float weight) and Linear8bitLt, torchao-quantized weights, and any linear
layer whose weight is not floating point."""
import pytest
import torch
from torch import nn

import giva_ext as g
from giva_ext.quantized import quantization_of


class Int8Linear(nn.Linear):
    """A linear layer holding int8 weights, as a quantization library without a known name would."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.weight = nn.Parameter(torch.zeros(n_out, n_in, dtype=torch.int8), requires_grad=False)


def _bnb4(quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.nn.Linear4bit(16, 8, quant_type=quant_type, compute_dtype=torch.float32)


def _bnb8():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
    layer.load_state_dict(nn.Linear(16, 8).state_dict())
    return layer


def _torchao_int8():
    quantization = pytest.importorskip("torchao.quantization")
    model = nn.Sequential(nn.Linear(16, 8))
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    return model[0]


LAYERS = {
    "bnb-nf4": (lambda: _bnb4("nf4"), r"bitsandbytes Linear4bit \(nf4\)"),
    "bnb-fp4": (lambda: _bnb4("fp4"), r"bitsandbytes Linear4bit \(fp4\)"),
    "bnb-int8": (_bnb8, r"bitsandbytes Linear8bitLt"),
    "torchao-int8": (_torchao_int8, r"torchao \w+"),
    "int8-weight": (lambda: Int8Linear(16, 8), r"int8 weight"),
}


@pytest.mark.parametrize("targets", ["all-linear", ["1"]], ids=["all-linear", "by-name"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_quantized_target_is_refused_by_name_before_any_change(kind, targets):
    make, described = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), make(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()  # the float layers around it
              if not k.startswith("1.")}
    with pytest.raises(ValueError, match=rf"target '1' is a quantized layer \({described}\); GiVA does not "
                                         r"adapt quantized bases yet"):
        g.apply_giva(model, g.GiVAConfig(r=2, target_modules=targets))
    assert not g.wrapped_layers(model) and "giva_adapters" not in vars(model)
    assert all(p.requires_grad for p in model[0].parameters())  # nothing was frozen
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_float_layers_are_not_quantized():
    for layer in (nn.Linear(4, 3), nn.Linear(4, 3).half(), nn.Linear(4, 3).bfloat16(), nn.LayerNorm(4), nn.ReLU()):
        assert quantization_of(layer) is None, layer


def test_add_adapter_refuses_a_quantized_target_too():
    model = nn.Sequential(nn.Linear(16, 16), Int8Linear(16, 8))
    g.apply_giva(model, g.GiVAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"target '1' is a quantized layer \(int8 weight\)"):
        g.add_adapter(model, "second", g.GiVAConfig(r=2, target_modules=["1"]))
    assert g.adapter_names(model) == ["default"]
