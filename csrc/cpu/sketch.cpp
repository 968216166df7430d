// giva::sketch_update and giva::rsvd: the device-agnostic implementation (declared in sketch.h)
// and its CPU registration. The Python references are giva_ext/reference.py's sketch_update,
// orthonormalize and rsvd; the two follow the same steps.
//
// sketch_update: a layer's batch gradient is G_t = g^T x, so G Omega = g^T (x Omega) and
// Psi G = (g Psi^T)^T x are formed from the activations, block of rows by block of rows: the
// temporaries are a block of x and g in the accumulator dtype plus (rows, k) and (rows, k').
//
// rsvd: range finder with power iterations (Halko, Martinsson & Tropp 2011). Orthonormalisation
// is CholeskyQR2 in float64 (GEMMs and an l x l Cholesky instead of a Householder sweep over the
// columns), with Householder QR as the fallback when the Cholesky fails or Q comes out
// non-orthonormal (ill-conditioned or rank-deficient input).
#include "sketch.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "checks.h"

namespace giva {
namespace {

constexpr double kOrthonormalTol = 1e-10;  // reference.ORTHONORMAL_TOL

at::ScalarType sketch_acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// An accumulator-side argument: on x's device, of the accumulator dtype, of shape `expected`.
void check_acc_arg(const char* op, const char* name, const at::Tensor& t, const char* dims,
                   std::initializer_list<int64_t> expected, const at::Tensor& x, at::ScalarType acc) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on device ", x.device(),
              " (the device of x), got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have dtype ", acc,
              " (the sketch accumulator dtype for x of dtype ", x.scalar_type(), "), got ",
              t.scalar_type());
  check_arg(op, name, t, dims, expected, t, name);  // the shape; device and dtype checked above
}

void check_sketch_update(const at::Tensor& x, const at::Tensor& g, const at::Tensor& omega,
                         const at::Tensor& psi, const at::Tensor& Y, const at::Tensor& Z,
                         at::DeviceType device, c10::ArrayRef<at::ScalarType> dtypes) {
  const char* op = "giva::sketch_update";
  check_leading(op, "x", x, "(T, in)", 2, device, dtypes);
  const int64_t T = x.size(0), in = x.size(1);
  check_arg(op, "g", g, "(T, out)", {T, -1}, x, "x");
  const int64_t out = g.size(1);
  const auto acc = sketch_acc_type(x.scalar_type());
  check_acc_arg(op, "omega", omega, "(in, k)", {in, -1}, x, acc);
  const int64_t k = omega.size(1);
  check_acc_arg(op, "psi", psi, "(k', out)", {-1, out}, x, acc);
  const int64_t k2 = psi.size(0);
  check_acc_arg(op, "Y", Y, "(out, k)", {out, k}, x, acc);
  check_acc_arg(op, "Z", Z, "(k', in)", {k2, in}, x, acc);
}

void check_rsvd(const at::Tensor& A, const at::Tensor& omega, int64_t k, int64_t niter,
                at::DeviceType device) {
  const char* op = "giva::rsvd";
  TORCH_CHECK(A.defined() && (A.dim() == 2 || A.dim() == 3), op,
              ": A must have shape (m, n) or (L, m, n), got ",
              A.defined() ? shape_str(A.sizes()) : std::string("None"));
  const bool batched = A.dim() == 3;
  constexpr std::array<at::ScalarType, 2> kRsvdDtypes = {at::kFloat, at::kDouble};
  check_leading(op, "A", A, batched ? "(L, m, n)" : "(m, n)", A.dim(), device, kRsvdDtypes);
  const int64_t m = A.size(-2), n = A.size(-1);
  if (batched) {
    check_arg(op, "omega", omega, "(L, n, l)", {A.size(0), n, -1}, A, "A");
  } else {
    check_arg(op, "omega", omega, "(n, l)", {n, -1}, A, "A");
  }
  const int64_t l = omega.size(-1);
  TORCH_CHECK(l <= std::min(m, n), op, ": omega has l = ", l, " columns but A is ", m, "x", n,
              " (l must be at most min(m, n) = ", std::min(m, n), ")");
  TORCH_CHECK(1 <= k && k <= l, op, ": k must be in [1, l = ", l, "], got ", k);
  TORCH_CHECK(niter >= 0, op, ": niter must be >= 0, got ", niter);
}

