// Schemas of every giva op, in one place. Kernels register in csrc/cpu and csrc/cuda.
#include <torch/library.h>

TORCH_LIBRARY(giva, m) {
  // y = x W^T + bias + (lambda_s * (x A^T)) (lambda_o * B)^T on 2-D x (T, in); also returns
  // s = x A^T (T, r), the only activation the backward needs.
  m.def("linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, "
        "Tensor lambda_s, Tensor lambda_o) -> (Tensor y, Tensor s)");
  // grad_x = g W + ((g B'') * lambda_s) A, and through M = g^T s (out, r):
  // grad_lambda_s = (M * B)^T lambda_o, grad_lambda_o = (M * B) lambda_s.
  // output_mask = (grad_x, grad_lambda_s, grad_lambda_o): a masked-out output is not computed and
  // comes back undefined (None in Python), as in aten::native_layer_norm_backward.
  m.def("linear_backward(Tensor grad_y, Tensor s, Tensor weight, Tensor A, Tensor B, "
        "Tensor lambda_s, Tensor lambda_o, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The adapter alone, on a frozen layer that computes its own output (a quantized base):
  // y = base + (lambda_s * (x A^T)) (lambda_o * B)^T for base (T, out), the layer's output for x;
  // also returns s = x A^T. The base's own gradient is grad_y (the autograd passes it through).
  m.def("adapter_forward(Tensor x, Tensor base, Tensor A, Tensor B, Tensor lambda_s, "
        "Tensor lambda_o) -> (Tensor y, Tensor s)");
  // linear_backward without the frozen weight: grad_x = ((g B'') * lambda_s) A, the lambda
  // gradients through M = g^T s as above; output_mask as above.
  m.def("adapter_backward(Tensor grad_y, Tensor s, Tensor A, Tensor B, Tensor lambda_s, "
        "Tensor lambda_o, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Mixed-adapter batch (inference only): y = x W^T + bias, plus on row t the adapter
  // token_ids[t] of the lists A (r_i, in), B (out, r_i), lambda_s (r_i,), lambda_o (out,), or no
  // adapter where token_ids[t] == -1. token_ids is int64 (T,) on x's device; ranks may differ.
  m.def("mixed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor[] A, Tensor[] B, "
        "Tensor[] lambda_s, Tensor[] lambda_o, Tensor token_ids) -> Tensor");
  // Gradient sketch of one layer (docs/design.md §2): returns (Y + g^T (x omega), Z + (g psi^T)^T x)
  // for x (T, in), g (T, out), omega (in, k), psi (k', out), Y (out, k), Z (k', in). Y, Z, omega
  // and psi are float32 (float64 for float64 data); fp16/bf16 x and g accumulate in float32.
  m.def("sketch_update(Tensor x, Tensor g, Tensor omega, Tensor psi, Tensor Y, Tensor Z) "
        "-> (Tensor Y_new, Tensor Z_new)");
  // Randomized SVD: top-k (U, S, V) of A (m, n) or (L, m, n) from the test matrix omega
  // (..., n, l), k <= l <= min(m, n), with niter power iterations.
  m.def("rsvd(Tensor A, Tensor omega, int k, int niter) -> (Tensor U, Tensor S, Tensor V)");
}
