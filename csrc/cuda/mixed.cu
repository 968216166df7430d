// CUDA registration of giva::mixed_linear: the ATen implementation of csrc/cpu/mixed.h on the
// caller's stream (groups in sequence, GEMMs on cuBLAS, rows of short runs gathered per adapter;
// token_ids are read on the host once).
#include <torch/library.h>

#include "../cpu/mixed.h"
#include "runtime.h"

namespace giva {
namespace {

at::Tensor mixed_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::TensorList A,
                             at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                             const at::Tensor& token_ids) {
  // x off the GPU is reported by the argument check, not by the guard.
  const DeviceGuard device_guard(
      x.device().type() == kDevice ? std::optional<c10::Device>(x.device()) : std::nullopt);
  return mixed_linear_impl(x, weight, bias, A, B, lambda_s, lambda_o, token_ids, kDevice, kCudaDtypes,
                           /*parallel=*/false, GatherRows{});
}

}  // namespace

#ifndef GIVA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(giva, CUDA, m) { m.impl("mixed_linear", &mixed_linear_cuda); }
#endif

}  // namespace giva
