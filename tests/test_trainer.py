"""GiVA under the Hugging Face Trainer: init on the Trainer's data, optimizer contents, checkpoints."""
import os

import pytest
import safetensors.torch
import torch

import giva_ext as g

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from giva_ext.hf import ADAPTER_DIR, GiVAInitCallback  # noqa: E402
from test_hf_models import tiny  # noqa: E402


def dataset(n=16):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n, 12), generator=gen)
    labels = (ids[:, 0] < 25).long()  # learnable from the first token
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


def trainer_for(model, out, max_steps, callback):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.0, save_strategy="steps", save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback])


def eval_loss(model, data):
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_trainer_runs_init_trains_vectors_and_checkpoints_the_adapter(tmp_path):
    model, _ = tiny("bert")
    g.apply_giva(model, g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    random_A = model.bert.encoder.layer[0].attention.self.query.A.clone()
    loss_before = eval_loss(model, dataset())
    callback = GiVAInitCallback(progress=False)
    trainer = trainer_for(model, tmp_path, 6, callback)
    trainer.train()

    assert callback.initialised
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.A, random_A)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(n.endswith(("lambda_s", "lambda_o")) or n.startswith("classifier.")
               for n, p in model.named_parameters() if p.requires_grad)
    assert eval_loss(model, dataset()) < loss_before

    # The last checkpoint's adapter rebuilds the trained model on the pretrained one.
    adapter = tmp_path / "checkpoint-6" / ADAPTER_DIR
    assert (tmp_path / "checkpoint-3" / ADAPTER_DIR).is_dir() and adapter.is_dir()
    batch = {k: torch.stack([d[k] for d in dataset()[:4]]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(g.load_adapter(tiny("bert")[0], adapter)(**batch).logits, expected)
    # The Trainer's checkpoints hold the adapter and the head, not the frozen base; after training
    # its own save_model writes the whole GiVA model again.
    saved = set(safetensors.torch.load_file(tmp_path / "checkpoint-6" / "model.safetensors"))
    assert saved == {k for k in model.state_dict() if ".adapters." in k or k.startswith("classifier.")}
    trainer.save_model(str(tmp_path / "final"))
    assert set(safetensors.torch.load_file(tmp_path / "final" / "model.safetensors")) == set(model.state_dict())


def test_resumed_run_keeps_the_checkpoint_bases(tmp_path):
    model, _ = tiny("bert")
    g.apply_giva(model, g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    trainer_for(model, tmp_path, 3, GiVAInitCallback(progress=False)).train()
    trained_A = model.bert.encoder.layer[1].output.dense.A.clone()

    fresh, _ = tiny("bert")
    g.apply_giva(fresh, g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    callback = GiVAInitCallback(progress=False)
    trainer_for(fresh, tmp_path, 4, callback).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert not callback.initialised
    assert torch.equal(fresh.bert.encoder.layer[1].output.dense.A, trained_A)


def test_a_run_resumed_from_an_adapter_only_checkpoint_equals_the_uninterrupted_run(tmp_path, caplog):
    """6 steps in one go, and 3 steps resumed from the first run's adapter-only checkpoint-3 on a
    freshly loaded pretrained model: the same vectors and head, bit for bit, and no warning about
    the missing (frozen) keys."""
    model, _ = tiny("bert")
    g.apply_giva(model, g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    trainer_for(model, tmp_path / "a", 6, GiVAInitCallback(progress=False)).train()
    fresh, _ = tiny("bert")
    g.apply_giva(fresh, g.GiVAConfig(r=2, modules_to_save=["classifier"]))
    with caplog.at_level("WARNING"):
        trainer_for(fresh, tmp_path / "b", 6, GiVAInitCallback(progress=False)).train(
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
    trained = {k: v for k, v in model.state_dict().items() if ".adapters." in k or k.startswith("classifier.")}
    for key, value in trained.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_callback_refuses_a_model_without_giva(tmp_path):
    model, _ = tiny("bert")
    with pytest.raises(ValueError, match="no GiVA adapter"):
        trainer_for(model, tmp_path, 1, GiVAInitCallback(progress=False)).train()


def test_callback_on_a_model_whose_encoder_alone_is_adapted(tmp_path):
    """apply_giva(model.bert) and the Trainer on the whole model: the callback inits through the
    classification head and checkpoints the encoder's adapter, which loads onto a fresh encoder."""
    model, _ = tiny("bert")
    g.apply_giva(model.bert, g.GiVAConfig(r=2))
    random_A = model.bert.encoder.layer[0].attention.self.query.A.clone()
    callback = GiVAInitCallback(progress=False)
    trainer_for(model, tmp_path, 3, callback).train()
    assert callback.initialised
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.A, random_A)
    fresh, _ = tiny("bert")
    g.load_adapter(fresh.bert, tmp_path / "checkpoint-3" / ADAPTER_DIR)
    for name, layer in g.giva_layers(fresh.bert).items():
        assert torch.equal(layer.lambda_o, g.giva_layers(model.bert)[name].lambda_o), name
