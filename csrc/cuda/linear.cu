// CUDA kernels of giva::linear_forward / giva::linear_backward (docs/design.md §2).
//
// The frozen GEMMs (x W^T forward, g W backward) run in cuBLAS through ATen and dominate the layer;
// what the adapter adds is passes over T-sized tensors, so the design counts passes:
//
//   forward   thin_kernel    s = x A^T                one read of x
//             expand_kernel  y = bias + (s*l_s) B''^T one write of y (also writes s)
//             cuBLAS         y += x W^T               beta = 1: the compute-bound GEMM reads y in
//                                                     its epilogue, so adapter and bias cost one
//                                                     write pass instead of a read-modify-write
//   backward  thin_kernel    u = g B'', M = g^T s     ONE read of g feeds both products
//             expand_kernel  grad_x = (u*l_s) A       one write of grad_x
//             cuBLAS         grad_x += g W            beta = 1, as above
//             lambda kernel  grad l_o, grad l_s from M (out x r, fp32)
//
// adapter_forward / adapter_backward (a base layer that computes its own output, e.g. quantized)
// are the same passes without the cuBLAS GEMMs: expand_kernel starts from the base's output rows
// instead of the bias, and grad_x is the adapter's part alone.
//
// Not the concatenated-K GEMM [W; A]: it yields s as r extra columns of a (T, out + r) buffer, so y
// would be a strided view and the rank-r term would still need a read-modify-write pass, and W
// would be copied every call (lambda changes every step, W never does, but the op is stateless).
//
// The thin and expand kernels run on CUDA cores with fp32 accumulation and a rank chunk of kRank = 8
// held in registers; they read A, B and the lambdas in place (no folded copies). Above rank 8 the
// FMAs per element outgrow the memory time, so wider ranks use cuBLAS (tensor cores) for the thin
// products instead, with the same beta = 1 structure.
//
// Indexing: every offset into a T-sized tensor is computed in int64 (T * in and T * out may pass
// 2^31), and every launch checks its grid against CUDA's limits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "../cpu/checks.h"
#include "runtime.h"
#include "warp_reduce.h"

namespace giva {
namespace {

constexpr int kRank = 8;       // ranks per fused kernel; r <= kRank runs here, zero-padded
constexpr int kThreads = 256;  // every kernel below
constexpr int kWarps = kThreads / 32;
constexpr int kRowBatch = 4;   // rows a thin_kernel thread has in flight per buffer (two buffers)
constexpr int kTileRows = kThreads / kRank;  // rows per expand tile: one thread stages one P value
static_assert(kRank == 8, "warp_reduce_scatter8 assumes kRank == 8");

// The element type of s = x A^T, which the forward saves for backward: float beside half (s can pass
// its range; checks.h saved_s_dtype), else the data's type.
template <typename T>
using saved_s_t = std::conditional_t<std::is_same_v<T, c10::Half>, float, T>;

// Each thread owns 16 bytes of a row: one vector access on the aligned path.
template <typename T>
constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements [c, c + N) of `row`, zero past `limit` or when !valid. ALIGNED: row + c is 16-byte
// aligned and limit % N == 0, so a chunk is wholly in or out and loads as one vector.
template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ Pack<T, N> load_pack(const T* __restrict__ row, int64_t c,
                                                int64_t limit, bool valid) {
  static_assert(sizeof(Pack<T, N>) == sizeof(uint4), "a pack is one 16-byte vector");
  Pack<T, N> pk;
  if (ALIGNED && valid && c < limit) {
    reinterpret_cast<uint4&>(pk) = *reinterpret_cast<const uint4*>(row + c);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      pk.v[e] = valid && c + e < limit ? row[c + e] : static_cast<T>(0.f);
  }
  return pk;
}

// The bit pattern of one element, to assemble vector stores word by word.
template <typename T>
__device__ __forceinline__ uint32_t bits_of(T v) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(v);
  } else {
    return v.x;  // c10::Half / c10::BFloat16 storage
  }
}

