// CPU kernels of giva::linear_forward / giva::linear_backward (DESIGN.md §2).
//
// The base GEMMs dominate; the adapter's cost is its thin (K or N = r) products and the memory
// passes over T-sized tensors they add. Two paths, chosen per call by use_merged():
//
// merged (large r, weight small next to the tokens): W_eff = W + B'' A' (out x in) is formed and
//   used in place of W: y = x W_eff^T + bias, grad_x = g W_eff (rebuilt in backward, not saved).
//   The adapter then costs s = x A^T, M = g^T s and two rank-r updates of W, no T-sized pass.
// fold (otherwise): the small adapter term is written into the output first and the base GEMM
//   accumulates onto it (beta = 1), reading it tile by tile while compute-bound:
//     forward   y = [s*lambda_s, 1] [B'', bias]^T, then y += x W^T
//     backward  grad_x = ((g B'')*lambda_s) A, then grad_x += g W
//   (nn.Linear with a bias does the same: it broadcasts the bias into y before its GEMM.)
// In bfloat16, W_eff rounds W + update to W's precision; measured against an fp32 reference its
// y error stays below the bf16 composite's (which rounds x W^T on its own), so both dtypes share
// the rule.
//
// The fold path's thin products and M run per cache-sized block of rows (x or g read once, while
// hot), in parallel over blocks; bfloat16 accumulates them, M and the lambda gradients in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "checks.h"

namespace giva {
namespace {

constexpr auto kDevice = at::kCPU;
constexpr std::array<at::ScalarType, 3> kDtypes = {at::kFloat, at::kBFloat16, at::kDouble};

at::ScalarType acc_type(at::ScalarType t) { return t == at::kBFloat16 ? at::kFloat : t; }

// W_eff costs a read and a write of W (out*in) and an out x r x in product per direction; the
// fold path instead runs three more thin T-row products (the two fills and g B''). Measured on
// 2-core AVX-512, fp32: folding wins or ties for r <= 32 at every shape tried (T 512..4096,
// in=out 1024 and 4096); merging wins at r = 64 once T >= 2*min(in, out) (T=2048, 1024x1024).
bool use_merged(int64_t T, int64_t in, int64_t out, int64_t r) {
  return r >= 32 && 2 * std::min(in, out) <= T;
}

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& lambda_s, const at::Tensor& lambda_o) {
  return at::addmm(weight, B * lambda_o.unsqueeze(1), A * lambda_s.unsqueeze(1));
}

// Rows per block so that a block of a T-sized operand (`width` wide) stays in L2.
int64_t block_rows(int64_t width, int64_t elem_size) {
  constexpr int64_t kBlockBytes = 1 << 20;
  return std::max<int64_t>(16, kBlockBytes / std::max<int64_t>(1, width * elem_size));
}

// Runs body(b0, n) over blocks of `rows` rows of [0, T), in parallel, below autograd: the ATen
// calls inside compute values only (the op's backward is registered in ops.py), and the guard is
// thread-local, so each worker sets it.
template <typename F>
void for_row_blocks(int64_t T, int64_t rows, const F& body) {
  at::parallel_for(0, T, rows, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t b0 = t0; b0 < t1; b0 += rows) body(b0, std::min(rows, t1 - b0));
  });
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

  if (use_merged(T, in, out, r)) {
    const auto w_eff = merged_weight(weight, A, B, lambda_s, lambda_o);
    auto s = at::mm(xc, A.t());
    auto y = has_bias ? at::addmm(*bias_opt, xc, w_eff.t()) : at::mm(xc, w_eff.t());
    return {y, s};
  }

  // rhs = [B'', bias] (out, r + 1): the bias rides as an extra K column, so one product writes y.
  const int64_t k = r + (has_bias ? 1 : 0);
  auto rhs = at::empty({out, k}, x.options());
  rhs.narrow(1, 0, r).copy_(B).mul_(lambda_o.unsqueeze(1));
  if (has_bias) rhs.select(1, r).copy_(*bias_opt);
  auto s = at::empty({T, r}, x.options());
  auto y = at::empty({T, out}, x.options());
  for_row_blocks(T, block_rows(in, x.element_size()), [&](int64_t b0, int64_t n) {
    auto s_blk = s.narrow(0, b0, n);
    auto y_blk = y.narrow(0, b0, n);
    s_blk.copy_(at::mm(A, xc.narrow(0, b0, n).t()).t());  // A x^T: the faster layout for small r
    auto lhs = at::empty({n, k}, x.options());  // [s * lambda_s, 1]
    lhs.narrow(1, 0, r).copy_(s_blk).mul_(lambda_s);
    if (has_bias) lhs.select(1, r).fill_(1);
    at::mm_out(y_blk, lhs, rhs.t());
  });
  y.addmm_(xc, weight.t());
  return {y, s};
}

