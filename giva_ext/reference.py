"""Pure-PyTorch reference of every GiVA op: the oracle for tests and the fallback without _C.

Shapes: x is (T, in), weight is (out, in), bias is (out,) or None, A is (r, in), B is (out, r),
lambda_s is (r,), lambda_o is (out,).  The math is DESIGN.md §2: the vectors fold into the bases,

    A' = diag(lambda_s) A,   B'' = diag(lambda_o) B,   y = x W^T + bias + (x A'^T) B''^T,

and the only activation backward needs is s = x A^T (T, r).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_forward(x, weight, bias, A, B, lambda_s, lambda_o):
    """Returns (y, s): the layer output (T, out) and s = x A^T (T, r), the tensor saved for backward."""
    s = x @ A.t()
    y = F.linear(x, weight, bias)
    y = y.addmm(s * lambda_s, (B * lambda_o[:, None]).t())
    return y, s


def linear_backward(grad_y, s, weight, A, B, lambda_s, lambda_o, output_mask=(True, True, True)):
    """Returns (grad_x, grad_lambda_s, grad_lambda_o); an entry is None where output_mask is False.

    With M = g^T s (out, r):  grad lambda_o = (M * B) lambda_s,  grad lambda_s = (M * B)^T lambda_o,
    grad x = g W + ((g B'') * lambda_s) A.
    """
    need_x, need_s, need_o = output_mask
    grad_x = grad_lambda_s = grad_lambda_o = None
    if need_x:
        gb = grad_y @ (B * lambda_o[:, None])
        grad_x = (grad_y @ weight).addmm(gb * lambda_s, A)
    if need_s or need_o:
        mb = (grad_y.t() @ s) * B
        if need_s:
            grad_lambda_s = mb.t() @ lambda_o
        if need_o:
            grad_lambda_o = mb @ lambda_s
    return grad_x, grad_lambda_s, grad_lambda_o


def delta_weight(A, B, lambda_s, lambda_o):
    """The adapter's weight update diag(lambda_o) B diag(lambda_s) A, shape (out, in)."""
    return (B * lambda_o[:, None]) @ (A * lambda_s[:, None])


class _ReferenceLinear(torch.autograd.Function):
    """Autograd around the reference: saves only s beside the frozen tensors, like the native op."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, lambda_s, lambda_o):
        y, s = linear_forward(x, weight, bias, A, B, lambda_s, lambda_o)
        ctx.save_for_backward(s, weight, A, B, lambda_s, lambda_o)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        s, weight, A, B, lambda_s, lambda_o = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[5], ctx.needs_input_grad[6])
        grad_x, grad_s, grad_o = linear_backward(grad_y, s, weight, A, B, lambda_s, lambda_o, mask)
        return grad_x, None, None, None, None, grad_s, grad_o


def linear(x, weight, bias, A, B, lambda_s, lambda_o):
    """Differentiable reference layer on 2-D x; gradients flow to x, lambda_s and lambda_o only."""
    return _ReferenceLinear.apply(x, weight, bias, A, B, lambda_s, lambda_o)
