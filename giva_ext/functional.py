"""giva_linear: the one entry point for the layer's math; picks the native op or the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops, reference


# The half precisions beside which the trainable vectors may stay float32.
HALF_DTYPES = (torch.bfloat16, torch.float16)


class _TrainableA(torch.autograd.Function):
    """The fused layer (``fused``: frozen = (weight, bias)) or the adapter on a base output
    (frozen = (y_base,)), native op or reference, with a gradient for A as well: grad A =
    (lambda_s * (g B''))^T x, one more thin product over the tokens, so x (T, in) is saved beside s.
    An input scale reaches its gradient through A = A0 diag(lambda_i). s is an output (then
    dropped), as in the ops, so that a double backward reaches x and A through it."""

    @staticmethod
    def forward(ctx, x, A, B, lambda_s, lambda_o, native: bool, fused: bool, *frozen):
        if fused:
            forward = torch.ops.giva.linear_forward if native else reference.linear_forward
        else:
            forward = torch.ops.giva.adapter_forward if native else reference.adapter_forward
        y, s = forward(x, *frozen, A, B, lambda_s, lambda_o)
        ctx.native, ctx.fused = native, fused
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, s, A, B, lambda_s, lambda_o, *(frozen[:1] if fused else ()))
        return y, s

    @staticmethod
    def backward(ctx, grad_y, grad_s):
        x, s, A, B, lambda_s, lambda_o, *weight = ctx.saved_tensors
        need_x, need_a, need_s, need_o = (ctx.needs_input_grad[i] for i in (0, 1, 3, 4))
        # With create_graph the backward itself must be differentiable: the reference's torch ops.
        native = ctx.native and not torch.is_grad_enabled()
        if ctx.fused:
            backward = torch.ops.giva.linear_backward if native else reference.linear_backward
            frozen = (weight[0],)
        else:
            backward = torch.ops.giva.adapter_backward if native else reference.adapter_backward
            frozen = ()
        grad_x, grad_s_vector, grad_o = reference.backward_through_s(
            grad_y, grad_s, A, (need_x, need_s, need_o),
            lambda g, mask: backward(g, s, *frozen, A, B, lambda_s, lambda_o, mask))
        grad_a = None
        if need_a and grad_y is not None:
            scaled = (grad_y @ (B * lambda_o.to(B.dtype)[:, None])) * lambda_s.to(B.dtype)
            grad_a = scaled.t() @ x
        if need_a and grad_s is not None:  # s = x A^T (s may be float32 beside float16 x)
            through_s = (grad_s.t() @ x.to(grad_s.dtype)).to(A.dtype)
            grad_a = through_s if grad_a is None else grad_a + through_s
        # y = y_base + the adapter's term: y_base's gradient is grad_y
        frozen_grads = (None, None) if ctx.fused else (grad_y if ctx.needs_input_grad[7] else None,)
        return grad_x, grad_a, None, grad_s_vector, grad_o, None, None, *frozen_grads


def _adapter_operands(x, in_features: int, A, B, lambda_s, lambda_o, lambda_i, where: str):
    """x as 2-D and the adapter's tensors as the ops take them: A diag(lambda_i) (lambda_i folded
    in), A and B in x's dtype, the vectors in x's dtype or float32 beside half x. Checks x first,
    where the message can name the layer's in_features."""
    # The weights are cast to x's dtype (autocast hands a bf16 x to an fp32 layer), so x's dtype
    # must be a float one, and x's features the layer's: checked here, where the message can say so.
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{where}: x has shape {tuple(x.shape)}; its last dimension must be the "
                         f"layer's in_features, {in_features}")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    dtype = x.dtype
    if lambda_i is not None:
        if lambda_i.shape != (A.shape[1],):
            raise ValueError(f"{where}: lambda_i has shape {tuple(lambda_i.shape)}; it must be "
                             f"({A.shape[1]},), one scale per input feature")
        A = A.to(torch.promote_types(A.dtype, lambda_i.dtype)) * lambda_i  # A diag(lambda_i), (r, in)
    # Per layer and step: skip the no-op casts (a Python round trip each).
    if A.dtype != dtype or B.dtype != dtype:
        A, B = A.to(dtype), B.to(dtype)
    # The vectors stay float32 beside float16 / bfloat16 x (the ops take them so: the optimizer's
    # float32 parameters, and their gradients formed in float32); any other mismatch is cast.
    vector_dtype = torch.float32 if lambda_s.dtype == torch.float32 and dtype in HALF_DTYPES else dtype
    if lambda_s.dtype != vector_dtype or lambda_o.dtype != vector_dtype:
        lambda_s, lambda_o = lambda_s.to(vector_dtype), lambda_o.to(vector_dtype)
    return x2, A, B, lambda_s, lambda_o