template <typename T, int N, bool ALIGNED>
__device__ __forceinline__ void store_pack(T* __restrict__ row, int64_t c, int64_t limit,
                                           const float (&v)[N]) {
  if (ALIGNED) {
    if (c >= limit) return;
    // Words built explicitly and stored with the v4 intrinsic: a plain store of a Pack or a
    // uint4 compiles to 2- or 4-byte stores.
    constexpr int kPerWord = 4 / sizeof(T);
    uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < N; ++e)
      w[e / kPerWord] |= bits_of(static_cast<T>(v[e])) << (16 * (e % kPerWord));
    __stcg(reinterpret_cast<uint4*>(row + c), make_uint4(w[0], w[1], w[2], w[3]));
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (c + e < limit) row[c + e] = static_cast<T>(v[e]);
  }
}

// A kRank x N factor read in place from a frozen basis:
//   at(j, c) = src[j * stride_j + c * stride_c] * row_scale[j] * col_scale[c], zero for j >= r.
// So A (r, in) is {A, in, 1}, and (lambda_o B)^T for B (out, r) is {B, 1, r, col_scale = lambda_o}.
// The scales are the vectors in fp32 (the host converts them; usually they are fp32 already).
template <typename T>
struct Factor {
  const T* src;
  int64_t stride_j, stride_c, r;
  const float* row_scale;  // (r,) or null
  const float* col_scale;  // (N,) or null

  __device__ __forceinline__ float at(int j, int64_t c) const {
    if (j >= r) return 0.f;
    float v = static_cast<float>(src[j * stride_j + c * stride_c]);
    if (row_scale) v *= row_scale[j];
    if (col_scale) v *= col_scale[c];
    return v;
  }
};

// Thin products over rows of X (rows, K), one pass over X:
//   Ppart[blockIdx.x] = X[:, tile] Q[:, tile]^T   (rows, kRank) per column tile; skipped if null
//   Mpart[blockIdx.y] = X[group, :]^T S[group, :]  (K, kRank) per row group, WITH_M only
// Each thread owns N = vec_width columns for the whole launch, so its slice of Q and its slice of M
// stay in registers; row partials are reduced across the block through shared memory. Blocks are
// (column tile, row group); both partial sets are summed later in a fixed order (deterministic).
// About 200-255 registers a thread (Q and M slices), so one block per SM; two row buffers keep
// loads in flight while a batch computes (capping at 128 registers for two blocks spills).
template <typename T, bool ALIGNED, bool WITH_M>
__global__ void __launch_bounds__(kThreads, 1)
thin_kernel(const T* __restrict__ X, int64_t ldx, int64_t rows, int64_t K, Factor<T> Q,
            float* __restrict__ Ppart, const saved_s_t<T>* __restrict__ S, int64_t r,
            float* __restrict__ Mpart, int64_t rows_per_group) {
  constexpr int N = vec_width<T>();
  __shared__ float red[kRowBatch][kWarps][kRank];
  __shared__ float s_rows[kRowBatch][kRank];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + tid) * N;
  const bool want_p = Ppart != nullptr;

  float q[kRank][N];
#pragma unroll
  for (int j = 0; j < kRank; ++j)
#pragma unroll
    for (int e = 0; e < N; ++e) q[j][e] = want_p && c + e < K ? Q.at(j, c + e) : 0.f;
  float m[N][kRank];
#pragma unroll
  for (int e = 0; e < N; ++e)
