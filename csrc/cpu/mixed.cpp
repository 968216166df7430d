// CPU registration of giva::mixed_linear. fp32 on CPUs where the SIMD thin kernels are fast runs
// every run of rows through them (mixed_linear_thin); other dtypes and CPUs take the shared
// implementation of mixed.h with a per-row kernel for rows in short runs: a row's adapter term is
// r dot products over in and r axpys over out, far below what a GEMM call per run or a gather
// costs at a few rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "mixed.h"
#include "thin_kernels.h"

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

// fp32 on CPUs where the SIMD thin kernels are fast: every run, long or short, through them, in
// parallel over runs. A run of 32 tokens through at::mm pays ~10 us of call overhead per GEMM,
// which for a batch of 64 sequences over 16 adapters adds up to more than the arithmetic.
at::Tensor mixed_linear_thin(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias_opt, at::TensorList A,
                             at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                             const at::Tensor& token_ids) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = x.size(0), in = x.size(1), out = weight.size(0);
  const auto groups = group_rows(token_ids, static_cast<int64_t>(A.size()));
  const auto xc = x.contiguous();
  auto y = at::empty({T, out}, x.options());
  const auto bias = bias_opt.has_value() && bias_opt->defined() ? bias_opt->contiguous() : at::Tensor();
  // Folded bases of each adapter with rows: A_s = diag(lambda_s) A (r, in) and B_oT =
  // (diag(lambda_o) B)^T (r, out), rows padded by 16 floats (power-of-two widths would map every
  // row to the same L1 sets).
  std::vector<std::vector<float>> a_s(A.size()), b_oT(A.size());
  std::vector<std::tuple<int64_t, int64_t, int64_t>> runs;  // (adapter or -1, begin, end)
  std::vector<int64_t> busy;                                // adapters with rows
  for (size_t g = 0; g < groups.size(); ++g) {
    for (const auto& [begin, end] : groups[g]) runs.emplace_back(static_cast<int64_t>(g) - 1, begin, end);
    if (g > 0 && !groups[g].empty()) busy.push_back(static_cast<int64_t>(g) - 1);
  }
  const auto fold = [&](int64_t i) {
    at::AutoDispatchBelowADInplaceOrView below_autograd_here;  // thread-local: each worker sets it
    const int64_t r = A[i].size(0);
    const auto a = A[i].contiguous(), b = B[i].contiguous();
    const auto l_s = lambda_s[i].contiguous(), l_o = lambda_o[i].contiguous();
    const float *ad = a.const_data_ptr<float>(), *bd = b.const_data_ptr<float>();
    const float *lsd = l_s.const_data_ptr<float>(), *lod = l_o.const_data_ptr<float>();
    a_s[i].resize(r * (in + 16));
    b_oT[i].resize(r * (out + 16));
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t c = 0; c < in; ++c) a_s[i][j * (in + 16) + c] = ad[j * in + c] * lsd[j];
      for (int64_t o = 0; o < out; ++o) b_oT[i][j * (out + 16) + o] = bd[o * r + j] * lod[o];
    }
  };
  // Folding costs as much as the adapter's arithmetic on a few rows (decoding): in parallel too.
  at::parallel_for(0, static_cast<int64_t>(busy.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) fold(busy[k]);
  });
  const float* x_data = xc.const_data_ptr<float>();
  float* y_data = y.mutable_data_ptr<float>();
  const float* bias_data = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<float> s;
    for (int64_t k = first; k < last; ++k) {
      const auto [i, begin, end] = runs[k];
      const int64_t n = end - begin;
      float* y_run = y_data + begin * out;
      if (i < 0) {  // no adapter: the bias (a rank-0 update from it)
        cpu::rank_update(n, out, 0, nullptr, 0, nullptr, 0, bias_data, 0, y_run, out);
        continue;
      }
      const int64_t r = A[i].size(0);
      s.resize(n * r);
      cpu::rows_dot(n, r, in, x_data + begin * in, in, a_s[i].data(), in + 16, s.data(), r);
      cpu::rank_update(n, out, r, s.data(), r, b_oT[i].data(), out + 16, bias_data, 0, y_run, out);
    }
  });
  y.addmm_(xc, weight.t());
  return y;
}

at::Tensor mixed_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::TensorList A,
                            at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                            const at::Tensor& token_ids) {
  if (x.scalar_type() == at::kFloat && cpu::thin_kernels_fast()) {
    check_mixed_linear(x, weight, bias, A, B, lambda_s, lambda_o, token_ids, at::kCPU, kDtypes);
    return mixed_linear_thin(x, weight, bias, A, B, lambda_s, lambda_o, token_ids);
  }
  return mixed_linear_impl(x, weight, bias, A, B, lambda_s, lambda_o, token_ids, at::kCPU, kDtypes,
                           /*parallel=*/true, PerRow{});
}

}  // namespace

TORCH_LIBRARY_IMPL(giva, CPU, m) { m.impl("mixed_linear", &mixed_linear_cpu); }

}  // namespace giva
