"""Hugging Face Trainer integration: the gradient init on the Trainer's own data, adapter checkpoints.

    model = apply_giva(model, GiVAConfig(r=8, modules_to_save=["classifier"]))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[GiVAInitCallback()])
    trainer.train()

The Trainer's optimizer sees only what requires grad (the lambda vectors and modules_to_save). While
the Trainer trains, its own checkpoints (model.safetensors) hold only the adapter: the GiVA tensors
("...query.adapters.default.A", "...lambda_s", ...) and whatever else trains (modules_to_save), not
the frozen base. resume_from_checkpoint works as usual: the Trainer loads them onto the pretrained
model it was built with. Each checkpoint folder also gets the adapter in ``giva_adapter/``
(save_adapter's format, loadable with load_adapter onto the pretrained model). From the Trainer's
creation to the end of train(), save_pretrained and trainer.save_model save the adapter alone too;
after train() they save the whole model again; for a plain transformers checkpoint,
merge_and_unload first.
"""
from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .init import init_bases
from .model import get_config
from .serialization import save_adapter

ADAPTER_DIR = "giva_adapter"


_NOT_HIDING = object()  # the callback has not replaced the model's _keys_to_ignore_on_save


def _frozen_keys(model) -> set[str]:
    """The state_dict keys of everything but the GiVA adapters and the parameters that train."""
    training = {name for name, p in model.named_parameters() if p.requires_grad}
    return {key for key in model.state_dict() if ".adapters." not in f".{key}" and key not in training}


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
        self._ignored_before = _NOT_HIDING

    def _hide_frozen_base(self, model) -> None:
        # Checkpoints without the frozen base: save_pretrained skips _keys_to_ignore_on_save, and a
        # resume that finds exactly those keys missing loads the rest without a warning. Set when
        # the Trainer is created (a resume loads its checkpoint before training begins) and at each
        # train(); the model's own list comes back when training ends.
        if self._ignored_before is _NOT_HIDING:
            self._ignored_before = getattr(model, "_keys_to_ignore_on_save", None)
            model._keys_to_ignore_on_save = set(self._ignored_before or ()) | _frozen_keys(model)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._hide_frozen_base(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._ignored_before is not _NOT_HIDING:
            model._keys_to_ignore_on_save = self._ignored_before
            self._ignored_before = _NOT_HIDING

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._hide_frozen_base(model)
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
