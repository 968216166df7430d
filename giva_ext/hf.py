"""Hugging Face Trainer integration: the gradient init on the Trainer's own data, adapter checkpoints.

    model = apply_giva(model, GiVAConfig(r=8, modules_to_save=["classifier"]))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[GiVAInitCallback()])
    trainer.train()

The Trainer's optimizer sees only what requires grad (the lambda vectors and modules_to_save), and
its own checkpoints (model.safetensors) hold the whole GiVA model (keys like "...query.base.weight",
"...query.A"), so resume_from_checkpoint works as usual; for a plain transformers checkpoint,
merge_and_unload before save_pretrained. Each checkpoint folder also gets the adapter alone in
``giva_adapter/`` (save_adapter's format, loadable with load_adapter onto the pretrained model).
"""
from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .init import init_bases
from .model import get_config
from .serialization import save_adapter

ADAPTER_DIR = "giva_adapter"


class GiVAInitCallback(TrainerCallback):
    """Sets the GiVA bases from the Trainer's train dataloader before the first step, and saves the
    adapter into every checkpoint folder.

    num_batches: gradient batches (default: the config's grad_batches), taken from the start of the
        dataloader exactly as the Trainer prepared it: under accelerate with several processes each
        process feeds its own shard, and init_bases combines the processes' gradients when a
        torch.distributed process group exists.
    loss_fn: ``loss_fn(model, batch)`` if the loss is not ``model(**batch).loss``.

    The init runs once, at the first train() of a fresh run; a run resumed from a checkpoint keeps
    the checkpoint's bases. It draws one shuffle from the dataloader, so the first epoch's order
    differs from a run without the callback (deterministically, under the Trainer's seed).
    """

    def __init__(self, num_batches: int | None = None, loss_fn=None, progress: bool = True):
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches <= 0):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        self.num_batches = num_batches
        self.loss_fn = loss_fn
        self.progress = progress
        self.initialised = False

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.initialised or state.global_step > 0:
            return
        get_config(model)  # a clear error if the Trainer's model has no GiVA adapter
        if train_dataloader is None:
            raise ValueError("GiVAInitCallback needs the Trainer's train dataloader (no train_dataset?)")
        init_bases(model, train_dataloader, self.loss_fn, num_batches=self.num_batches,
                   progress=self.progress and state.is_local_process_zero)
        self.initialised = True

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_adapter(model, os.path.join(folder, ADAPTER_DIR))
