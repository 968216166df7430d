// giva::sketch_update and giva::rsvd (docs/design.md §2, "Gradient sketch"). Both are a handful of GEMMs
// and small dense factorisations, so one device-agnostic ATen implementation (csrc/cpu/sketch.cpp)
// serves both devices: on CUDA the GEMMs run in cuBLAS and the factorisations in cuSOLVER.
// csrc/cuda/sketch.cu only registers it for CUDA, with a device guard and CUDA's dtypes.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace giva {

// (Y + g^T (x omega), Z + (g psi^T)^T x); x (T, in) and g (T, out) of a dtype in `dtypes` on
// `device`; omega (in, k), psi (k', out), Y (out, k), Z (k', in) in the accumulator dtype (float64
// for float64 data, else float32). Blocks of `block_bytes` of x are converted and multiplied at a
// time, so no temporary grows with T.
std::tuple<at::Tensor, at::Tensor> sketch_update_impl(
    const at::Tensor& x, const at::Tensor& g, const at::Tensor& omega, const at::Tensor& psi,
    const at::Tensor& Y, const at::Tensor& Z, at::DeviceType device,
    c10::ArrayRef<at::ScalarType> dtypes, int64_t block_bytes);

// Top-k singular triplets (U, S, V) of A (m, n) or a batch (L, m, n) from the test matrix omega
// (..., n, l), k <= l <= min(m, n), with niter power iterations. A's dtype is float32 or float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_impl(const at::Tensor& A,
                                                         const at::Tensor& omega, int64_t k,
                                                         int64_t niter, at::DeviceType device);

}  // namespace giva
