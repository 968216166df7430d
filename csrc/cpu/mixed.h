// giva::mixed_linear (inference only): one batch whose rows use different adapters.
//
// The base GEMM runs once for the whole batch. Before it, y is filled row group by row group with
// bias + s_i B_i''^T, where s_i = x_rows A_i'^T is adapter i's shrink on its own rows only, and
// then the base GEMM accumulates onto y (beta = 1), as the single-adapter fold path does. Runs of
// rows with one adapter (a sequence, or a batch sorted by adapter) work on views of x and y; rows
// in short runs (decoding: one token per sequence) are handled per row by the device's
// short-row kernel.
//
// Written against ATen only, so the CPU and CUDA registrations share it. The row grouping reads
// token_ids on the host (one device-to-host copy of T int64 on CUDA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"

namespace giva {

inline void check_mixed_linear(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::TensorList A,
                               at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                               const at::Tensor& token_ids, at::DeviceType device,
                               c10::ArrayRef<at::ScalarType> dtypes) {
  const char* op = "giva::mixed_linear";
  check_leading(op, "x", x, "(T, in)", 2, device, dtypes);
  const int64_t T = x.size(0), in = x.size(1);
  check_arg(op, "weight", weight, "(out, in)", {-1, in}, x, "x");
  const int64_t out = weight.size(0);
  if (bias.has_value() && bias->defined()) check_arg(op, "bias", *bias, "(out,)", {out}, x, "x");
  const size_t n = A.size();
  TORCH_CHECK(B.size() == n && lambda_s.size() == n && lambda_o.size() == n, op,
              ": A, B, lambda_s and lambda_o must list one tensor per adapter, got ", n, ", ",
              B.size(), ", ", lambda_s.size(), " and ", lambda_o.size());
  for (size_t i = 0; i < n; ++i) {
    const auto at_i = [&](const char* name) { return std::string(name) + "[" + std::to_string(i) + "]"; };
    check_arg(op, at_i("A").c_str(), A[i], "(r, in)", {-1, in}, x, "x");
    const int64_t r = A[i].size(0);
    check_arg(op, at_i("B").c_str(), B[i], "(out, r)", {out, r}, x, "x");
    check_arg(op, at_i("lambda_s").c_str(), lambda_s[i], "(r,)", {r}, x, "x", /*float32_ok=*/true);
    check_arg(op, at_i("lambda_o").c_str(), lambda_o[i], "(out,)", {out}, lambda_s[i],
              at_i("lambda_s").c_str());
  }
  TORCH_CHECK(token_ids.defined(), op, ": token_ids must be a tensor, got None");
  TORCH_CHECK(token_ids.device() == x.device(), op, ": token_ids must be on device ", x.device(),
              " (the device of x), got ", token_ids.device());
  TORCH_CHECK(token_ids.scalar_type() == at::kLong, op, ": token_ids must have dtype int64, got ",
              token_ids.scalar_type());
  TORCH_CHECK(token_ids.dim() == 1 && token_ids.size(0) == T, op,
              ": token_ids must have shape (T,) = (", T, ",), got ", shape_str(token_ids.sizes()));
}

// The rows of each group as runs [begin, end): group 0 holds the rows without an adapter (id -1),
// group i + 1 those of adapter i. Checks every id.
inline std::vector<std::vector<std::pair<int64_t, int64_t>>> group_rows(const at::Tensor& token_ids,
                                                                         int64_t adapters) {
  const auto ids = token_ids.to(at::kCPU).contiguous();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  std::vector<std::vector<std::pair<int64_t, int64_t>>> groups(adapters + 1);
  for (int64_t t = 0, T = ids.numel(); t < T;) {
    TORCH_CHECK(id[t] >= -1 && id[t] < adapters, "giva::mixed_linear: token_ids[", t, "] = ", id[t],
                " is not in [-1, ", adapters, ") (", adapters, " adapters)");
    int64_t end = t + 1;
    while (end < T && id[end] == id[t]) ++end;
    groups[id[t] + 1].emplace_back(t, end);
    t = end;
  }
  return groups;
}

// The vectors fold into the bases (docs/design.md §2), in fp32 for half types:
// A_s = diag(lambda_s) A and B_o = diag(lambda_o) B, in saved_s_dtype of x's dtype (x's, or fp32
// beside fp16, where s = x A^T can pass fp16's range: see adapter_rows).
inline std::pair<at::Tensor, at::Tensor> folded_bases(const at::Tensor& A, const at::Tensor& B,
                                                      const at::Tensor& lambda_s,
                                                      const at::Tensor& lambda_o) {
  const auto dtype = saved_s_dtype(A.scalar_type());
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return {(A.to(acc) * lambda_s.to(acc).unsqueeze(1)).to(dtype),
          (B.to(acc) * lambda_o.to(acc).unsqueeze(1)).to(dtype)};
}

// y_rows = bias + (x_rows A_s^T) B_o^T, with the products in the folded bases' dtype (fp32 beside
// fp16 x, then rounded once into y_rows: with lambda_o = 0 the rows get the bias exactly).
inline void adapter_rows(const at::Tensor& x_rows, const at::Tensor& A_s, const at::Tensor& B_o,
                         const std::optional<at::Tensor>& bias, at::Tensor y_rows) {
  const auto acc = A_s.scalar_type();
  const bool has_bias = bias.has_value() && bias->defined();
  const auto s = at::mm(x_rows.to(acc), A_s.t());
  if (acc == y_rows.scalar_type()) {
    if (has_bias) at::addmm_out(y_rows, *bias, s, B_o.t());
    else at::mm_out(y_rows, s, B_o.t());
  } else {
    y_rows.copy_(has_bias ? at::addmm(bias->to(acc), s, B_o.t()) : at::mm(s, B_o.t()));
  }
}

// Rows in short runs through a GEMM call per run would pay a call per run: the default gathers an
// adapter's short-run rows, runs its shrink and expand on them, and scatters the result back.
// A device may pass its own kernel with this signature (one adapter: A, B, lambda_s, lambda_o).
struct GatherRows {
  void operator()(const at::Tensor& xc, at::Tensor& y, const std::vector<int64_t>& rows,
                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& lambda_s,
                  const at::Tensor& lambda_o, const std::optional<at::Tensor>& bias) const {
    const auto [A_s, B_o] = folded_bases(A, B, lambda_s, lambda_o);
    const auto index = at::tensor(rows, at::kLong).to(xc.device());
    auto y_rows = at::empty({index.size(0), y.size(1)}, y.options());
    adapter_rows(xc.index_select(0, index), A_s, B_o, bias, y_rows);
    y.index_copy_(0, index, y_rows);
  }
};

// The kernel of one device type, after checking the arguments for it. parallel: run the groups on
// ATen's CPU thread pool (CPU only: a CUDA stream is per thread). short_rows: how rows outside
// long runs get their adapter term (GatherRows, or a device's own per-row kernel).
template <typename ShortRows>
at::Tensor mixed_linear_impl(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias_opt, at::TensorList A,
                             at::TensorList B, at::TensorList lambda_s, at::TensorList lambda_o,
                             const at::Tensor& token_ids, at::DeviceType device,
                             c10::ArrayRef<at::ScalarType> dtypes, bool parallel,
                             const ShortRows& short_rows) {
  check_mixed_linear(x, weight, bias_opt, A, B, lambda_s, lambda_o, token_ids, device, dtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const int64_t T = x.size(0), out = weight.size(0);
  const auto groups = group_rows(token_ids, static_cast<int64_t>(A.size()));
  const auto xc = x.contiguous();
  auto y = at::empty({T, out}, x.options());

  // Rows without an adapter (group 0) get the bias; a run of adapter rows at least kViewRows long
  // works on views of x and y; the shorter ones go to short_rows.
  constexpr int64_t kViewRows = 16;
  const auto fill = [&](int64_t g) {
    at::AutoDispatchBelowADInplaceOrView below_autograd_here;  // thread-local: each worker sets it
    if (g == 0) {
      for (const auto& [begin, end] : groups[0]) {
        auto y_rows = y.narrow(0, begin, end - begin);
        if (has_bias) y_rows.copy_(bias_opt->unsqueeze(0).expand_as(y_rows));
        else y_rows.zero_();
      }
      return;
    }
    const auto i = g - 1;  // the adapter
    at::Tensor A_s, B_o;    // folded on the first long run
    std::vector<int64_t> short_run_rows;
    for (const auto& [begin, end] : groups[g]) {
      if (end - begin < kViewRows) {
        for (int64_t t = begin; t < end; ++t) short_run_rows.push_back(t);
        continue;
      }
      if (!A_s.defined()) std::tie(A_s, B_o) = folded_bases(A[i], B[i], lambda_s[i], lambda_o[i]);
      adapter_rows(xc.narrow(0, begin, end - begin), A_s, B_o, bias_opt,
                   y.narrow(0, begin, end - begin));
    }
    if (!short_run_rows.empty())
      short_rows(xc, y, short_run_rows, A[i], B[i], lambda_s[i], lambda_o[i], bias_opt);
  };
  std::vector<int64_t> busy;
  for (size_t g = 0; g < groups.size(); ++g)
    if (!groups[g].empty()) busy.push_back(static_cast<int64_t>(g));
  if (parallel) {
    // One group runs inline with every thread for its GEMMs; several share the pool.
    at::parallel_for(0, static_cast<int64_t>(busy.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) fill(busy[k]);
    });
  } else {
    for (const auto g : busy) fill(g);
  }
  y.addmm_(xc, weight.t());
  return y;
}

}  // namespace giva
