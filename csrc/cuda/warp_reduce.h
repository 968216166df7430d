// Integer and warp helpers shared by the kernels of csrc/cuda (linear.cu, mixed.cu).
#pragma once

#include <cstdint>

namespace giva {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One reduce-scatter step: lanes that differ in bit 4 * HALF keep one half of v[0..2 * HALF) and
// add the partner's copy of it.
template <int HALF>
__device__ __forceinline__ void trade_half(float (&v)[8], int lane) {
  const bool hi = lane & (4 * HALF);
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float keep = hi ? v[i + HALF] : v[i];
    const float send = hi ? v[i] : v[i + HALF];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4 * HALF);
  }
}

// Sums v[0..8) over the warp with 9 shuffles instead of 40; afterwards every lane holds the total
// of index lane / 4 (lane bits 4, 3, 2 pick the half kept at each step).
__device__ __forceinline__ float warp_reduce_scatter8(float (&v)[8]) {
  const int lane = threadIdx.x & 31;
  trade_half<4>(v, lane);
  trade_half<2>(v, lane);
  trade_half<1>(v, lane);
  float total = v[0];
  total += __shfl_xor_sync(0xffffffffu, total, 2);
  total += __shfl_xor_sync(0xffffffffu, total, 1);
  return total;
}

}  // namespace giva
