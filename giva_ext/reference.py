"""Pure-PyTorch reference of every GiVA op: the oracle for tests and the fallback without _C.

Shapes: x is (T, in), weight is (out, in), bias is (out,) or None, A is (r, in), B is (out, r),
lambda_s is (r,), lambda_o is (out,).  The math is docs/design.md §2: the vectors fold into the bases,

    A' = diag(lambda_s) A,   B'' = diag(lambda_o) B,   y = x W^T + bias + (x A'^T) B''^T,

and the only activation backward needs is s = x A^T (T, r).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def saved_s_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of s = x A^T for x of ``dtype``: float32 beside float16 x, else x's dtype. s sums
    ``in`` products and passes float16's 65504 where the layer's output does not (x = 3000 into
    in = 1024 with A = 1/32), and inf times lambda_o = 0 would make the output NaN; bfloat16 has
    float32's range. Every path (this reference, the CPU and CUDA ops, the fake) keeps this rule."""
    return torch.float32 if dtype == torch.float16 else dtype


def adapter_forward(x, y_base, A, B, lambda_s, lambda_o):
    """Returns (y_base + (s * lambda_s) B''^T, s) with s = x A^T, both in saved_s_dtype(x.dtype)
    until the sum is rounded once to x's dtype: with lambda_o = 0 the output is y_base exactly.
    y_base is the frozen layer's output; x is what the adapter reads (x, or x after dropout)."""
    acc = saved_s_dtype(x.dtype)
    s = x.to(acc) @ A.to(acc).t()
    y = torch.addmm(y_base.to(acc), s * lambda_s.to(acc), (B.to(acc) * lambda_o.to(acc)[:, None]).t())
    return y.to(x.dtype), s


def linear_forward(x, weight, bias, A, B, lambda_s, lambda_o):
    """Returns (y, s): the layer output (T, out) and s = x A^T (T, r), the tensor saved for backward
    (in saved_s_dtype(x.dtype)). The vectors may be float32 beside half-precision x."""
    return adapter_forward(x, F.linear(x, weight, bias), A, B, lambda_s, lambda_o)


def adapter_backward(grad_y, s, A, B, lambda_s, lambda_o, output_mask=(True, True, True),
                     base_grad_x=None):
    """The backward of adapter_forward's y for the adapter's inputs: (grad_x, grad_lambda_s,
    grad_lambda_o), an entry None where output_mask is False (y_base's gradient is grad_y itself).

    With M = g^T s (out, r):  grad lambda_o = (M * B) lambda_s,  grad lambda_s = (M * B)^T lambda_o,
    grad x = base_grad_x + ((g B'') * lambda_s) A  (base_grad_x: the frozen layer's part, or None).
    """
    need_x, need_s, need_o = output_mask
    grad_x = grad_lambda_s = grad_lambda_o = None
    vector_dtype = lambda_s.dtype  # the gradients' dtype; computed in s's (grad_y's, or fp32 beside fp16)
    if need_x:
        ls, lo = lambda_s.to(grad_y.dtype), lambda_o.to(grad_y.dtype)
        gb = grad_y @ (B * lo[:, None])
        grad_x = (gb * ls) @ A if base_grad_x is None else base_grad_x.addmm(gb * ls, A)
    if need_s or need_o:
        acc = s.dtype  # M = g^T s sums T products: in float32 beside float16, like s
        mb = (grad_y.t().to(acc) @ s) * B.to(acc)
        if need_s:
            grad_lambda_s = (mb.t() @ lambda_o.to(acc)).to(vector_dtype)
        if need_o:
            grad_lambda_o = (mb @ lambda_s.to(acc)).to(vector_dtype)
    return grad_x, grad_lambda_s, grad_lambda_o


def linear_backward(grad_y, s, weight, A, B, lambda_s, lambda_o, output_mask=(True, True, True)):
    """Returns (grad_x, grad_lambda_s, grad_lambda_o) of linear_forward's y; an entry is None where
    output_mask is False. grad x = g W + ((g B'') * lambda_s) A; the rest as adapter_backward."""
    return adapter_backward(grad_y, s, A, B, lambda_s, lambda_o, output_mask,
                            grad_y @ weight if output_mask[0] else None)


