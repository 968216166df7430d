// CUDA registration of giva::mixed_linear (inference only): one batch whose rows use different
// adapters. Both paths fill y with bias + each row's adapter term and end in one base GEMM for the
// whole batch on cuBLAS (y += x W^T, beta = 1):
//
//   grouped  csrc/cpu/mixed.h: token_ids are read on the host (a device-to-host copy, so the
//            stream syncs); runs of rows with one adapter become GEMMs on views of x and y, the
//            rows of short runs are gathered per adapter. Best for long runs (prefill).
//   per-row  the kernels below: every row looks its adapter up on the device, so nothing is read
//            on the host and a call can be captured in a CUDA graph (a decode step). Each row
//            re-reads its adapter's A and B (from L2 when rows share adapters), so its extra work
//            grows with T r (in + out), which the grouped path's does not.
//
// The per-row path runs while the stream is capturing a graph, and otherwise below kPerRowBudget.
// A token id outside [-1, adapters) stops the per-row kernel with a device-side assert (as
// torch's CUDA indexing does); the grouped path raises an error naming it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../cpu/mixed.h"
#include "runtime.h"
#include "warp_reduce.h"

namespace giva {
namespace {

constexpr int kRowThreads = 256;  // both per-row kernels
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kRankChunk = 8;     // ranks a warp sums at once (warp_reduce_scatter8)
constexpr int kTableSize = 32;    // adapters per launch, passed by value (~1.3 KB of arguments)
constexpr int kExpandRows = 8;    // rows per expand block

// T r_max (in + out) elements of bases re-read per call (2^26: 128 MB in bf16, tens of µs of L2
// traffic), below which the per-row path is expected to beat the grouped path's sync and per-group
// launches. An estimate: not yet timed on a GPU.
constexpr int64_t kPerRowBudget = int64_t{1} << 26;

// The adapters first .. first + count - 1 of a call, by value: a kernel argument needs no copy to
// the device, and a captured graph keeps it.
template <typename T>
struct AdapterTable {
  const T* A[kTableSize];  // (r, in), contiguous
  const T* B[kTableSize];  // (out, r), contiguous
  const float* lambda_s[kTableSize];
  const float* lambda_o[kTableSize];
  int64_t rank[kTableSize];
  int64_t first, count;
  int64_t adapters;  // of the whole call: valid ids are [-1, adapters)
};

// s[t, j] = lambda_s[j] (A x_t)_j for the rows t whose adapter is in the table: a warp per row,
// eight ranks at a time (the lanes stride over in, then one reduce-scatter). Checks every id.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
shrink_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t in,
                   const int64_t* __restrict__ ids, AdapterTable<T> table, float* __restrict__ s,
                   int64_t s_stride) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (t >= rows) return;  // whole warps leave together, so the shuffles below see all 32 lanes
  const int64_t id = ids[t];
  CUDA_KERNEL_ASSERT_MSG(id >= -1 && id < table.adapters,
                         "giva::mixed_linear: a token id is outside [-1, number of adapters)");
  const int64_t e = id - table.first;
  if (id < 0 || e < 0 || e >= table.count) return;
  const T* x_row = x + t * in;
  const T* A = table.A[e];
  const int64_t r = table.rank[e];
  for (int64_t j0 = 0; j0 < r; j0 += kRankChunk) {
    float acc[kRankChunk];
#pragma unroll
    for (int jj = 0; jj < kRankChunk; ++jj) acc[jj] = 0.f;
    for (int64_t k = lane; k < in; k += 32) {
      const float xv = static_cast<float>(x_row[k]);
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj)
        if (j0 + jj < r) acc[jj] = fmaf(xv, static_cast<float>(A[(j0 + jj) * in + k]), acc[jj]);
    }
    const float total = warp_reduce_scatter8(acc);
    const int64_t j = j0 + lane / 4;
    if ((lane & 3) == 0 && j < r) s[t * s_stride + j] = total * table.lambda_s[e][j];
  }
}

// y[t, o] = bias[o] + lambda_o[o] sum_j B[o, j] s[t, j] for the rows whose adapter is in the table,
// and bias[o] (or 0) for the rows without one when write_bare: a thread per column, kExpandRows
// rows per block (blocks stride over row tiles past the grid's limit).
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
expand_rows_kernel(const float* __restrict__ s, int64_t s_stride, int64_t rows, int64_t out,
                   const int64_t* __restrict__ ids, AdapterTable<T> table,
                   const T* __restrict__ bias, bool write_bare, T* __restrict__ y) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (o >= out) return;  // no barriers below
  const float b = bias ? static_cast<float>(bias[o]) : 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kExpandRows;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kExpandRows; t0 < rows; t0 += stride) {
    const int64_t t1 = t0 + kExpandRows < rows ? t0 + kExpandRows : rows;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t id = ids[t];
      if (id < 0) {
        if (write_bare) y[t * out + o] = static_cast<T>(b);
        continue;
      }
      const int64_t e = id - table.first;
      if (e < 0 || e >= table.count) continue;  // another launch's adapter
      const int64_t r = table.rank[e];
      const T* B_o = table.B[e] + o * r;
      const float* s_t = s + t * s_stride;
      float acc = 0.f;
      for (int64_t j = 0; j < r; ++j) acc = fmaf(static_cast<float>(B_o[j]), s_t[j], acc);
      y[t * out + o] = static_cast<T>(fmaf(acc, table.lambda_o[e][o], b));
    }
  }
}

