// CPU kernels of giva::linear_forward / giva::linear_backward (docs/design.md §2).
//
// The base GEMMs dominate; the adapter's cost is its thin (K or N = r) products and the memory
// passes over T-sized tensors they add. Two paths, chosen per call and direction by
// merge_forward() / merge_backward():
//
// merged: W_eff = W + B'' A' (out x in) is formed and used in place of W: y = x W_eff^T + bias,
//   grad_x = g W_eff (rebuilt in backward, not saved). The adapter then costs s = x A^T, M = g^T s
//   and a rank-r update of W per direction, no T-sized pass beyond reading x and g.
// fold: the small adapter term is written into the output first and the base GEMM accumulates
//   onto it (beta = 1), reading it tile by tile while compute-bound:
//     forward   y = bias + s (B'' diag(lambda_s))^T, then y += x W^T
//     backward  grad_x = (g B'') (diag(lambda_s) A), then grad_x += g W
//   (nn.Linear with a bias does the same: it broadcasts the bias into y before its GEMM.)
// In bfloat16, W_eff rounds W + update to W's precision; measured against an fp32 reference its
// y error stays below the bf16 composite's (which rounds x W^T on its own), so both dtypes share
// the rules.
//
// On the SIMD path (simd_path(): fp32, a basis panel r x max(in, out) of at most 384 KiB, an
// AVX-512 CPU) the thin products and M run per cache-sized block of rows (x or g read once, while
// hot), in parallel over blocks, through the kernels of thin_kernels.h (BLAS runs these shapes far
// below GEMM speed). Elsewhere (bfloat16, float64, wider panels, other CPUs) every product is one
// whole-tensor ATen GEMM, in the same fold order (the adapter's term first, the base GEMM
// accumulating onto it; in bf16 that measured 5-12% of the frozen layer's time faster than adding
// the term after the base GEMM, an in-place K = r product over y); bf16 GEMMs accumulate in fp32
// and round once. The lambda gradients are formed in fp32 (fp64 for fp64) and returned in the
// vectors' dtype: beside bfloat16 data the vectors may be float32 (the trainable parameters as
// the optimizer keeps them); they enter only the folded factors, formed in fp32 and rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "checks.h"
#include "thin_kernels.h"

