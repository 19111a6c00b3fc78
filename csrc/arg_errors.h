// Argument errors of the user-facing ops (lora_linear, lora_embedding), in
// Python's words: a ValueError that names the argument, the value received and
// the value expected ("x.shape: got (2, 5), expected (..., 4)"), with shapes as
// tuples and dtypes as torch.float32, as lora_kernels.functional words them.
// The kernels' own checks (op_checks.h) stay the backstop for direct calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace lora_kernels {

template <typename Sizes>
std::string py_tuple(const Sizes& sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

inline std::string py_shape(const at::Tensor& t) { return py_tuple(t.sym_sizes()); }

inline std::string py_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(st);
  }
}

template <typename Got, typename Expected>
[[noreturn]] void fail_arg(const char* name, const Got& got, const Expected& expected) {
  TORCH_CHECK_VALUE(false, name, ": got ", got, ", expected ", expected);
}

// t (named `name`) is on ref's device and has ref's dtype; `ref_name` is how
// the message calls ref.
inline void check_same_as(const char* name, const at::Tensor& t, const char* ref_name,
                          const at::Tensor& ref) {
  if (t.device() != ref.device())
    TORCH_CHECK_VALUE(false, name, ".device: got ", t.device().str(), ", expected ", ref_name,
                      "'s device ", ref.device().str());
  if (t.scalar_type() != ref.scalar_type())
    TORCH_CHECK_VALUE(false, name, ".dtype: got ", py_dtype(t.scalar_type()), ", expected ",
                      ref_name, "'s dtype ", py_dtype(ref.scalar_type()),
                      std::string(ref_name) == "x" ? " (cast x or the layer)" : "");
}

inline void check_lora_dropout(double p) {
  if (!(p >= 0.0 && p < 1.0)) fail_arg("lora_dropout", p, "a float in [0, 1)");
}

// A linear layer's W (2-D; (in, out) with fan_in_fan_out) and x (..., in):
// {out_features, in_features}.
struct LinearFeatures {
  int64_t out, in;
};
inline LinearFeatures check_linear_x(const at::Tensor& x, const at::Tensor& weight,
                                     bool fan_in_fan_out) {
  if (weight.dim() != 2) fail_arg("weight.dim()", weight.dim(), 2);
  const LinearFeatures f{weight.size(fan_in_fan_out ? 1 : 0), weight.size(fan_in_fan_out ? 0 : 1)};
  if (x.dim() == 0 || x.sym_size(-1) != f.in)
    TORCH_CHECK_VALUE(false, "x.shape: got ", py_shape(x), ", expected (..., ", f.in,
                      ") (in_features=", f.in, ")");
  return f;
}

}  // namespace lora_kernels