#pragma unroll
    for (int j = 0; j < kRank; ++j) m[e][j] = 0.f;

  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  const int64_t t_end = rows < t_begin + rows_per_group ? rows : t_begin + rows_per_group;
  // Rows past t_end load as zeros, so the last batch needs no special case.
  auto load_batch = [&](int64_t t0, Pack<T, N>(&dst)[kRowBatch]) {
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
      const int64_t t = t0 + b;
      const bool valid = t < t_end;
      dst[b] = load_pack<T, N, ALIGNED>(X + (valid ? t : t_begin) * ldx, c, K, valid);
    }
  };

  Pack<T, N> cur[kRowBatch], nxt[kRowBatch];
  load_batch(t_begin, cur);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kRowBatch) {
    load_batch(t0 + kRowBatch, nxt);  // in flight while this batch computes
    if (WITH_M && tid < kRowBatch * kRank) {
      const int b = tid / kRank, j = tid % kRank;
      const int64_t t = t0 + b;
      s_rows[b][j] = t < t_end && j < r ? static_cast<float>(S[t * r + j]) : 0.f;
    }
    // s_rows is written; the previous batch's red was consumed before its writers got here.
    __syncthreads();
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
      float xf[N];
#pragma unroll
      for (int e = 0; e < N; ++e) xf[e] = static_cast<float>(cur[b].v[e]);
      if (want_p) {
        float p[kRank];
#pragma unroll
        for (int j = 0; j < kRank; ++j) {
          p[j] = 0.f;
#pragma unroll
          for (int e = 0; e < N; ++e) p[j] = fmaf(xf[e], q[j][e], p[j]);
        }
        const float total = warp_reduce_scatter8(p);
        if ((lane & 3) == 0) red[b][warp][lane >> 2] = total;
      }
      if (WITH_M) {
#pragma unroll
        for (int j = 0; j < kRank; ++j) {
          const float sv = s_rows[b][j];
#pragma unroll
          for (int e = 0; e < N; ++e) m[e][j] = fmaf(xf[e], sv, m[e][j]);
        }
      }
    }
    __syncthreads();  // red complete; s_rows no longer read
    if (want_p && tid < kRowBatch * kRank) {
      const int b = tid / kRank, j = tid % kRank;
      const int64_t t = t0 + b;
      if (t < t_end) {
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) total += red[b][w][j];
        Ppart[(static_cast<int64_t>(blockIdx.x) * rows + t) * kRank + j] = total;
      }
    }
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) cur[b] = nxt[b];
  }

  if (WITH_M) {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      if (c + e >= K) break;
      float4* dst = reinterpret_cast<float4*>(
          Mpart + (static_cast<int64_t>(blockIdx.y) * K + c + e) * kRank);
      dst[0] = make_float4(m[e][0], m[e][1], m[e][2], m[e][3]);
      dst[1] = make_float4(m[e][4], m[e][5], m[e][6], m[e][7]);
    }
  }
}

// C (rows, N) = init + P F, with P = sum over nparts of Ppart (rows, kRank) and F a kRank x N
// factor. init: null (zeros), a bias row (ld_init = 0: kept in registers with the block's column
// slice of F while it walks row tiles), or a (rows, N) tensor with row stride ld_init (the base
// layer's output, read once per element). With s_out, blocks of column tile 0 also write
// s_out = P[:, :r] (saved_s_t: fp32 beside fp16).
template <typename T, bool ALIGNED>
__global__ void __launch_bounds__(kThreads)
expand_kernel(const float* __restrict__ Ppart, int64_t nparts, int64_t rows, Factor<T> F,
              const T* __restrict__ init, int64_t ld_init, int64_t N, T* __restrict__ C,
              saved_s_t<T>* __restrict__ s_out,
              int64_t r) {
  constexpr int V = vec_width<T>();
  __shared__ float P[kTileRows][kRank];
  const int tid = threadIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + tid) * V;

  float f[kRank][V], b0[V];
#pragma unroll
  for (int j = 0; j < kRank; ++j)
#pragma unroll
    for (int e = 0; e < V; ++e) f[j][e] = c + e < N ? F.at(j, c + e) : 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e)
    b0[e] = init && ld_init == 0 && c + e < N ? static_cast<float>(init[c + e]) : 0.f;

  const int64_t tiles = ceil_div(rows, kTileRows);
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t t0 = tile * kTileRows;
    {
      const int i = tid / kRank, j = tid % kRank;
      const int64_t t = t0 + i;
      float v = 0.f;
      if (t < rows) {
        for (int64_t p = 0; p < nparts; ++p) v += Ppart[(p * rows + t) * kRank + j];
        if (s_out && blockIdx.x == 0 && j < r) s_out[t * r + j] = static_cast<saved_s_t<T>>(v);
      }
      P[i][j] = v;
    }
    __syncthreads();
    const int n = rows - t0 < kTileRows ? static_cast<int>(rows - t0) : kTileRows;
    for (int i = 0; i < n; ++i) {
      float acc[V];
      if (init && ld_init != 0) {
        const auto row = load_pack<T, V, ALIGNED>(init + (t0 + i) * ld_init, c, N, true);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = static_cast<float>(row.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = b0[e];
      }
#pragma unroll
      for (int j = 0; j < kRank; ++j) {
        const float pv = P[i][j];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = fmaf(pv, f[j][e], acc[e]);
      }
      store_pack<T, V, ALIGNED>(C + (t0 + i) * N, c, N, acc);
    }
    __syncthreads();  // P is rewritten by the next tile
  }
}