namespace giva {
namespace {

constexpr auto kDevice = at::kCPU;
constexpr std::array<at::ScalarType, 3> kDtypes = {at::kFloat, at::kBFloat16, at::kDouble};

at::ScalarType acc_type(at::ScalarType t) { return t == at::kBFloat16 ? at::kFloat : t; }

// Merging costs a read and a write of W and an out x r x in product per direction, folding costs
// thin T-row products; M = g^T s and s = x A^T are common to both.
// forward:  the fold adds only the fill's FLOPs (2 T out r; its write replaces the bias broadcast),
//   so merging wins only for large r with T well above in: r >= 32 and T >= 2 min(in, out)
//   (measured, 2-core AVX-512, T=2048, 1024x1024: merging the forward loses ~1 ms at r = 8 and
//   wins at r = 64).
// backward: the fold also writes grad_x before the GEMM reads it back (T x in each way) and runs
//   u = g B'' (2 T out r), against W's out x in: merging wins once out <= T (measured at
//   T=2048, 1024x1024, r = 8: 0.5-1 ms less per backward).
bool merge_forward(int64_t T, int64_t in, int64_t out, int64_t r) {
  return r >= 32 && 2 * std::min(in, out) <= T;
}
bool merge_backward(int64_t T, int64_t out) { return out <= T; }

// The SIMD kernels are for thin, memory-bound products. They keep a 1 MiB block of x or g hot in
// L2 while streaming an r x width panel of a basis past it; once that panel passes this size the
// products are better run as GEMMs by BLAS. Fwd+bwd / frozen in the benchmark suite (fp32,
// 2 threads, runs with either path): 1024^2, r = 64 (a 256 KiB panel) SIMD 1.209 / ATen 1.388
// at T = 2048 and 1.336 / 1.495 at T = 512; 4096^2, r = 64 (1 MiB) SIMD 1.106 / ATen 1.052 and
// 1.067 at T = 512; 4096 -> 11008, r = 8 (344 KiB) SIMD 1.019 / ATen 1.017 and 1.058 (kept SIMD).
constexpr int64_t kSimdMaxPanelBytes = 384 << 10;

// Whether the adapter's products run blocked, through the fp32 SIMD kernels (fp32, a thin panel,
// a CPU where they are fast). Elsewhere they run as whole-tensor ATen GEMMs: per-block ATen calls
// of thin shapes are slow (bfloat16, T=2048, 1024x1024, r=8: a blocked forward took 6.1 ms, whole
// GEMMs 4.3 ms, the frozen layer 3.9 ms).
bool simd_path(at::ScalarType dtype, int64_t r, int64_t in, int64_t out) {
  return dtype == at::kFloat &&
         r * std::max(in, out) * static_cast<int64_t>(sizeof(float)) <= kSimdMaxPanelBytes &&
         cpu::thin_kernels_fast();
}

// A copy of a small fp32 matrix with each row padded by 64 bytes: rows of a power-of-two width
// would otherwise all map to the same L1 sets when a SIMD tile reads them at one column.
at::Tensor padded(const at::Tensor& t) {
  return at::empty({t.size(0), t.size(1) + 16}, t.options()).narrow(1, 0, t.size(1)).copy_(t);
}

// diag(row) src diag(col) as a new contiguous tensor of src's dtype (row, col: vectors, or
// undefined for ones; src may be a transposed view), formed in the accumulator type and rounded
// once, in one pass. As tensor ops (casts, two products, a cast back) the folded factors of a
// 4096 x 64 basis cost ~1 ms per call in bfloat16, a temporary and a pass each.
at::Tensor scaled(const at::Tensor& src, const at::Tensor& row, const at::Tensor& col) {
  const int64_t rows = src.size(0), cols = src.size(1);
  auto out = at::empty({rows, cols}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.scalar_type(), "giva_scaled", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
    const auto row_c = row.defined() ? row.to(acc).contiguous() : at::Tensor();
    const auto col_c = col.defined() ? col.to(acc).contiguous() : at::Tensor();
    const acc_t* rv = row_c.defined() ? row_c.const_data_ptr<acc_t>() : nullptr;
    const acc_t* cv = col_c.defined() ? col_c.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t s0 = src.stride(0), s1 = src.stride(1);
    at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, cols)),
                     [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t ri = rv ? rv[i] : acc_t(1);
        for (int64_t j = 0; j < cols; ++j) {
          const acc_t v = static_cast<acc_t>(in[i * s0 + j * s1]) * ri;
          o[i * cols + j] = static_cast<scalar_t>(cv ? v * cv[j] : v);
        }
      }
    });
  });
  return out;
}

// The helpers below run the SIMD kernels on fp32 matrices with unit column stride (any row
// stride), under simd_path().

// s = x w, for a thin w (K x r) given in both layouts (w and wT = w^T). The first r - r % 16
// columns of s run as a rank-K update vectorised along r (FMA-bound), the rest as dot products
// along K (the rows of x stream through once).
void thin_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wT, at::Tensor s) {
  const int64_t n = x.size(0), K = x.size(1), r = s.size(1), r16 = r - r % 16;
  if (r16 > 0)
    cpu::rank_update(n, r16, K, x.const_data_ptr<float>(), x.stride(0), w.const_data_ptr<float>(),
                     w.stride(0), nullptr, 0, s.mutable_data_ptr<float>(), s.stride(0));
  if (r16 < r)
    cpu::rows_dot(n, r - r16, K, x.const_data_ptr<float>(), x.stride(0),
                  wT[r16].const_data_ptr<float>(), wT.stride(0),
                  s.mutable_data_ptr<float>() + r16, s.stride(0));
}