def mixed_linear(x, weight, bias, A, B, lambda_s, lambda_o, token_ids):
    """y = x W^T + bias, plus on each row t the adapter token_ids[t] (-1: none) of the lists A, B,
    lambda_s, lambda_o (one entry per adapter; ranks may differ). Each adapter runs on its rows.
    (The native op checks the ids itself; this is the one other path they reach.)"""
    if token_ids.numel() and not -1 <= int(token_ids.min()) <= int(token_ids.max()) < len(A):
        raise ValueError(f"adapter ids must be in [-1, {len(A)}) for {len(A)} adapters, got ids from "
                         f"{int(token_ids.min())} to {int(token_ids.max())}")
    y = F.linear(x, weight, bias)
    for i, adapter in enumerate(zip(A, B, lambda_s, lambda_o)):
        rows = (token_ids == i).nonzero().squeeze(1)
        if rows.numel():
            y_rows, _ = linear_forward(x[rows], weight, bias, *adapter)
            y = y.index_copy(0, rows, y_rows)
    return y


def delta_weight(A, B, lambda_s, lambda_o):
    """The adapter's weight update diag(lambda_o) B diag(lambda_s) A, shape (out, in)."""
    return (B * lambda_o[:, None]) @ (A * lambda_s[:, None])


def backward_through_s(grad_y, grad_s, A, output_mask, backward):
    """The backward of a forward returning (y, s), where s = x A^T is an output saved for backward:
    (grad_x, grad_lambda_s, grad_lambda_o). grad_y goes through ``backward(grad_y, output_mask)``
    (the layer's or the adapter's backward, reference or native). grad_s, s's own gradient, is not
    None only in a double backward that differentiates through the saved s (create_graph: the first
    backward's graph holds s, so its dependence on x must reach x too): it adds grad_s A to grad x.
    Either gradient may be None."""
    grad_x = grad_lambda_s = grad_lambda_o = None
    if grad_y is not None and any(output_mask):
        grad_x, grad_lambda_s, grad_lambda_o = backward(grad_y, list(output_mask))
    if grad_s is not None and output_mask[0]:
        through_s = (grad_s @ A.to(grad_s.dtype)).to(A.dtype)  # s may be float32 beside x's dtype
        grad_x = through_s if grad_x is None else grad_x + through_s
    return grad_x, grad_lambda_s, grad_lambda_o


class _ReferenceLinear(torch.autograd.Function):
    """Autograd around the reference layer (``fused``: x W^T + bias + the adapter) or the adapter
    alone on a given base output (``frozen`` = (y_base,)): saves only s beside the frozen tensors,
    like the native ops. s is an output (then dropped), so that a double backward, whose graph
    holds s, reaches x."""

    @staticmethod
    def forward(ctx, x, A, B, lambda_s, lambda_o, fused: bool, *frozen):
        if fused:
            weight, bias = frozen
            y, s = linear_forward(x, weight, bias, A, B, lambda_s, lambda_o)
        else:
            y, s = adapter_forward(x, frozen[0], A, B, lambda_s, lambda_o)
        ctx.fused = fused
        ctx.set_materialize_grads(False)  # s's gradient stays None unless a double backward needs it
        ctx.save_for_backward(s, A, B, lambda_s, lambda_o, *(frozen[:1] if fused else ()))
        return y, s

    @staticmethod
    def backward(ctx, grad_y, grad_s):
        s, A, B, lambda_s, lambda_o, *weight = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])

        def through(g, m):
            if ctx.fused:
                return linear_backward(g, s, weight[0], A, B, lambda_s, lambda_o, m)
            return adapter_backward(g, s, A, B, lambda_s, lambda_o, m)

        grads = backward_through_s(grad_y, grad_s, A, mask, through)
        grad_base = grad_y if not ctx.fused and ctx.needs_input_grad[6] else None
        frozen_grads = (None, None) if ctx.fused else (grad_base,)
        return grads[0], None, None, grads[1], grads[2], None, *frozen_grads


