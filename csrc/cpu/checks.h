// Argument validation shared by the giva ops: every tensor is checked for device, dtype and shape
// before any work, and the message names the argument and what was expected. Device-agnostic, so a
// CUDA kernel can include it too.
//
// Sizes need no bound here: the CPU and CUDA kernels index with int64 throughout (T * in and
// T * out may pass 2^31), the CUDA launches check their grids against CUDA's limits, and any size
// may be 0 (empty results, or sums over nothing: zeros). Any strides are accepted (views, stride 0
// from expand); kernels that need unit column stride make a contiguous copy first.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace giva {

// Sizes as "(2, 3)" / "(5,)"; -1 renders as "?" (a size not fixed by earlier arguments).
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) os << ", ";
    if (sizes[i] < 0) os << "?"; else os << sizes[i];
  }
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

// Whether a tensor of dtype t may go with a reference of dtype ref where float32 is allowed too:
// the trainable vectors may be float32 beside float16 / bfloat16 data (kept in float32 for the
// optimizer, as PEFT keeps its adapters).
inline bool float32_beside(at::ScalarType t, at::ScalarType ref) {
  return t == at::kFloat && (ref == at::kHalf || ref == at::kBFloat16);
}

// The dtype of s = x A^T, the activation linear_forward saves for backward: float32 beside float16
// x, else x's dtype. s sums `in` products and can pass float16's 65504 where the layer's output
// does not, and inf * lambda_o = 0 would make the output NaN (giva_ext.reference.saved_s_dtype).
inline at::ScalarType saved_s_dtype(at::ScalarType x) {
  return x == at::kHalf ? at::kFloat : x;
}

// t must be on `device`, of `dtype` (or float32 beside a half dtype, if float32_ok), with shape
// `expected` (-1 = any size), described symbolically by `dims` (e.g. "(r, in)"); the errors say
// where device and dtype come from (e.g. "the device of x", "the dtype of x").
inline void check_arg_as(const char* op, const char* name, const at::Tensor& t, const char* dims,
                         std::initializer_list<int64_t> expected, c10::Device device,
                         const std::string& device_source, at::ScalarType dtype,
                         const std::string& dtype_source, bool float32_ok = false) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on device ", device, " (",
              device_source, "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype || (float32_ok && float32_beside(t.scalar_type(), dtype)),
              op, ": ", name, " must have dtype ", dtype,
              float32_ok && float32_beside(at::kFloat, dtype) ? " or Float" : "", " (",
              dtype_source, "), got ", t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) {
    const int64_t e = expected.begin()[i];
    ok = e < 0 || t.size(static_cast<int64_t>(i)) == e;
  }
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", dims, " = ",
              shape_str(c10::IntArrayRef(expected.begin(), expected.size())), ", got ",
              shape_str(t.sizes()));
}

// check_arg_as with ref's device and dtype.
inline void check_arg(const char* op, const char* name, const at::Tensor& t, const char* dims,
                      std::initializer_list<int64_t> expected, const at::Tensor& ref,
                      const char* ref_name, bool float32_ok = false) {
  check_arg_as(op, name, t, dims, expected, ref.device(), std::string("the device of ") + ref_name,
               ref.scalar_type(), std::string("the dtype of ") + ref_name, float32_ok);
}

// The tensor that sets dtype and device for the others: device type and dtype must be supported.
inline void check_leading(const char* op, const char* name, const at::Tensor& t, const char* dims,
                          int64_t ndim, at::DeviceType device,
                          c10::ArrayRef<at::ScalarType> dtypes) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be on a ", device,
              " device for this kernel, got ", t.device());
  bool dtype_ok = false;
  std::ostringstream allowed;
  for (const auto d : dtypes) {
    dtype_ok = dtype_ok || d == t.scalar_type();
    allowed << (allowed.tellp() > 0 ? ", " : "") << d;
  }
  TORCH_CHECK(dtype_ok, op, ": ", name, " must have dtype in {", allowed.str(), "} on ", device,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must have shape ", dims, " (", ndim,
              "-D), got ", shape_str(t.sizes()));
}