// out = init + c b, a rank-K update (K = c.size(1), small). init: undefined (zeros) or of out's
// shape (a bias row expanded with stride 0, or W).
void rank_update(at::Tensor out, const at::Tensor& c, const at::Tensor& b, const at::Tensor& init) {
  cpu::rank_update(out.size(0), out.size(1), c.size(1), c.const_data_ptr<float>(), c.stride(0),
                   b.const_data_ptr<float>(), b.stride(0),
                   init.defined() ? init.const_data_ptr<float>() : nullptr,
                   init.defined() ? init.stride(0) : 0, out.mutable_data_ptr<float>(),
                   out.stride(0));
}

// m += s^T g (m: r x out).
void accumulate_outer(at::Tensor m, const at::Tensor& s, const at::Tensor& g) {
  cpu::accumulate_outer(m.size(0), m.size(1), s.size(0), s.const_data_ptr<float>(), s.stride(0),
                        g.const_data_ptr<float>(), g.stride(0), m.mutable_data_ptr<float>(),
                        m.stride(0));
}

// Whether, on the SIMD path, M^T = s^T g runs as per-thread partials accumulated block by block
// (accumulate_outer, fused with the other passes over g) rather than as one GEMM: while a thread's
// r x out partial stays in L2 beside the block of g. Measured against the GEMM (T = 512-8192):
// 0.8x at r = 8, out = 1024-4096 and r = 16, out = 1024; 1.1-1.5x at r >= 32 or r x out x 4 >
// 128 KiB.
bool m_in_blocks(int64_t r, int64_t out) {
  constexpr int64_t kMaxPartialBytes = 128 << 10;
  return r <= 16 && r * out * static_cast<int64_t>(sizeof(float)) <= kMaxPartialBytes;
}

// Rows per block so that a block of a T-sized operand (`width` wide) stays in L2.
int64_t block_rows(int64_t width, int64_t elem_size) {
  constexpr int64_t kBlockBytes = 1 << 20;
  return std::max<int64_t>(16, kBlockBytes / std::max<int64_t>(1, width * elem_size));
}

// Runs body(b0, n) over blocks of at most `rows` rows of [0, T), in parallel, below autograd: the
// ATen calls inside compute values only (the op's backward is registered in ops.py), and the guard
// is thread-local, so each worker sets it. Blocks shrink so that every thread gets rows when T is
// small (down to kMinBlockRows): one cache-sized block would leave the other threads idle.
template <typename F>
void for_row_blocks(int64_t T, int64_t rows, const F& body) {
  constexpr int64_t kMinBlockRows = 64;
  const int64_t per_thread = (T + at::get_num_threads() - 1) / at::get_num_threads();
  rows = std::max<int64_t>(1, std::min(rows, std::max(kMinBlockRows, per_thread)));
  at::parallel_for(0, T, rows, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t b0 = t0; b0 < t1; b0 += rows) body(b0, std::min(rows, t1 - b0));
  });
}

// W_eff = W + B'' A': one GEMM, or on the SIMD path in parallel over blocks of W's rows. The
// folded factors are formed in the accumulator type (the vectors may be float32 beside a
// bfloat16 W) and rounded to W's dtype once.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& lambda_s, const at::Tensor& lambda_o) {
  const auto dtype = weight.scalar_type();
  const auto B_o = scaled(B, lambda_o, at::Tensor());
  const auto A_s_flat = scaled(A, lambda_s, at::Tensor());
  if (!simd_path(dtype, A.size(0), weight.size(1), weight.size(0)))
    return at::addmm(weight, B_o, A_s_flat);
  const auto A_s = padded(A_s_flat);
  const auto w = weight.contiguous();
  auto w_eff = at::empty(w.sizes(), w.options());
  for_row_blocks(w.size(0), block_rows(w.size(1), w.element_size()), [&](int64_t b0, int64_t n) {
    rank_update(w_eff.narrow(0, b0, n), B_o.narrow(0, b0, n), A_s, w.narrow(0, b0, n));
  });
  return w_eff;
}

