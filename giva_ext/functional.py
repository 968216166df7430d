"""giva_linear: the one entry point for the layer's math; picks the native op or the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops, reference


# The half precisions beside which the trainable vectors may stay float32.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def _composite(x, weight, bias, A, B, lambda_s, lambda_o, adapter_input):
    """Plain autograd graph: used when a frozen tensor requires grad or adapter dropout is active.
    The adapter term is the reference's (s in float32 beside float16 x); float32 vectors beside
    half-precision x get their gradients back in float32 through the casts."""
    return reference.adapter_forward(adapter_input, F.linear(x, weight, bias), A, B, lambda_s, lambda_o)[0]


class _LinearTrainableA(torch.autograd.Function):
    """The fused layer (native op or reference) with a gradient for A as well: grad A =
    (lambda_s * (g B''))^T x, one more thin product over the tokens, so x (T, in) is saved beside s.
    An input scale reaches its gradient through A = A0 diag(lambda_i). s is an output (then
    dropped), as in the op, so that a double backward reaches x and A through it."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, lambda_s, lambda_o, native: bool):
        forward = torch.ops.giva.linear_forward if native else reference.linear_forward
        y, s = forward(x, weight, bias, A, B, lambda_s, lambda_o)
        ctx.native = native
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, s, weight, A, B, lambda_s, lambda_o)
        return y, s

    @staticmethod
    def backward(ctx, grad_y, grad_s):
        x, s, weight, A, B, lambda_s, lambda_o = ctx.saved_tensors
        need_x, need_a, need_s, need_o = (ctx.needs_input_grad[i] for i in (0, 3, 5, 6))
        # With create_graph the backward itself must be differentiable: the reference's torch ops.
        native = ctx.native and not torch.is_grad_enabled()
        backward = torch.ops.giva.linear_backward if native else reference.linear_backward
        grad_x, grad_s_vector, grad_o = reference.linear_backward_through_s(
            grad_y, grad_s, s, weight, A, B, lambda_s, lambda_o, (need_x, need_s, need_o), backward)
        grad_a = None
        if need_a and grad_y is not None:
            scaled = (grad_y @ (B * lambda_o.to(B.dtype)[:, None])) * lambda_s.to(B.dtype)
            grad_a = scaled.t() @ x
        if need_a and grad_s is not None:  # s = x A^T (s may be float32 beside float16 x)
            through_s = (grad_s.t() @ x.to(grad_s.dtype)).to(A.dtype)
            grad_a = through_s if grad_a is None else grad_a + through_s
        return grad_x, None, None, grad_a, None, grad_s_vector, grad_o, None


def giva_linear(x, weight, bias, A, B, lambda_s, lambda_o, dropout: float = 0.0, training: bool = False,
                lambda_i=None):
    """y = x W^T + bias + lambda_o * ((lambda_s * ((x' * lambda_i) A^T)) B^T) for x of any leading shape.

    x' is x after dropout (adapter input only); lambda_i (in,) is the optional input scale (None:
    ones), folded into A, so the layer is the same op with A diag(lambda_i) as its A.  The native
    fused op runs when it is loaded, supports x's device and dtype, weight, bias and B need no grad
    and dropout is inactive; otherwise the reference runs (same math, same saved tensors) or, for
    dropout or a trainable weight, bias or B, the plain autograd composite. An A that needs grad
    (through lambda_i, or trained itself) takes the op too, which then also saves x (T, in) for
    A's gradient.
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
    if lambda_i is not None:
        if lambda_i.shape != (A.shape[1],):
            raise ValueError(f"giva_linear: lambda_i has shape {tuple(lambda_i.shape)}; it must be "
                             f"({A.shape[1]},), one scale per input feature")
        A = A.to(torch.promote_types(A.dtype, lambda_i.dtype)) * lambda_i  # A diag(lambda_i), (r, in)
    if A.dtype != dtype or B.dtype != dtype:
        A, B = A.to(dtype), B.to(dtype)
    # The vectors stay float32 beside float16 / bfloat16 x (the ops take them so: the optimizer's
    # float32 parameters, and their gradients formed in float32); any other mismatch is cast.
    vector_dtype = torch.float32 if lambda_s.dtype == torch.float32 and dtype in HALF_DTYPES else dtype
    if lambda_s.dtype != vector_dtype or lambda_o.dtype != vector_dtype:
        lambda_s, lambda_o = lambda_s.to(vector_dtype), lambda_o.to(vector_dtype)
    frozen_need_grad = torch.is_grad_enabled() and (
        weight.requires_grad or B.requires_grad or (bias is not None and bias.requires_grad))
    use_dropout = training and dropout > 0.0
    if frozen_need_grad or use_dropout:
        adapter_input = F.dropout(x2, dropout, training=True) if use_dropout else x2
        y = _composite(x2, weight, bias, A, B, lambda_s, lambda_o, adapter_input)
    elif torch.is_grad_enabled() and A.requires_grad:
        y = _LinearTrainableA.apply(x2, weight, bias, A, B, lambda_s, lambda_o, ops.supports(x2))[0]
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