// A (r, in), B (out, r), lambda_s (r,), lambda_o (out,) beside `ref` (x or grad_y), of every op.
inline void check_adapter_args(const char* op, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& lambda_s, const at::Tensor& lambda_o,
                               int64_t in, int64_t out, int64_t r, const at::Tensor& ref,
                               const char* ref_name) {
  check_arg(op, "A", A, "(r, in)", {r, in}, ref, ref_name);
  check_arg(op, "B", B, "(out, r)", {out, A.size(0)}, ref, ref_name);
  check_arg(op, "lambda_s", lambda_s, "(r,)", {A.size(0)}, ref, ref_name, /*float32_ok=*/true);
  check_arg(op, "lambda_o", lambda_o, "(out,)", {out}, lambda_s, "lambda_s");
}

// linear_forward(x, weight, bias?, A, B, lambda_s, lambda_o) with x (T, in).
inline void check_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& lambda_s,
                                 const at::Tensor& lambda_o, at::DeviceType device,
                                 c10::ArrayRef<at::ScalarType> dtypes) {
  const char* op = "giva::linear_forward";
  check_leading(op, "x", x, "(T, in)", 2, device, dtypes);
  const int64_t in = x.size(1);
  check_arg(op, "weight", weight, "(out, in)", {-1, in}, x, "x");
  const int64_t out = weight.size(0);
  if (bias.has_value() && bias->defined()) check_arg(op, "bias", *bias, "(out,)", {out}, x, "x");
  check_adapter_args(op, A, B, lambda_s, lambda_o, in, out, -1, x, "x");
}

// adapter_forward(x, base, A, B, lambda_s, lambda_o) with x (T, in), base (T, out).
inline void check_adapter_forward(const at::Tensor& x, const at::Tensor& base, const at::Tensor& A,
                                  const at::Tensor& B, const at::Tensor& lambda_s,
                                  const at::Tensor& lambda_o, at::DeviceType device,
                                  c10::ArrayRef<at::ScalarType> dtypes) {
  const char* op = "giva::adapter_forward";
  check_leading(op, "x", x, "(T, in)", 2, device, dtypes);
  check_arg(op, "base", base, "(T, out)", {x.size(0), -1}, x, "x");
  check_adapter_args(op, A, B, lambda_s, lambda_o, x.size(1), base.size(1), -1, x, "x");
}

// The arguments of linear_backward (weight defined) and adapter_backward (weight undefined):
// grad_y (T, out), s (T, r) of saved_s_dtype, then the adapter's tensors; `in` comes from the
// weight, else from A.
inline void check_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& s,
                           const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                           const at::Tensor& lambda_s, const at::Tensor& lambda_o,
                           at::DeviceType device, c10::ArrayRef<at::ScalarType> dtypes) {
  check_leading(op, "grad_y", grad_y, "(T, out)", 2, device, dtypes);
  const int64_t T = grad_y.size(0), out = grad_y.size(1);
  if (weight.defined()) check_arg(op, "weight", weight, "(out, in)", {out, -1}, grad_y, "grad_y");
  check_arg_as(op, "s", s, "(T, r)", {T, -1}, grad_y.device(), "the device of grad_y",
               saved_s_dtype(grad_y.scalar_type()),
               "what the forward saves for grad_y's dtype");
  const int64_t in = weight.defined() ? weight.size(1) : -1;
  check_adapter_args(op, A, B, lambda_s, lambda_o, in, out, s.size(1), grad_y, "grad_y");
}

inline void check_linear_backward(const at::Tensor& grad_y, const at::Tensor& s,
                                  const at::Tensor& weight, const at::Tensor& A,
                                  const at::Tensor& B, const at::Tensor& lambda_s,
                                  const at::Tensor& lambda_o, at::DeviceType device,
                                  c10::ArrayRef<at::ScalarType> dtypes) {
  TORCH_CHECK(weight.defined(), "giva::linear_backward: weight must be a tensor, got None");
  check_backward("giva::linear_backward", grad_y, s, weight, A, B, lambda_s, lambda_o, device,
                 dtypes);
}

}  // namespace giva