// The SIMD path's passes over x: s = x A^T and, with y defined, y = init + s (B'' diag(lambda_s))^T,
// block by block while the block of x is hot; init_rows(b0, n) gives the init of rows [b0, b0 + n)
// (a bias row expanded with stride 0, the base layer's output rows, or undefined for zeros).
template <typename InitRows>
at::Tensor shrink_and_fill(const at::Tensor& xc, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& lambda_s, const at::Tensor& lambda_o, at::Tensor y,
                           const InitRows& init_rows) {
  const int64_t T = xc.size(0), in = xc.size(1), r = A.size(0);
  // A in both layouts for s; (B'' diag(lambda_s))^T (r, out) for the fill, so that y's adapter
  // term is s times it and s itself is never scaled.
  const auto A_c = A.contiguous(), AT = A.t().contiguous();
  const auto BT = y.defined() ? padded(scaled(B.t(), lambda_s, lambda_o)) : at::Tensor();
  auto s = at::empty({T, r}, xc.options());
  for_row_blocks(T, block_rows(in, xc.element_size()), [&](int64_t b0, int64_t n) {
    auto s_blk = s.narrow(0, b0, n);
    thin_product(xc.narrow(0, b0, n), AT, A_c, s_blk);
    if (y.defined()) rank_update(y.narrow(0, b0, n), s_blk, BT, init_rows(b0, n));
  });
  return s;
}

