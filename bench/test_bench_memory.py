"""Memory, measured rather than timed (JSON rows without timings):

- one adapted layer: the bytes autograd saves for backward (saved_tensors_hooks; parameters and
  buffers not counted, they exist anyway) and the peak of one forward+backward (_cases.PEAK_METHOD);
- a training step of all-MiniLM-L6-v2: the same for the whole model, after one warm step (so the
  optimizer state already exists, as in every later step);
- the adapter file on disk: GiVA r=8 (save_adapter) vs PEFT LoRA r=8 and PEFT VeRA r=256
  (save_pretrained, safetensors) on the same model and layers, fp32.
"""
import pytest
import torch

from _cases import (DTYPES, METHODS, PEAK_METHOD, PEERS, clear_grads, dtype_name, layer_inputs,
                    layer_peer, minilm_batch, minilm_model, minilm_optimizer, native_supported,
                    peak_bytes, saved_bytes, train_step, trainable)
from giva_ext import save_adapter


def test_layer_memory(record, device, layer_case, dtype, peer):
    if peer == "giva-native" and not native_supported(device, dtype):
        pytest.skip(f"no native GiVA op for {device.type} {dtype_name(dtype)}")
    base, x, grad_y = layer_inputs(layer_case, dtype, device)
    module = layer_peer(peer, base, layer_case.r)
    saved, y = saved_bytes(lambda: module(x), [module])
    y.backward(grad_y)  # also the warm-up of the measured step
    del y
    clear_grads(x, module)
    peak = peak_bytes(lambda: module(x).backward(grad_y), device)
    clear_grads(x, module)
    record(f"memory layer {dtype_name(dtype)} {layer_case}", bench="memory-layer", peer=peer,
           label=PEERS[peer], n_in=layer_case.n_in, n_out=layer_case.n_out, T=layer_case.T,
           r=layer_case.r, dtype=dtype_name(dtype), device=device.type, saved_bytes=saved,
           peak_bytes=peak, peak_method=PEAK_METHOD[device.type])


@pytest.mark.usefixtures("minilm")
@pytest.mark.parametrize("method", list(METHODS))
def test_train_step_memory(record, size, device, method):
    dtype = DTYPES[device.type][0]
    batch = minilm_batch(size.batch, device)
    model = minilm_model(method, device, dtype, batch)
    optimizer = minilm_optimizer(model)
    train_step(model, optimizer, batch)
    saved, loss = saved_bytes(lambda: model(**batch).loss, [model])
    loss.backward()
    del loss
    clear_grads(model)
    peak = peak_bytes(lambda: train_step(model, optimizer, batch), device)
    record(f"memory train step all-MiniLM-L6-v2 {dtype_name(dtype)}", bench="memory-train",
           method=method, label=METHODS[method][0], batch=list(size.batch), dtype=dtype_name(dtype),
           device=device.type, trainable=trainable(model), saved_bytes=saved, peak_bytes=peak,
           peak_method=PEAK_METHOD[device.type])


@pytest.mark.usefixtures("minilm")
@pytest.mark.parametrize("method", [m for m in METHODS if m != "frozen"])
def test_adapter_file(record, size, device, method, tmp_path):
    model = minilm_model(method, device, torch.float32, minilm_batch(size.init_batch, device))
    if method.startswith("giva"):
        save_adapter(model, tmp_path)
    else:
        model.save_pretrained(tmp_path)  # safetensors; VeRA includes its shared projections
    files = {p.name: p.stat().st_size for p in sorted(tmp_path.iterdir())}
    record("adapter files all-MiniLM-L6-v2 float32", bench="file", method=method,
           label=METHODS[method][0], r=METHODS[method][1], trainable=trainable(model),
           weights_bytes=sum(b for name, b in files.items() if name.endswith(".safetensors")),
           total_bytes=sum(files.values()), files=files)
