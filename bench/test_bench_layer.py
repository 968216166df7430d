"""One adapted linear layer against its peers: forward (no grad) and forward+backward (x requires
grad, like a hidden activation; gradients set to None before each step), every peer of a case in the
same run, back to back, each in alternation with the frozen nn.Linear (the floor): the report
divides each median by the floor's timed alongside it, and by PEFT LoRA's ratio."""
import pytest
import torch

from _cases import (PEERS, dtype_name, layer_inputs, layer_peer, layer_step, native_supported,
                    peer_impl, timed, trainable)


def test_layer(benchmark, size, device, layer_case, dtype, mode, peer):
    if peer == "giva-native" and not native_supported(device, dtype):
        pytest.skip(f"no native GiVA op for {device.type} {dtype_name(dtype)}")
    base, x, grad_y = layer_inputs(layer_case, dtype, device)
    module = layer_peer(peer, base, layer_case.r)
    benchmark.group = f"layer {mode} {dtype_name(dtype)} {layer_case}"
    benchmark.extra_info.update(
        bench="layer", mode=mode, peer=peer, label=PEERS[peer], impl=peer_impl(peer),
        n_in=layer_case.n_in, n_out=layer_case.n_out, T=layer_case.T, r=layer_case.r,
        dtype=dtype_name(dtype), device=device.type, threads=torch.get_num_threads(),
        trainable=trainable(module))
    floor = None if peer == "frozen" else layer_step(base, mode, x, grad_y)
    timed(benchmark, layer_step(module, mode, x, grad_y), size, device, floor)
