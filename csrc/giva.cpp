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
}
