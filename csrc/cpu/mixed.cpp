// CPU registration of giva::mixed_linear (the implementation is in mixed.h).
#include <torch/library.h>

#include <array>

#include "mixed.h"

namespace giva {
namespace {

constexpr std::array<at::ScalarType, 3> kDtypes = {at::kFloat, at::kBFloat16, at::kDouble};

at::Tensor mixed_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::TensorList A,
                            at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                            const at::Tensor& token_ids) {
  return mixed_linear_impl(x, weight, bias, A, B, lambda_s, lambda_o, token_ids, at::kCPU, kDtypes,
                           /*parallel=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(giva, CPU, m) { m.impl("mixed_linear", &mixed_linear_cpu); }

}  // namespace giva
