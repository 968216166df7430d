"""giva_linear: the one entry point for the layer's math; picks the native op or the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops, reference


def _composite(x, weight, bias, A, B, lambda_s, lambda_o, adapter_input):
    """Plain autograd graph: used when a frozen tensor requires grad or adapter dropout is active."""
    s = adapter_input @ A.t()
    return F.linear(x, weight, bias).addmm(s * lambda_s, (B * lambda_o[:, None]).t())


def giva_linear(x, weight, bias, A, B, lambda_s, lambda_o, dropout: float = 0.0, training: bool = False):
    """y = x W^T + bias + lambda_o * ((lambda_s * (x' A^T)) B^T) for x of any leading shape.

    x' is x after dropout (adapter input only).  The native fused op runs when it is loaded, supports
    x's device and dtype, the frozen tensors need no grad and dropout is inactive; otherwise the
    reference runs (same math, same saved tensors) or, for dropout or trainable frozen tensors, the
    plain autograd composite.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dtype = x.dtype
    weight, A, B = weight.to(dtype), A.to(dtype), B.to(dtype)
    lambda_s, lambda_o = lambda_s.to(dtype), lambda_o.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    frozen_need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (weight, bias, A, B))
    use_dropout = training and dropout > 0.0
    if frozen_need_grad or use_dropout:
        adapter_input = F.dropout(x2, dropout, training=True) if use_dropout else x2
        y = _composite(x2, weight, bias, A, B, lambda_s, lambda_o, adapter_input)
    elif ops.supports(x2):
        y = ops.linear(x2, weight, bias, A, B, lambda_s, lambda_o)
    else:
        y = reference.linear(x2, weight, bias, A, B, lambda_s, lambda_o)
    return y.reshape(*lead, y.shape[-1])