// From M (out, kRank) fp32:  grad_o[o] = sum_j M[o,j] B[o,j] l_s[j]  (if grad_o),
// and per block  gs_part[block, j] = sum_o M[o,j] B[o,j] l_o[o]        (if gs_part).
template <typename T>
__global__ void __launch_bounds__(kThreads)
lambda_grad_kernel(const float* __restrict__ M, int64_t out, const T* __restrict__ B, int64_t r,
                   const float* __restrict__ lambda_s, const float* __restrict__ lambda_o,
                   float* __restrict__ grad_o, float* __restrict__ gs_part) {
  __shared__ float red[kWarps][kRank];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kThreads + tid;
  const bool valid = o < out;
  float mb[kRank];
#pragma unroll
  for (int j = 0; j < kRank; ++j)
    mb[j] = valid && j < r ? M[o * kRank + j] * static_cast<float>(B[o * r + j]) : 0.f;
  if (grad_o && valid) {
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < kRank; ++j)
      if (j < r) total = fmaf(mb[j], lambda_s[j], total);
    grad_o[o] = total;
  }
  if (gs_part) {
    const float lo = valid ? lambda_o[o] : 0.f;
#pragma unroll
    for (int j = 0; j < kRank; ++j) mb[j] *= lo;
    const float total = warp_reduce_scatter8(mb);
    if ((lane & 3) == 0) red[warp][lane >> 2] = total;
    __syncthreads();
    if (tid < kRank) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[w][tid];
      gs_part[static_cast<int64_t>(blockIdx.x) * kRank + tid] = sum;
    }
  }
}


bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename T>
const T* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

template <typename T>
Factor<T> make_factor(const at::Tensor& src, int64_t stride_j, int64_t stride_c, int64_t r,
                      const at::Tensor& row_scale, const at::Tensor& col_scale) {
  return {src.data_ptr<T>(), stride_j, stride_c, r, ptr_or_null<float>(row_scale),
          ptr_or_null<float>(col_scale)};
}

struct ThinOut {
  at::Tensor Ppart;  // (column tiles, rows, kRank) fp32, or undefined
  at::Tensor M;      // (K, kRank) fp32, or undefined
};

// Runs thin_kernel on X (rows, K) with unit column stride; want_p: X Q^T; S defined: X^T S.
template <typename T>
ThinOut thin_products(const at::Tensor& X, const Factor<T>& Q, bool want_p, const at::Tensor& S) {
  constexpr int N = vec_width<T>();
  const int64_t rows = X.size(0), K = X.size(1), ldx = X.stride(0);
  const bool with_m = S.defined();
  const auto f32 = X.options().dtype(at::kFloat);
  const int64_t ncol = ceil_div(K, kThreads * N);
  ThinOut res;
  if (rows == 0 || K == 0) {
    if (want_p) res.Ppart = at::zeros({ncol, rows, kRank}, f32);
    if (with_m) res.M = at::zeros({K, kRank}, f32);
    return res;
  }
  const bool aligned = K % N == 0 && ldx % N == 0 && aligned16(X.data_ptr());
  auto kernel = aligned ? (with_m ? thin_kernel<T, true, true> : thin_kernel<T, true, false>)
                        : (with_m ? thin_kernel<T, false, true> : thin_kernel<T, false, false>);
  // One wave of blocks; each row group's M partial is written once, so fewer groups, less traffic.
  const int64_t want_groups =
      std::max<int64_t>(1, num_sms() * blocks_per_sm(kernel, kThreads) / ncol);
  int64_t groups = std::min(want_groups, ceil_div(rows, kRowBatch));
  const int64_t rows_per_group = ceil_div(ceil_div(rows, groups), kRowBatch) * kRowBatch;
  groups = ceil_div(rows, rows_per_group);  // no empty group; at most SMs x occupancy (gridDim.y)
  TORCH_CHECK(ncol <= INT32_MAX, "giva: a row of ", K, " elements needs ", ncol,
              " column blocks, above the CUDA grid limit of 2^31 - 1");

  if (want_p) res.Ppart = at::empty({ncol, rows, kRank}, f32);
  at::Tensor Mpart;
  if (with_m) Mpart = at::empty({groups, K, kRank}, f32);
  launch(kernel, dim3(static_cast<unsigned>(ncol), static_cast<unsigned>(groups)), kThreads,
         X.data_ptr<T>(), ldx, rows, K, Q, want_p ? res.Ppart.data_ptr<float>() : nullptr,
         with_m ? S.data_ptr<saved_s_t<T>>() : nullptr, with_m ? S.size(1) : 0,
         with_m ? Mpart.data_ptr<float>() : nullptr, rows_per_group);
  if (with_m) res.M = Mpart.sum(0);
  return res;
}