def _as_input_shape(y, x):
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


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
    x2, A, B, lambda_s, lambda_o = _adapter_operands(x, weight.shape[1], A, B, lambda_s, lambda_o,
                                                     lambda_i, "giva_linear")
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    frozen_need_grad = torch.is_grad_enabled() and (
        weight.requires_grad or B.requires_grad or (bias is not None and bias.requires_grad))
    use_dropout = training and dropout > 0.0
    if frozen_need_grad or use_dropout:
        # Plain autograd graph; the adapter term is the reference's (s in float32 beside float16
        # x); float32 vectors beside half-precision x get their gradients back in float32.
        adapter_input = F.dropout(x2, dropout, training=True) if use_dropout else x2
        y = reference.adapter_forward(adapter_input, F.linear(x2, weight, bias), A, B, lambda_s, lambda_o)[0]
    elif torch.is_grad_enabled() and A.requires_grad:
        y = _TrainableA.apply(x2, A, B, lambda_s, lambda_o, ops.supports(x2), True, weight, bias)[0]
    elif ops.supports(x2):
        y = ops.linear(x2, weight, bias, A, B, lambda_s, lambda_o)
    else:
        y = reference.linear(x2, weight, bias, A, B, lambda_s, lambda_o)
    return _as_input_shape(y, x)


def giva_adapter(x, y_base, A, B, lambda_s, lambda_o, dropout: float = 0.0, training: bool = False,
                 lambda_i=None):
    """y = y_base + lambda_o * ((lambda_s * ((x' * lambda_i) A^T)) B^T): the adapter on the output
    y_base of a frozen layer that computes it itself (a quantized base), for x of any leading shape
    and y_base of the same leading shape. As giva_linear without the base GEMM: the native
    adapter-only op (saving s = x A^T, not x) where it fits, else the reference; dropout or a
    trainable B take the plain autograd composite, a trainable A (input scale) the op with A's
    gradient. Gradients reach x through both terms (the base's through its own autograd)."""
    x2, A, B, lambda_s, lambda_o = _adapter_operands(x, A.shape[1], A, B, lambda_s, lambda_o,
                                                     lambda_i, "giva_adapter")
    if y_base.shape[:-1] != x.shape[:-1] or y_base.shape[-1] != B.shape[0]:
        raise ValueError(f"giva_adapter: the base output has shape {tuple(y_base.shape)}; it must be "
                         f"{(*x.shape[:-1], B.shape[0])} for x of shape {tuple(x.shape)}")
    base2 = y_base.reshape(-1, y_base.shape[-1])
    if base2.dtype != x.dtype:
        base2 = base2.to(x.dtype)
    use_dropout = training and dropout > 0.0
    if use_dropout or (torch.is_grad_enabled() and B.requires_grad):
        adapter_input = F.dropout(x2, dropout, training=True) if use_dropout else x2
        y = reference.adapter_forward(adapter_input, base2, A, B, lambda_s, lambda_o)[0]
    elif torch.is_grad_enabled() and A.requires_grad:
        y = _TrainableA.apply(x2, A, B, lambda_s, lambda_o, ops.supports_adapter(x2), False, base2)[0]
    elif ops.supports_adapter(x2):
        y = ops.adapter(x2, base2, A, B, lambda_s, lambda_o)
    else:
        y = reference.adapter(x2, base2, A, B, lambda_s, lambda_o)
    return _as_input_shape(y, x)


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