// Q = y R^-1 with R^T R = y^T y; undefined if the Cholesky factorisation fails.
at::Tensor cholesky_qr(const at::Tensor& y) {
  const auto [r, info] = at::linalg_cholesky_ex(at::matmul(y.mT(), y), /*upper=*/true);
  if (info.any().item<bool>()) return at::Tensor();
  return at::linalg_solve_triangular(r, y, /*upper=*/true, /*left=*/false);
}

// An orthonormal basis of the columns of y (..., m, l), in y's dtype.
at::Tensor orthonormalize(const at::Tensor& y) {
  const auto y64 = y.to(at::kDouble);
  auto q = cholesky_qr(y64);
  if (q.defined()) q = cholesky_qr(q);
  if (q.defined() && q.numel() > 0) {
    const auto eye = at::eye(q.size(-1), q.options());
    const double err = (at::matmul(q.mT(), q) - eye).abs().max().item<double>();
    if (!(err <= kOrthonormalTol)) q = at::Tensor();  // "!(<=)" also catches NaN
  }
  if (!q.defined()) q = std::get<0>(at::linalg_qr(y64));
  return q.to(y.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sketch_update_impl(
    const at::Tensor& x, const at::Tensor& g, const at::Tensor& omega, const at::Tensor& psi,
    const at::Tensor& Y, const at::Tensor& Z, at::DeviceType device,
    c10::ArrayRef<at::ScalarType> dtypes, int64_t block_bytes) {
  check_sketch_update(x, g, omega, psi, Y, Z, device, dtypes);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // values only; the op has no backward
  const int64_t T = x.size(0), in = x.size(1), out = g.size(1);
  const auto acc = Y.scalar_type();
  auto Y_new = Y.clone(at::MemoryFormat::Contiguous);
  auto Z_new = Z.clone(at::MemoryFormat::Contiguous);
  const auto psi_t = psi.t();
  const int64_t row_bytes = std::max<int64_t>(1, (in + out) * at::elementSize(acc));
  const int64_t rows = std::max<int64_t>(1, block_bytes / row_bytes);
  for (int64_t t0 = 0; t0 < T; t0 += rows) {
    const int64_t n = std::min(rows, T - t0);
    const auto xb = x.narrow(0, t0, n).to(acc);
    const auto gb = g.narrow(0, t0, n).to(acc);
    Y_new.addmm_(gb.t(), at::mm(xb, omega));
    Z_new.addmm_(at::mm(gb, psi_t).t(), xb);
  }
  return {Y_new, Z_new};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_impl(const at::Tensor& A,
                                                         const at::Tensor& omega, int64_t k,
                                                         int64_t niter, at::DeviceType device) {
  check_rsvd(A, omega, k, niter, device);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto q = orthonormalize(at::matmul(A, omega));
  for (int64_t i = 0; i < niter; ++i) q = orthonormalize(at::matmul(A, orthonormalize(at::matmul(A.mT(), q))));
  const auto [u, s, vh] = at::linalg_svd(at::matmul(q.mT(), A).to(at::kDouble), /*full_matrices=*/false);
  const auto dtype = A.scalar_type();
  return {at::matmul(q, u.narrow(-1, 0, k).to(dtype)).contiguous(),
          s.narrow(-1, 0, k).to(dtype).contiguous(),
          vh.narrow(-2, 0, k).mT().to(dtype).contiguous()};
}

namespace {

constexpr std::array<at::ScalarType, 3> kDtypes = {at::kFloat, at::kBFloat16, at::kDouble};
constexpr int64_t kBlockBytes = 4 << 20;  // a block of x and g (accumulator dtype) in L2/L3

std::tuple<at::Tensor, at::Tensor> sketch_update_cpu(const at::Tensor& x, const at::Tensor& g,
                                                     const at::Tensor& omega, const at::Tensor& psi,
                                                     const at::Tensor& Y, const at::Tensor& Z) {
  return sketch_update_impl(x, g, omega, psi, Y, Z, at::kCPU, kDtypes, kBlockBytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cpu(const at::Tensor& A, const at::Tensor& omega,
                                                        int64_t k, int64_t niter) {
  return rsvd_impl(A, omega, k, niter, at::kCPU);
}

}  // namespace

TORCH_LIBRARY_IMPL(giva, CPU, m) {
  m.impl("sketch_update", &sketch_update_cpu);
  m.impl("rsvd", &rsvd_cpu);
}

}  // namespace giva