// C (rows, N) = init + (sum of Ppart) F; writes s_out (rows, r) too when it is defined. init:
// undefined (zeros), a bias (N,), or a (rows, N) tensor with unit column stride.
template <typename T>
at::Tensor expand(const at::Tensor& Ppart, int64_t rows, const Factor<T>& F, const at::Tensor& init,
                  int64_t N, const at::TensorOptions& options, const at::Tensor& s_out) {
  constexpr int V = vec_width<T>();
  at::Tensor C = at::empty({rows, N}, options);
  if (rows == 0) return C;
  const T* init_ptr = ptr_or_null<T>(init);
  const int64_t ld_init = init.defined() && init.dim() == 2 ? init.stride(0) : 0;
  const bool aligned = N % V == 0 && (!init_ptr || (aligned16(init_ptr) && ld_init % V == 0));
  auto kernel = aligned ? expand_kernel<T, true> : expand_kernel<T, false>;
  // At least one column tile, so s_out is written even when N == 0.
  const int64_t ncol = std::max<int64_t>(1, ceil_div(N, kThreads * V));
  // A few tiles per block amortize loading F; the grid-stride loop covers any T.
  const int64_t tiles = ceil_div(rows, kTileRows);
  const int64_t per_wave =
      std::max<int64_t>(1, 4 * num_sms() * blocks_per_sm(kernel, kThreads) / ncol);
  const int64_t grid_y = std::min<int64_t>({tiles, per_wave, 65535});
  TORCH_CHECK(ncol <= INT32_MAX, "giva: an output row of ", N, " elements needs ", ncol,
              " column blocks, above the CUDA grid limit of 2^31 - 1");
  launch(kernel, dim3(static_cast<unsigned>(ncol), static_cast<unsigned>(grid_y)), kThreads,
         Ppart.data_ptr<float>(), Ppart.size(0), rows, F, init_ptr, ld_init, N, C.data_ptr<T>(),
         s_out.defined() ? s_out.data_ptr<saved_s_t<T>>() : nullptr,
         s_out.defined() ? s_out.size(1) : 0);
  return C;
}

// A 2-D operand with unit column stride as the kernels read it, copying only when needed.
at::Tensor rows_unit_stride(const at::Tensor& t) {
  return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous();
}