std::tuple<at::Tensor, at::Tensor> linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& lambda_s,
    const at::Tensor& lambda_o) {
  check_linear_forward(x, weight, bias_opt, A, B, lambda_s, lambda_o, kDevice, kDtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const int64_t T = x.size(0), in = x.size(1), out = weight.size(0), r = A.size(0);
  const auto xc = x.contiguous();
  const bool merged = merge_forward(T, in, out, r);
  if (!simd_path(x.scalar_type(), r, in, out)) {
    auto s = at::mm(xc, A.t());
    if (merged) {
      const auto w_eff = merged_weight(weight, A, B, lambda_s, lambda_o);
      return {has_bias ? at::addmm(*bias_opt, xc, w_eff.t()) : at::mm(xc, w_eff.t()), s};
    }
    // The fill bias + s (B'' diag(lambda_s))^T as one GEMM: the bias rides as an extra rank,
    // [s | 1] [(B'' diag(lambda_s))^T ; bias] (addmm's bias broadcast is a pass of its own).
    auto BT = scaled(B.t(), lambda_s, lambda_o);
    auto s1 = s;
    if (has_bias) {
      BT = at::cat({BT, bias_opt->unsqueeze(0)});
      s1 = at::cat({s, at::ones({T, 1}, s.options())}, 1);
    }
    auto y = at::mm(s1, BT);
    y.addmm_(xc, weight.t());
    return {y, s};
  }

  const auto bias = has_bias ? bias_opt->contiguous() : at::Tensor();
  auto y = at::empty({T, out}, x.options());
  const auto s = shrink_and_fill(xc, A, B, lambda_s, lambda_o, merged ? at::Tensor() : y,
                                 [&](int64_t, int64_t n) {
                                   return has_bias ? bias.unsqueeze(0).expand({n, out}) : at::Tensor();
                                 });
  if (merged) {
    const auto w_eff = merged_weight(weight, A, B, lambda_s, lambda_o);
    if (has_bias) at::addmm_out(y, *bias_opt, xc, w_eff.t());
    else at::mm_out(y, xc, w_eff.t());
  } else {
    y.addmm_(xc, weight.t());
  }
  return {y, s};
}

// y = base + s (B'' diag(lambda_s))^T with s = x A^T: the fill of linear_forward onto the base
// layer's output instead of the bias (never merged: there is no weight to merge into).
std::tuple<at::Tensor, at::Tensor> adapter_forward_cpu(
    const at::Tensor& x, const at::Tensor& base, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& lambda_s, const at::Tensor& lambda_o) {
  check_adapter_forward(x, base, A, B, lambda_s, lambda_o, kDevice, kDtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = x.size(0), in = x.size(1), out = base.size(1), r = A.size(0);
  const auto xc = x.contiguous();
  if (!simd_path(x.scalar_type(), r, in, out)) {
    auto s = at::mm(xc, A.t());
    return {at::addmm(base, s, scaled(B.t(), lambda_s, lambda_o)), s};
  }
  const auto base_rows = base.stride(1) == 1 ? base : base.contiguous();
  auto y = at::empty({T, out}, x.options());
  const auto s = shrink_and_fill(xc, A, B, lambda_s, lambda_o, y, [&](int64_t b0, int64_t n) {
    return base_rows.narrow(0, b0, n);
  });
  return {y, s};
}

// grad lambda_s[j] = sum_o lambda_o[o] B[o, j] M[o, j] and grad lambda_o[o] = sum_j lambda_s[j]
// B[o, j] M[o, j], where M^T is the sum of the partials M_parts (parts, r, out); M and B in the
// data's dtype, sums in the accumulator type. One loop in parallel over column blocks: as tensor
// ops (a sum, a product with B^T, two mv) the same took ~0.2 ms per call at r = 8, out = 1024 in
// dispatch and thread wake-ups, and ~20 ms at r = 256, out = 11008 in B's transposed read. Here
// M^T is transposed 16 columns at a time into a small buffer (r lines of M^T, read once), so that
// B's rows and it run along r.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> lambda_grads(const at::Tensor& M_parts, const at::Tensor& B,
                                                const at::Tensor& lambda_s,
                                                const at::Tensor& lambda_o) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t parts = M_parts.size(0), r = M_parts.size(1), out = M_parts.size(2);
  const auto Mc = M_parts.contiguous(), Bc = B.contiguous();
  const auto ls_c = lambda_s.to(acc).contiguous(), lo_c = lambda_o.to(acc).contiguous();
  const scalar_t* m = Mc.const_data_ptr<scalar_t>();
  const scalar_t* b = Bc.const_data_ptr<scalar_t>();
  const acc_t* ls = ls_c.const_data_ptr<acc_t>();
  const acc_t* lo = lo_c.const_data_ptr<acc_t>();
  auto grad_o = at::empty({out}, ls_c.options());
  acc_t* go = grad_o.mutable_data_ptr<acc_t>();
  // grad lambda_s: partial sums per column block, added in block order (deterministic).
  constexpr int64_t kBlock = 512, kTile = 16;
  const int64_t blocks = (out + kBlock - 1) / kBlock;
  std::vector<acc_t> gs_parts(blocks * r, acc_t(0));
  at::parallel_for(0, blocks, 1, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      acc_t* gs_blk = gs_parts.data() + blk * r;
      std::vector<acc_t> tile(kTile * r);  // M[o0 + i, :] for the tile's columns, summed over parts
      for (int64_t o0 = blk * kBlock; o0 < std::min(out, (blk + 1) * kBlock); o0 += kTile) {
        const int64_t w = std::min(kTile, out - o0);
        std::fill(tile.begin(), tile.end(), acc_t(0));
        for (int64_t p = 0; p < parts; ++p)
          for (int64_t j = 0; j < r; ++j)
            for (int64_t i = 0; i < w; ++i)
              tile[i * r + j] += static_cast<acc_t>(m[(p * r + j) * out + o0 + i]);
        for (int64_t i = 0; i < w; ++i) {  // contiguous along j: vectorised
          const scalar_t* b_o = b + (o0 + i) * r;
          acc_t* mb = tile.data() + i * r;
          acc_t go_o = 0;
          for (int64_t j = 0; j < r; ++j) {
            mb[j] *= static_cast<acc_t>(b_o[j]);
            go_o += ls[j] * mb[j];
            gs_blk[j] += lo[o0 + i] * mb[j];
          }
          go[o0 + i] = go_o;
        }
      }
    }
  });
  auto grad_s = at::empty({r}, ls_c.options());
  acc_t* gs = grad_s.mutable_data_ptr<acc_t>();
  for (int64_t j = 0; j < r; ++j) {
    double sum = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) sum += gs_parts[blk * r + j];
    gs[j] = static_cast<acc_t>(sum);
  }
  return {grad_s, grad_o};
}

