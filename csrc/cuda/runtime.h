// What the host code in csrc/cuda takes from the CUDA runtime, in one place: the device type and
// dtypes of its kernels (and their dispatch cases), a device guard, the SM count, occupancy,
// whether the current stream is being captured into a CUDA graph, and a checked launch on it.
// tests/cuda_emulation/cuda_emulation.h defines the same names on the CPU (and
// GIVA_CUDA_EMULATION, which leaves the CUDA registrations out) to run these files without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <array>

namespace giva {
constexpr std::array<at::ScalarType, 3> kCudaDtypes = {at::kFloat, at::kHalf, at::kBFloat16};
}  // namespace giva

// AT_DISPATCH_SWITCH cases for kCudaDtypes.
#define GIVA_DISPATCH_CASES(...)              \
  AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
  AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
  AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)

#ifndef GIVA_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace giva {

constexpr auto kDevice = at::kCUDA;

// Makes the given device current for the scope (none: leaves the current one).
using DeviceGuard = c10::cuda::OptionalCUDAGuard;

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads) {
  int occupancy = 1;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occupancy, kernel, threads, 0));
  return std::max(occupancy, 1);
}

// Whether the current stream is capturing a CUDA graph (host reads of device data are then
// forbidden: a captured op must take every decision from shapes alone).
inline bool stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// kernel<<<grid, threads>>>(args...) on the current stream, checked.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, int threads, Args... args) {
  kernel<<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace giva
#endif