// The per-row path: y = bias + adapter terms by the kernels above, then y += x W^T. The bases are
// read in place (contiguous) and the vectors in fp32, one rounding per element of y's fill.
at::Tensor mixed_linear_per_row(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias_opt, at::TensorList A,
                                at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                                const at::Tensor& token_ids) {
  check_mixed_linear(x, weight, bias_opt, A, B, lambda_s, lambda_o, token_ids, kDevice,
                     kCudaDtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = x.size(0), in = x.size(1), out = weight.size(0);
  const auto adapters = static_cast<int64_t>(A.size());
  const auto xc = x.contiguous();
  const auto ids = token_ids.contiguous();
  const auto bias =
      bias_opt.has_value() && bias_opt->defined() ? bias_opt->contiguous() : at::Tensor();
  auto y = at::empty({T, out}, x.options());
  if (T > 0 && out > 0) {
    int64_t r_max = 1;
    for (const auto& a : A) r_max = std::max(r_max, a.size(0));
    auto s = at::empty({T, r_max}, x.options().dtype(at::kFloat));
    std::vector<at::Tensor> held;  // the contiguous bases and fp32 vectors the tables point into
    AT_DISPATCH_SWITCH(x.scalar_type(), "giva_mixed_linear_per_row", GIVA_DISPATCH_CASES([&] {
      // One table per kTableSize adapters; the first launch also writes the rows without one.
      for (int64_t first = 0; first == 0 || first < adapters; first += kTableSize) {
        AdapterTable<scalar_t> table{};
        table.first = first;
        table.count = std::min<int64_t>(kTableSize, adapters - first);
        table.adapters = adapters;
        for (int64_t e = 0; e < table.count; ++e) {
          const auto i = static_cast<size_t>(first + e);
          held.insert(held.end(), {A[i].contiguous(), B[i].contiguous(),
                                   lambda_s[i].to(at::kFloat).contiguous(),
                                   lambda_o[i].to(at::kFloat).contiguous()});
          const auto* t = &held[held.size() - 4];
          table.A[e] = t[0].const_data_ptr<scalar_t>();
          table.B[e] = t[1].const_data_ptr<scalar_t>();
          table.lambda_s[e] = t[2].const_data_ptr<float>();
          table.lambda_o[e] = t[3].const_data_ptr<float>();
          table.rank[e] = A[i].size(0);
        }
        launch(shrink_rows_kernel<scalar_t>, dim3(static_cast<unsigned>(ceil_div(T, kRowWarps))),
               kRowThreads, xc.const_data_ptr<scalar_t>(), T, in, ids.const_data_ptr<int64_t>(),
               table, s.mutable_data_ptr<float>(), r_max);
        const auto row_tiles = std::min<int64_t>(ceil_div(T, kExpandRows), 65535);
        launch(expand_rows_kernel<scalar_t>,
               dim3(static_cast<unsigned>(ceil_div(out, kRowThreads)),
                    static_cast<unsigned>(row_tiles)),
               kRowThreads, s.const_data_ptr<float>(), r_max, T, out, ids.const_data_ptr<int64_t>(),
               table, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, first == 0,
               y.mutable_data_ptr<scalar_t>());
      }
    }));
  }
  y.addmm_(xc, weight.t());
  return y;
}

at::Tensor mixed_linear_grouped(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::TensorList A,
                                at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                                const at::Tensor& token_ids) {
  return mixed_linear_impl(x, weight, bias, A, B, lambda_s, lambda_o, token_ids, kDevice,
                           kCudaDtypes, /*parallel=*/false, GatherRows{});
}

at::Tensor mixed_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::TensorList A,
                             at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                             const at::Tensor& token_ids) {
  // x off the GPU is reported by the argument check, not by the guard.
  const DeviceGuard device_guard(
      x.device().type() == kDevice ? std::optional<c10::Device>(x.device()) : std::nullopt);
  // The path from shapes only (each path checks the arguments; malformed ones pick either).
  int64_t r_max = 0;
  for (const auto& a : A) r_max = std::max(r_max, a.dim() == 2 ? a.size(0) : int64_t{0});
  const int64_t T = x.dim() == 2 ? x.size(0) : 0;
  const int64_t width = weight.dim() == 2 ? weight.size(0) + weight.size(1) : 0;
  const bool per_row = stream_capturing() || T * r_max * width <= kPerRowBudget;
  return (per_row ? mixed_linear_per_row : mixed_linear_grouped)(x, weight, bias, A, B, lambda_s,
                                                                  lambda_o, token_ids);
}

}  // namespace

#ifndef GIVA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(giva, CUDA, m) { m.impl("mixed_linear", &mixed_linear_cuda); }
#endif

}  // namespace giva
