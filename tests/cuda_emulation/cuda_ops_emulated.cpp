// csrc/cuda/linear.cu and mixed.cu compiled as C++ on the CPU emulation of cuda_emulation.h and
// registered as torch.ops.giva_cuda_emulation.linear_forward / linear_backward / adapter_forward /
// adapter_backward / mixed_linear
// (schemas inferred from the C++ signatures) for tests/test_cuda_emulation.py, with each path of
// mixed_linear also on its own (mixed_linear_per_row / mixed_linear_grouped). The ops take CPU
// tensors.
#include "cuda_emulation.h"

#include "../../csrc/cuda/linear.cu"
#include "../../csrc/cuda/mixed.cu"

TORCH_LIBRARY(giva_cuda_emulation, m) {
  m.def("linear_forward", &giva::linear_forward_cuda);
  m.def("linear_backward", &giva::linear_backward_cuda);
  m.def("adapter_forward", &giva::adapter_forward_cuda);
  m.def("adapter_backward", &giva::adapter_backward_cuda);
  m.def("mixed_linear", &giva::mixed_linear_cuda);
  m.def("mixed_linear_per_row", &giva::mixed_linear_per_row);
  m.def("mixed_linear_grouped", &giva::mixed_linear_grouped);
}