// y = init + (s * l_s) (l_o * B)^T and s = x A^T, for linear_forward (init: the bias, then the
// base GEMM accumulates onto y) and adapter_forward (init: the base layer's output).
std::tuple<at::Tensor, at::Tensor> adapter_term(const at::Tensor& x_in, const at::Tensor& init,
                                                const at::Tensor& A_in, const at::Tensor& B_in,
                                                const at::Tensor& lambda_s_in,
                                                const at::Tensor& lambda_o_in, int64_t out) {
  const int64_t T = x_in.size(0), in = x_in.size(1), r = A_in.size(0);
  const auto x = rows_unit_stride(x_in);
  const auto A = A_in.contiguous(), B = B_in.contiguous();
  // The vectors in fp32 (they may be x's dtype or fp32); they enter only the folded factors.
  const auto lambda_s = lambda_s_in.to(at::kFloat).contiguous();
  const auto lambda_o = lambda_o_in.to(at::kFloat).contiguous();

  // s and, above rank 8, the rank-r product in fp32 beside fp16: x A^T can pass fp16's range
  // where y does not, and inf * lambda_o = 0 would make y NaN.
  const auto s_dtype = saved_s_dtype(x.scalar_type());
  at::Tensor y, s;
  if (r <= kRank) {
    s = at::empty({T, r}, x.options().dtype(s_dtype));
    AT_DISPATCH_SWITCH(x.scalar_type(), "giva_forward", GIVA_DISPATCH_CASES([&] {
      const auto shrink = thin_products<scalar_t>(
          x, make_factor<scalar_t>(A, in, 1, r, {}, {}), /*want_p=*/true, at::Tensor());
      // (s * l_s) (l_o * B)^T: factor (j, o) = B[o, j] l_s[j] l_o[o]
      y = expand<scalar_t>(shrink.Ppart, T, make_factor<scalar_t>(B, 1, r, r, lambda_s, lambda_o),
                           init, out, x.options(), s);
    }));
  } else {
    // (fp16 x is converted for this: a (T, in) fp32 copy, only on this path)
    s = at::mm(x.to(s_dtype), A.to(s_dtype).t());
    // (l_o * B * l_s)^T folded in fp32 and rounded once to s's dtype (out x r, small)
    const auto B_folded = (B.to(at::kFloat) * lambda_o.unsqueeze(1) * lambda_s).to(s_dtype);
    y = (init.defined() ? at::addmm(init.to(s_dtype), s, B_folded.t()) : at::mm(s, B_folded.t()))
            .to(x.scalar_type());
  }
  return {y, s};
}

std::tuple<at::Tensor, at::Tensor> linear_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& lambda_s,
    const at::Tensor& lambda_o) {
  check_linear_forward(x, weight, bias_opt, A, B, lambda_s, lambda_o, kDevice, kCudaDtypes);
  const DeviceGuard guard(x.device());
  const at::Tensor bias =
      bias_opt.has_value() && bias_opt->defined() ? bias_opt->contiguous() : at::Tensor();
  const auto x_rows = rows_unit_stride(x);
  auto [y, s] = adapter_term(x_rows, bias, A, B, lambda_s, lambda_o, weight.size(0));
  y.addmm_(x_rows, weight.t());
  return {y, s};
}

std::tuple<at::Tensor, at::Tensor> adapter_forward_cuda(
    const at::Tensor& x, const at::Tensor& base, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& lambda_s, const at::Tensor& lambda_o) {
  check_adapter_forward(x, base, A, B, lambda_s, lambda_o, kDevice, kCudaDtypes);
  const DeviceGuard guard(x.device());
  return adapter_term(x, rows_unit_stride(base), A, B, lambda_s, lambda_o, base.size(1));
}