// The backward of linear_forward (weight defined: grad_x includes g W) and of adapter_forward
// (weight undefined: the adapter's part only, never merged). Masked-out outputs are undefined
// tensors (None in Python), like native_layer_norm_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& lambda_s, const at::Tensor& lambda_o,
    std::array<bool, 3> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool need_x = output_mask[0], need_lambda = output_mask[1] || output_mask[2];
  const int64_t T = grad_y.size(0), out = grad_y.size(1), in = A.size(1), r = A.size(0);
  const auto dtype = grad_y.scalar_type();
  const auto acc = acc_type(dtype);
  const bool has_weight = weight.defined();
  const bool merged = has_weight && merge_backward(T, out);
  const bool simd = simd_path(dtype, r, in, out);
  const bool fill_x = need_x && !merged && simd;
  const auto g = grad_y.contiguous();
  const auto sc = s.contiguous();

  at::Tensor grad_x, grad_lambda_s, grad_lambda_o;
  if (need_x) grad_x = at::empty({T, in}, g.options());
  // The fill: u = g B'' (B'' (out, r) in both layouts), then grad_x = u A'.
  const auto B_o = fill_x ? scaled(B, lambda_o, at::Tensor()) : at::Tensor();
  const auto B_oT = fill_x ? B_o.t().contiguous() : at::Tensor();
  const auto A_s = fill_x ? padded(scaled(A, lambda_s, at::Tensor())) : at::Tensor();
  // One partial M^T = s^T g (r, out) per thread, summed after the loop.
  const bool lambda_blocks = need_lambda && simd && m_in_blocks(r, out);
  const auto M_parts = lambda_blocks
                           ? at::zeros({at::get_num_threads(), r, out}, g.options().dtype(acc))
                           : at::Tensor();
  if (fill_x || lambda_blocks) {
    for_row_blocks(T, block_rows(out, g.element_size()), [&](int64_t b0, int64_t n) {
      const auto g_blk = g.narrow(0, b0, n);
      if (fill_x) {
        auto u = at::empty({n, r}, g.options().dtype(acc));
        thin_product(g_blk, B_o, B_oT, u);
        rank_update(grad_x.narrow(0, b0, n), u, A_s, at::Tensor());
      }
      if (lambda_blocks) accumulate_outer(M_parts[at::get_thread_num()], sc.narrow(0, b0, n), g_blk);
    });
  }
  if (fill_x && has_weight) grad_x.addmm_(g, weight);
  if (need_x && merged) at::mm_out(grad_x, g, merged_weight(weight, A, B, lambda_s, lambda_o));
  if (need_x && !simd && !merged) {
    const auto u = at::mm(g, scaled(B, lambda_o, at::Tensor()));
    at::mm_out(grad_x, u, scaled(A, lambda_s, at::Tensor()));
    if (has_weight) grad_x.addmm_(g, weight);
  }
  if (need_lambda) {
    const auto parts = lambda_blocks ? M_parts : at::mm(sc.t(), g).unsqueeze(0);
    at::Tensor grad_s, grad_o;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "giva_lambda_grads", [&] {
      std::tie(grad_s, grad_o) = lambda_grads<scalar_t>(parts, B, lambda_s, lambda_o);
    });
    if (output_mask[1]) grad_lambda_s = grad_s.to(lambda_s.scalar_type());
    if (output_mask[2]) grad_lambda_o = grad_o.to(lambda_o.scalar_type());
  }
  return {grad_x, grad_lambda_s, grad_lambda_o};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& lambda_s, const at::Tensor& lambda_o,
    std::array<bool, 3> output_mask) {
  check_linear_backward(grad_y, s, weight, A, B, lambda_s, lambda_o, kDevice, kDtypes);
  return backward(grad_y, s, weight, A, B, lambda_s, lambda_o, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adapter_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& lambda_s, const at::Tensor& lambda_o, std::array<bool, 3> output_mask) {
  check_backward("giva::adapter_backward", grad_y, s, at::Tensor(), A, B, lambda_s, lambda_o,
                 kDevice, kDtypes);
  return backward(grad_y, s, at::Tensor(), A, B, lambda_s, lambda_o, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(giva, CPU, m) {
  m.impl("linear_forward", &linear_forward_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
  m.impl("adapter_forward", &adapter_forward_cpu);
  m.impl("adapter_backward", &adapter_backward_cpu);
}

}  // namespace giva
