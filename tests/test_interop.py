"""export_lora (read back by stock peft) and import_vera (from peft VeRA checkpoints)."""
import json
import os

import pytest
import torch

import giva_ext as g
from giva_ext.serialization import CONFIG_NAME, WEIGHTS_NAME
from test_hf_models import outputs, tiny

peft = pytest.importorskip("peft")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def randomized(model):
    """Nonzero vectors everywhere, so every adapter contributes to the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in g.giva_layers(model).values():
            layer.lambda_s.copy_(torch.randn(layer.lambda_s.shape, generator=gen))
            layer.lambda_o.copy_(torch.randn(layer.lambda_o.shape, generator=gen))
    return model


@pytest.mark.parametrize("kind,config", [
    ("bert", g.GiVAConfig(r=2, modules_to_save=["classifier"])),
    ("gpt2", g.GiVAConfig(r=2, fused_chunks={"c_attn": 3})),
    ("llama", g.GiVAConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
])
def test_exported_lora_loads_in_peft_with_same_outputs(kind, config, tmp_path):
    model, batch = tiny(kind)
    randomized(g.apply_giva(model, config))
    if config.modules_to_save:
        with torch.no_grad():
            model.classifier.weight.add_(1.0)
    expected = outputs(model, batch)
    g.export_lora(model, tmp_path)

    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LORA" and saved["lora_alpha"] == saved["r"] == 2
    assert saved["fan_in_fan_out"] == (kind == "gpt2")
    lora = peft.PeftModel.from_pretrained(tiny(kind)[0], tmp_path).eval()
    assert isinstance(lora.base_model, peft.LoraModel)
    torch.testing.assert_close(outputs(lora, batch), expected, rtol=1e-5, atol=1e-5)
    # Every exported tensor landed in the model (nothing left at peft's init).
    peft_layers = {n: m for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(peft_layers) == len(g.giva_layers(model))
    if kind == "gpt2":
        fused = lora.base_model.model.transformer.h[0].attn.c_attn
        assert fused.r["default"] == 6 and fused.scaling["default"] == 1.0


def test_export_refuses_merged_model(tmp_path):
    model, _ = tiny("bert")
    g.merge(randomized(g.apply_giva(model, g.GiVAConfig(r=2))))
    with pytest.raises(RuntimeError, match="merged"):
        g.export_lora(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_finite_vectors(tmp_path):
    model, _ = tiny("bert")
    model = randomized(g.apply_giva(model, g.GiVAConfig(r=2)))
    name, layer = next(iter(g.giva_layers(model).items()))
    with torch.no_grad():
        layer.lambda_o[0] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}\.lora_B\.weight.* NaN or Inf"):
        g.export_lora(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def vera_checkpoint(kind, path, save_projection=True, **config):
    """A peft VeRA model on a tiny ``kind`` model with random lambdas, saved to ``path``."""
    model, batch = tiny(kind)
    config = peft.VeraConfig(r=4, save_projection=save_projection, **config)
    vera = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in vera.named_parameters():
            if "vera_lambda" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    vera.eval()
    vera.save_pretrained(path)
    return outputs(vera, batch), batch


@pytest.mark.parametrize("kind,save_projection,config", [
    ("bert", True, dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"])),
    ("gpt2", False, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
])
def test_imported_vera_gives_same_outputs(kind, save_projection, config, tmp_path):
    expected, batch = vera_checkpoint(kind, tmp_path, save_projection, **config)
    model = g.import_vera(tiny(kind)[0], tmp_path)
    assert len(g.giva_layers(model)) == (2 * 5 + 1 if kind == "bert" else 2 * 2)  # "dense" x3 + pooler
    assert model.giva_config.r == 4 and model.giva_config.init_mode == "random"
    torch.testing.assert_close(outputs(model, batch), expected, rtol=1e-5, atol=1e-5)
    # The imported model trains and saves like any GiVA model.
    g.save_adapter(model, tmp_path / "giva")
    assert torch.equal(outputs(g.load_adapter(tiny(kind)[0], tmp_path / "giva"), batch), outputs(model, batch))


def test_import_vera_rejects_lora_and_giva_checkpoints(tmp_path):
    model, _ = tiny("bert")
    randomized(g.apply_giva(model, g.GiVAConfig(r=2)))
    g.export_lora(model, tmp_path / "lora")
    g.save_adapter(model, tmp_path / "giva")
    for folder, kind in (("lora", "LORA"), ("giva", "non-PEFT")):
        fresh, _ = tiny("bert")
        with pytest.raises(ValueError, match=f"describes a {kind} adapter, not a VeRA one"):
            g.import_vera(fresh, tmp_path / folder)
        assert not g.giva_layers(fresh)


def test_import_vera_rejects_a_checkpoint_of_another_model(tmp_path):
    vera_checkpoint("bert", tmp_path, target_modules=["query", "value"])
    bigger = transformers_bert(hidden=64)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(ValueError, match=r"vera_A has shape \(4, 32\) but r=4 and this model's VeRA layers "
                                         r"need \(4, >= 64\)"):
        g.import_vera(bigger, tmp_path)
    assert not g.giva_layers(bigger)
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())
    llama, _ = tiny("llama")
    with pytest.raises(ValueError, match="matches no module"):
        g.import_vera(llama, tmp_path)


def transformers_bert(hidden):
    import transformers
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, num_labels=2)).eval()
