// CUDA registration of giva::sketch_update and giva::rsvd. The implementation is the
// device-agnostic one in csrc/cpu/sketch.cpp (compiled into the same library): its work is GEMMs
// with k or k' columns and small factorisations, which cuBLAS and cuSOLVER run as well as a
// hand-written kernel would, so this file adds only a device guard, CUDA's dtypes and a block
// size that suits GPU memory.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <torch/library.h>

#include "../cpu/sketch.h"
#include "runtime.h"

namespace giva {
namespace {

// Larger blocks than on the CPU: fewer, fuller GEMMs; still independent of T.
constexpr int64_t kBlockBytes = 64 << 20;

std::tuple<at::Tensor, at::Tensor> sketch_update_cuda(const at::Tensor& x, const at::Tensor& g,
                                                      const at::Tensor& omega,
                                                      const at::Tensor& psi, const at::Tensor& Y,
                                                      const at::Tensor& Z) {
  // Not a CUDAGuard: x may be on the wrong device, and the check inside should say so.
  const at::OptionalDeviceGuard guard(at::device_of(x));
  return sketch_update_impl(x, g, omega, psi, Y, Z, kDevice, kCudaDtypes, kBlockBytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& A,
                                                         const at::Tensor& omega, int64_t k,
                                                         int64_t niter) {
  const at::OptionalDeviceGuard guard(at::device_of(A));
  return rsvd_impl(A, omega, k, niter, kDevice);
}

}  // namespace

TORCH_LIBRARY_IMPL(giva, CUDA, m) {
  m.impl("sketch_update", &sketch_update_cuda);
  m.impl("rsvd", &rsvd_cuda);
}

}  // namespace giva