// The backward of linear_forward (weight defined: grad_x includes g W) and of adapter_forward
// (weight undefined). Masked-out outputs are undefined tensors (None in Python), as on the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& s_in, const at::Tensor& weight,
    const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& lambda_s_in,
    const at::Tensor& lambda_o_in, std::array<bool, 3> output_mask) {
  const DeviceGuard guard(grad_y.device());
  const bool need_x = output_mask[0], need_s = output_mask[1], need_o = output_mask[2];
  const bool need_lambda = need_s || need_o;
  const int64_t T = grad_y.size(0), out = grad_y.size(1), in = A_in.size(1), r = A_in.size(0);
  const auto g = rows_unit_stride(grad_y);
  const auto s = s_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const auto lambda_s = lambda_s_in.to(at::kFloat).contiguous();  // as in the forward
  const auto lambda_o = lambda_o_in.to(at::kFloat).contiguous();
  const auto dtype = g.scalar_type();

  at::Tensor grad_x, grad_s, grad_o;
  if (!need_x && !need_lambda) return {grad_x, grad_s, grad_o};
  if (r <= kRank) {
    AT_DISPATCH_SWITCH(dtype, "giva_backward", GIVA_DISPATCH_CASES([&] {
      // u = g (l_o * B): factor (j, o) = B[o, j] l_o[o]
      const auto thin = thin_products<scalar_t>(
          g, make_factor<scalar_t>(B, 1, r, r, {}, lambda_o), need_x,
          need_lambda ? s : at::Tensor());
      if (need_x) {
        // (u * l_s) A: factor (j, i) = A[j, i] l_s[j]
        grad_x = expand<scalar_t>(thin.Ppart, T, make_factor<scalar_t>(A, in, 1, r, lambda_s, {}),
                                  at::Tensor(), in, g.options(), at::Tensor());
      }
      if (need_lambda) {
        const int64_t blocks = std::max<int64_t>(1, ceil_div(out, kThreads));
        TORCH_CHECK(blocks <= INT32_MAX, "giva::linear_backward: out = ", out, " needs ", blocks,
                    " blocks, above the CUDA grid limit of 2^31 - 1");
        if (need_o) grad_o = at::empty({out}, lambda_o.options());  // fp32
        at::Tensor gs_part;
        if (need_s) gs_part = at::empty({blocks, kRank}, thin.M.options());
        launch(lambda_grad_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)), kThreads,
               thin.M.data_ptr<float>(), out, B.data_ptr<scalar_t>(), r,
               lambda_s.data_ptr<float>(), lambda_o.data_ptr<float>(),
               need_o ? grad_o.data_ptr<float>() : nullptr,
               need_s ? gs_part.data_ptr<float>() : nullptr);
        if (need_s) grad_s = gs_part.sum(0).narrow(0, 0, r);
      }
    }));
  } else {
    if (need_x) {
      // (g (l_o * B)) (l_s * A), each factor folded in fp32 and rounded once to g's dtype
      const auto u = at::mm(g, (B.to(at::kFloat) * lambda_o.unsqueeze(1)).to(dtype));
      grad_x = at::mm(u, (A.to(at::kFloat) * lambda_s.unsqueeze(1)).to(dtype));
    }
    if (need_lambda) {
      // M in s's dtype, as the reference computes it: g's, or fp32 beside fp16 (M sums T products
      // and can pass fp16's 65504; the rank <= 8 kernel keeps M in fp32 throughout). The lambda
      // sums run in fp32.
      const auto M = at::mm(g.t().to(s.scalar_type()), s).to(at::kFloat);
      const auto MB = M * B.to(at::kFloat);
      if (need_s) grad_s = MB.t().mv(lambda_o);
      if (need_o) grad_o = MB.mv(lambda_s);
    }
  }
  if (need_x && weight.defined()) grad_x.addmm_(g, weight);
  // The vectors' gradients in the vectors' dtype (fp32 beside half data, as the optimizer holds them)
  if (grad_s.defined()) grad_s = grad_s.to(lambda_s_in.scalar_type());
  if (grad_o.defined()) grad_o = grad_o.to(lambda_o_in.scalar_type());
  return {grad_x, grad_s, grad_o};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& lambda_s, const at::Tensor& lambda_o,
    std::array<bool, 3> output_mask) {
  check_linear_backward(grad_y, s, weight, A, B, lambda_s, lambda_o, kDevice, kCudaDtypes);
  return backward(grad_y, s, weight, A, B, lambda_s, lambda_o, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& lambda_s, const at::Tensor& lambda_o, std::array<bool, 3> output_mask) {
  check_backward("giva::adapter_backward", grad_y, s, at::Tensor(), A, B, lambda_s, lambda_o,
                 kDevice, kCudaDtypes);
  return backward(grad_y, s, at::Tensor(), A, B, lambda_s, lambda_o, output_mask);
}

}  // namespace

#ifndef GIVA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(giva, CUDA, m) {
  m.impl("linear_forward", &linear_forward_cuda);
  m.impl("linear_backward", &linear_backward_cuda);
  m.impl("adapter_forward", &adapter_forward_cuda);
  m.impl("adapter_backward", &adapter_backward_cuda);
}
#endif

}  // namespace giva
