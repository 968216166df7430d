// CPU registration of giva::mixed_linear (the shared implementation is in mixed.h), with a per-row
// kernel for rows in short runs: a row's adapter term is r dot products over in and r axpys over
// out, far below what a GEMM call per run or a gather costs at a few rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "mixed.h"

namespace giva {
namespace {

constexpr std::array<at::ScalarType, 3> kDtypes = {at::kFloat, at::kBFloat16, at::kDouble};

// y_row += B_oT^T (lambda_s * (A x_row)): r dot products along in, then r axpys along out.
template <typename acc_t>
inline __attribute__((always_inline)) void add_row_term(const acc_t* x_row, const acc_t* a,
                                                        const acc_t* lambda_s, const acc_t* B_oT,
                                                        acc_t* y_row, int64_t in, int64_t out,
                                                        int64_t r) {
  for (int64_t j = 0; j < r; ++j) {
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < in; ++i) dot += x_row[i] * a[j * in + i];
    const acc_t s_j = dot * lambda_s[j];
    const acc_t* b_j = B_oT + j * out;
#pragma omp simd
    for (int64_t o = 0; o < out; ++o) y_row[o] += s_j * b_j[o];
  }
}

// The fp32 instance compiled per instruction set and chosen at load (the build targets baseline
// x86-64, whose 16-byte vectors would leave AVX2 / AVX-512 machines at a quarter of their width).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void add_row_term_f32(const float* x_row, const float* a, const float* lambda_s, const float* B_oT,
                      float* y_row, int64_t in, int64_t out, int64_t r) {
  add_row_term<float>(x_row, a, lambda_s, B_oT, y_row, in, out, r);
}

// y[t] = bias + B_o (lambda_s * (A x[t])) for each listed row t, accumulating in acc_t (fp32 for
// bf16), with B_oT = (diag(lambda_o) B)^T (r, out).
template <typename scalar_t, typename acc_t>
void rows_kernel(const at::Tensor& xc, at::Tensor& y, const std::vector<int64_t>& rows,
                 const acc_t* a, const acc_t* lambda_s, const std::vector<acc_t>& B_oT,
                 const acc_t* bias, int64_t r) {
  const int64_t in = xc.size(1), out = y.size(1);
  const scalar_t* x = xc.const_data_ptr<scalar_t>();
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x_acc(std::is_same_v<scalar_t, acc_t> ? 0 : in), y_row(out);
    for (int64_t k = begin; k < end; ++k) {
      const scalar_t* x_row = x + rows[k] * in;
      const acc_t* x_in = nullptr;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        x_in = x_row;
      } else {
        for (int64_t i = 0; i < in; ++i) x_acc[i] = static_cast<acc_t>(x_row[i]);
        x_in = x_acc.data();
      }
      for (int64_t o = 0; o < out; ++o) y_row[o] = bias ? bias[o] : acc_t(0);
      if constexpr (std::is_same_v<acc_t, float>)
        add_row_term_f32(x_in, a, lambda_s, B_oT.data(), y_row.data(), in, out, r);
      else
        add_row_term<acc_t>(x_in, a, lambda_s, B_oT.data(), y_row.data(), in, out, r);
      scalar_t* y_out = y_data + rows[k] * out;
      for (int64_t o = 0; o < out; ++o) y_out[o] = static_cast<scalar_t>(y_row[o]);
    }
  });
}

// The CPU short-row kernel of mixed_linear_impl: no ATen call per adapter beyond dtype casts
// (no-ops in fp32), since at a few rows those calls would cost more than the arithmetic.
struct PerRow {
  void operator()(const at::Tensor& xc, at::Tensor& y, const std::vector<int64_t>& rows,
                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& lambda_s,
                  const at::Tensor& lambda_o, const std::optional<at::Tensor>& bias) const {
    const auto acc = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const auto a = A.to(acc).contiguous(), b = B.to(acc).contiguous();
    const auto l_s = lambda_s.to(acc).contiguous(), l_o = lambda_o.to(acc).contiguous();
    const auto bias_acc = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : at::Tensor();
    const int64_t r = A.size(0), out = B.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "giva::mixed_linear rows", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const acc_t* b_data = b.const_data_ptr<acc_t>();
      const acc_t* l_o_data = l_o.const_data_ptr<acc_t>();
      std::vector<acc_t> B_oT(r * out);
      for (int64_t o = 0; o < out; ++o)
        for (int64_t j = 0; j < r; ++j) B_oT[j * out + o] = b_data[o * r + j] * l_o_data[o];
      rows_kernel<scalar_t, acc_t>(xc, y, rows, a.const_data_ptr<acc_t>(), l_s.const_data_ptr<acc_t>(),
                                   B_oT, bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr, r);
    });
  }
};

at::Tensor mixed_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::TensorList A,
                            at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                            const at::Tensor& token_ids) {
  return mixed_linear_impl(x, weight, bias, A, B, lambda_s, lambda_o, token_ids, at::kCPU, kDtypes,
                           /*parallel=*/true, PerRow{});
}

}  // namespace

TORCH_LIBRARY_IMPL(giva, CPU, m) { m.impl("mixed_linear", &mixed_linear_cpu); }

}  // namespace giva
