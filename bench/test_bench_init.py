"""Init cost, from gradient batches to the bases, r=8 VrU2r (2r singular directions).

One n x n layer, INIT_BATCHES batches of planted gradients (bench/init_sketch.py): the streamed
sketch (init_bases' default), the dense gradient + giva's randomized SVD (svd="dense"), the dense
gradient + torch.svd_lowrank (the authors' and PEFT LoRA-GA's choice) and the dense gradient + exact
SVD, the baseline of the ratios; with what each holds per layer and how close its directions come to
the exact ones. Then the whole init_bases on all-MiniLM-L6-v2 (36 layers), sketch vs dense."""
import functools

import pytest
import torch

from _cases import DTYPES, INIT_BATCHES, Step, dtype_name, minilm_batch, minilm_model, timed
from giva_ext import init_bases
from giva_ext.rsvd import GradientSketch
from init_sketch import INIT_METHODS, exact_svd, make_batches, mean_cosine

R = 8
NEEDED = 2 * R  # VrU2r uses right vectors 0..r-1 and left vectors r..2r-1


@functools.lru_cache(maxsize=1)  # the methods of one n run back to back
def layer_data(n: int, tokens: int, device: torch.device):
    """The gradient batches of one n x n layer and the exact triplets to compare against."""
    data = [(x.to(device), g.to(device)) for x, g in make_batches(n, tokens, INIT_BATCHES)]
    return data, exact_svd(data, NEEDED)


@pytest.mark.parametrize("method", list(INIT_METHODS))
def test_init_layer(benchmark, size, device, init_n, method):
    data, (U, _, V) = layer_data(init_n, size.init_tokens, device)
    U_m, _, V_m = (U, None, V) if method == "dense+exact" else INIT_METHODS[method](data, NEEDED)
    held = GradientSketch.floats(init_n, init_n, 2 * NEEDED + 1) if method == "sketch" else init_n ** 2
    benchmark.group = f"init layer {init_n}x{init_n}"
    benchmark.extra_info.update(
        bench="init-layer", method=method, n=init_n, r=R, tokens=size.init_tokens, batches=INIT_BATCHES,
        device=device.type, threads=torch.get_num_threads(), held_bytes=held * 4,
        cos_right=mean_cosine(V_m[:, :R], V[:, :R]), cos_left=mean_cosine(U_m[:, R:], U[:, R:]))
    timed(benchmark, Step(lambda: INIT_METHODS[method](data, NEEDED)), size, device)


@pytest.mark.usefixtures("minilm")
@pytest.mark.parametrize("svd", ["sketch", "dense"])
def test_init_model(benchmark, size, device, svd):
    dtype = DTYPES[device.type][0]
    batches = [minilm_batch(size.init_batch, device, seed=i) for i in range(INIT_BATCHES)]
    model = minilm_model("giva", device, dtype, batches[0])
    benchmark.group = f"init all-MiniLM-L6-v2 {dtype_name(dtype)}"
    benchmark.extra_info.update(
        bench="init-model", method=svd, r=R, batches=INIT_BATCHES, batch=list(size.init_batch),
        dtype=dtype_name(dtype), device=device.type, threads=torch.get_num_threads())
    timed(benchmark, Step(lambda: init_bases(model, batches, num_batches=INIT_BATCHES, svd=svd,
                                             progress=False)), size, device)
