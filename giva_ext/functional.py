"""giva_linear: the one entry point for the layer's math; picks the native op or the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops, reference


# The half precisions beside which the trainable vectors may stay float32.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def _composite(x, weight, bias, A, B, lambda_s, lambda_o, adapter_input):
    """Plain autograd graph: used when a frozen tensor requires grad or adapter dropout is active.
    Float32 vectors beside half-precision x are used in x's dtype (their gradients come back in
    float32 through the cast)."""
    lambda_s, lambda_o = lambda_s.to(x.dtype), lambda_o.to(x.dtype)
    s = adapter_input @ A.t()
    return F.linear(x, weight, bias).addmm(s * lambda_s, (B * lambda_o[:, None]).t())


def giva_linear(x, weight, bias, A, B, lambda_s, lambda_o, dropout: float = 0.0, training: bool = False):
    """y = x W^T + bias + lambda_o * ((lambda_s * (x' A^T)) B^T) for x of any leading shape.

    x' is x after dropout (adapter input only).  The native fused op runs when it is loaded, supports
    x's device and dtype, the frozen tensors need no grad and dropout is inactive; otherwise the
    reference runs (same math, same saved tensors) or, for dropout or trainable frozen tensors, the
    plain autograd composite.
    """
    # The weights are cast to x's dtype (autocast hands a bf16 x to an fp32 layer), so x's dtype
    # must be a float one, and x's features the layer's: checked here, where the message can say so.
    if not x.is_floating_point():
        raise TypeError(f"giva_linear: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"giva_linear: x has shape {tuple(x.shape)}; its last dimension must be the "
                         f"layer's in_features, {weight.shape[1]}")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    dtype = x.dtype
    # Per layer and step: skip the no-op casts (a Python round trip each).
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if A.dtype != dtype or B.dtype != dtype:
        A, B = A.to(dtype), B.to(dtype)
    # The vectors stay float32 beside float16 / bfloat16 x (the ops take them so: the optimizer's
    # float32 parameters, and their gradients formed in float32); any other mismatch is cast.
    vector_dtype = torch.float32 if lambda_s.dtype == torch.float32 and dtype in HALF_DTYPES else dtype
    if lambda_s.dtype != vector_dtype or lambda_o.dtype != vector_dtype:
        lambda_s, lambda_o = lambda_s.to(vector_dtype), lambda_o.to(vector_dtype)
    frozen_need_grad = torch.is_grad_enabled() and (
        weight.requires_grad or A.requires_grad or B.requires_grad
        or (bias is not None and bias.requires_grad))
    use_dropout = training and dropout > 0.0
    if frozen_need_grad or use_dropout:
        adapter_input = F.dropout(x2, dropout, training=True) if use_dropout else x2
        y = _composite(x2, weight, bias, A, B, lambda_s, lambda_o, adapter_input)
    elif ops.supports(x2):
        y = ops.linear(x2, weight, bias, A, B, lambda_s, lambda_o)
    else:
        y = reference.linear(x2, weight, bias, A, B, lambda_s, lambda_o)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def mixed_giva_linear(x, weight, bias, A, B, lambda_s, lambda_o, row_ids):
    """Inference-only layer output where row i of x (its first dimension) uses adapter row_ids[i]
    of the lists A, B, lambda_s, lambda_o (one entry per adapter), or none where row_ids[i] == -1.

    The base GEMM runs once for the whole batch; each adapter's shrink and expand run on its own
    rows (giva::mixed_linear when the native op fits x, else the reference).
    """
    if x.dim() < 2:
        raise ValueError(f"a mixed-adapter batch needs x with a batch dimension, got shape {tuple(x.shape)}")
    if row_ids.dim() != 1 or row_ids.dtype != torch.long:
        raise ValueError(f"adapter ids must be a 1-D int64 tensor, got {row_ids.dtype} of shape "
                         f"{tuple(row_ids.shape)}")
    if row_ids.device != x.device:
        raise ValueError(f"adapter ids are on {row_ids.device} but the input is on {x.device}")
    if row_ids.numel() != x.shape[0]:
        raise ValueError(f"{row_ids.numel()} adapter ids for a batch of {x.shape[0]} rows "
                         f"(input shape {tuple(x.shape)})")
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in (*lambda_s, *lambda_o))):
        raise RuntimeError("mixed-adapter batches are inference-only: run them under torch.no_grad() "
                           "or torch.inference_mode()")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    per_row = x2.shape[0] // x.shape[0] if x.shape[0] else 1
    # expand + reshape: repeat_interleave would read its output size on the host (a CUDA sync)
    token_ids = row_ids if per_row == 1 else row_ids.unsqueeze(1).expand(-1, per_row).reshape(-1)
    def cast(tensors, keep=()):  # serving calls this per layer and step: skip the no-op casts
        return [t if t.dtype == x.dtype or t.dtype in keep else t.to(x.dtype) for t in tensors]

    vectors_ok = (torch.float32,) if x.dtype in HALF_DTYPES else ()  # as in giva_linear
    args = (x2, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
            cast(A), cast(B), cast(lambda_s, vectors_ok), cast(lambda_o, vectors_ok), token_ids)
    y = (torch.ops.giva.mixed_linear(*args) if ops.supports_mixed(x2) else reference.mixed_linear(*args))
    return y.reshape(*lead, y.shape[-1])