def linear(x, weight, bias, A, B, lambda_s, lambda_o):
    """Differentiable reference layer on 2-D x; gradients flow to x, lambda_s and lambda_o only
    (to any order: the backward is made of differentiable torch ops)."""
    return _ReferenceLinear.apply(x, A, B, lambda_s, lambda_o, True, weight, bias)[0]


def adapter(x, y_base, A, B, lambda_s, lambda_o):
    """Differentiable reference of y_base + the adapter term on 2-D x; gradients flow to x (the
    adapter's part), y_base (grad_y itself), lambda_s and lambda_o."""
    return _ReferenceLinear.apply(x, A, B, lambda_s, lambda_o, False, y_base)[0]


# ---- gradient sketch and randomized SVD (docs/design.md §2, "Gradient sketch") ----------------------------

# Rows of x and g a sketch update converts and multiplies at a time: its temporaries are
# (rows, in), (rows, out) and (rows, k) whatever the number of tokens T.
SKETCH_BLOCK_ROWS = 1024


def sketch_accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 sketches for float64 data, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sketch_update(x, g, omega, psi, Y, Z):
    """Returns (Y + g^T (x omega), Z + (g psi^T)^T x) for one layer's input x (T, in) and output
    gradient g (T, out): omega is (in, k), psi (k', out), Y (out, k), Z (k', in). The products run
    over blocks of rows in the accumulators' dtype (fp32 for fp16/bf16 data)."""
    acc = Y.dtype
    Y, Z = Y.clone(), Z.clone()
    for t0 in range(0, x.shape[0], SKETCH_BLOCK_ROWS):
        xb = x[t0:t0 + SKETCH_BLOCK_ROWS].to(acc)
        gb = g[t0:t0 + SKETCH_BLOCK_ROWS].to(acc)
        Y.addmm_(gb.t(), xb @ omega)
        Z.addmm_((gb @ psi.t()).t(), xb)
    return Y, Z


# CholeskyQR2 is accepted when Q^T Q is this close to the identity (float64), else Householder QR.
ORTHONORMAL_TOL = 1e-10


def _cholesky_qr(y):
    """Q = y R^-1 with R^T R = y^T y, or None if the Cholesky factorisation fails."""
    r, info = torch.linalg.cholesky_ex(y.mT @ y, upper=True)
    if info.any():
        return None
    return torch.linalg.solve_triangular(r, y, upper=True, left=False)


def orthonormalize(y):
    """An orthonormal basis of the columns of y (..., m, l), in y's dtype.

    CholeskyQR2 in float64 (two Cholesky passes: GEMMs and an l x l factorisation, no
    column-by-column Householder sweep); Householder QR when y is too ill-conditioned or rank
    deficient for it (the Cholesky fails or Q comes out non-orthonormal)."""
    y64 = y.to(torch.float64)
    q = _cholesky_qr(y64)
    q = None if q is None else _cholesky_qr(q)
    if q is not None:
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        if not (q.mT @ q - eye).abs().max() <= ORTHONORMAL_TOL:  # "not <=" catches NaN too
            q = None
    if q is None:
        q = torch.linalg.qr(y64).Q
    return q.to(y.dtype)


def rsvd(A, omega, k: int, niter: int):
    """Top-k singular triplets of A (m, n) or a batch (L, m, n): returns U (..., m, k), S (..., k),
    V (..., n, k) in A's dtype. omega (..., n, l), l >= k, is the random test matrix; each of the
    niter power iterations re-orthonormalises; the small SVD of Q^T A (l x n) runs in float64."""
    q = orthonormalize(A @ omega)
    for _ in range(niter):
        q = orthonormalize(A @ orthonormalize(A.mT @ q))
    u, s, vh = torch.linalg.svd((q.mT @ A).to(torch.float64), full_matrices=False)
    return (q @ u[..., :k].to(A.dtype), s[..., :k].to(A.dtype), vh[..., :k, :].mT.to(A.dtype))