// Masked-out outputs are undefined tensors (None in Python), like native_layer_norm_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& s, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& lambda_s, const at::Tensor& lambda_o,
    std::array<bool, 3> output_mask) {
  check_linear_backward(grad_y, s, weight, A, B, lambda_s, lambda_o, kDevice, kDtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool need_x = output_mask[0], need_lambda = output_mask[1] || output_mask[2];
  const int64_t T = grad_y.size(0), out = grad_y.size(1), in = weight.size(1), r = A.size(0);
  const auto dtype = grad_y.scalar_type();
  const auto acc = acc_type(dtype);
  const bool merged = use_merged(T, in, out, r);
  const bool fill_x = need_x && !merged;
  const auto g = grad_y.contiguous();
  const auto sc = s.contiguous();
  const auto B_acc = B.to(acc);
  const auto lambda_s_acc = lambda_s.to(acc);
  const auto lambda_o_acc = lambda_o.to(acc);

  at::Tensor grad_x, grad_lambda_s, grad_lambda_o;
  if (need_x) grad_x = at::empty({T, in}, g.options());
  // B''^T (r, out); and one partial M^T = s^T g (r, out) per thread, summed after the loop.
  // Transposed, both thin products have the long dimension as N, which BLAS runs faster.
  const auto B_oT = fill_x ? (B_acc * lambda_o_acc.unsqueeze(1)).t().contiguous() : at::Tensor();
  const auto M_parts = need_lambda ? at::zeros({at::get_num_threads(), r, out}, g.options().dtype(acc))
                                   : at::Tensor();
  if (fill_x || need_lambda) {
    for_row_blocks(T, block_rows(out, g.element_size()), [&](int64_t b0, int64_t n) {
      const auto g_blk = g.narrow(0, b0, n).to(acc);
      if (fill_x) {
        const auto uT = at::mm(B_oT, g_blk.t()).mul_(lambda_s_acc.unsqueeze(1)).to(dtype);
        auto gx_blk = grad_x.narrow(0, b0, n);
        at::mm_out(gx_blk, uT.t(), A);
      }
      if (need_lambda) M_parts[at::get_thread_num()].addmm_(sc.narrow(0, b0, n).to(acc).t(), g_blk);
    });
  }
  if (fill_x) grad_x.addmm_(g, weight);
  if (need_x && merged) at::mm_out(grad_x, g, merged_weight(weight, A, B, lambda_s, lambda_o));
  if (need_lambda) {
    const auto MBT = M_parts.sum(0).mul_(B_acc.t());  // (M * B)^T, (r, out)
    if (output_mask[1]) grad_lambda_s = MBT.mv(lambda_o_acc).to(dtype);
    if (output_mask[2]) grad_lambda_o = MBT.t().mv(lambda_s_acc).to(dtype);
  }
  return {grad_x, grad_lambda_s, grad_lambda_o};
}

}  // namespace

TORCH_LIBRARY_IMPL(giva, CPU, m) {
  m.impl("linear_forward", &linear_forward_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace giva
