// The input checks of the lora_kernels ops, shared by the CPU (csrc/cpu) and
// CUDA (csrc/cuda) backends: readable messages naming the op, the argument,
// what it is and what was expected; the group layout of (Merged)Linear; the
// output_mask flags of the backward ops. ATen only (no CUDA headers): both
// backends' host compilers include it.
//
// Where a tensor's device is checked the backend passes its device checks as
// a type `DeviceChecks` (csrc/cpu/common.h, csrc/cuda/common.h) with
//   static void first(op, name, t)                  t, the op's reference
//                                                   tensor, is on the backend
//   static void same(op, name, t, ref_name, ref)    t is on ref's device
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace lora_kernels {

using at::Tensor;

inline std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << "]";
  return os.str();
}

inline void check_floating(const char* op, const char* name, const Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_dim(const char* op, const char* name, const Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(),
              "-D with shape ", shape_str(t));
}

inline void check_same_dtype(const char* op, const char* name, const Tensor& t,
                             const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_shape(const char* op, const char* name, const Tensor& t,
                        std::vector<int64_t> expected, const char* why) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ",
              at::IntArrayRef(expected), " (", why, "), got ", shape_str(t));
}

inline void check_dropout_p(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dropout probability must be in [0, 1], got ", p);
}

// The seed of a dropout mask: one int64 element (its device is the
// backend's business). Only checked when p > 0.
inline void check_seed(const char* op, const Tensor& seed) {
  TORCH_CHECK(seed.defined() && seed.scalar_type() == at::kLong, op,
              ": seed must be an int64 tensor, got ",
              seed.defined() ? c10::toString(seed.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(seed.numel() == 1, op, ": seed must have exactly one element, got ", seed.numel(),
              " (shape ", shape_str(seed), ")");
}

// The low-rank dtype: float32 for half inputs, the input dtype otherwise.
inline at::ScalarType lowrank_dtype(at::ScalarType st) {
  return (st == at::kHalf || st == at::kBFloat16) ? at::kFloat : st;
}

// Group layout of a (Merged)Linear: out features in num_groups equal groups;
// groups[i] (enabled, in the order of A's and B's row blocks) owns
// A rows [i*r, (i+1)*r) and B rows [i*size, (i+1)*size).
struct GroupLayout {
  int64_t num_groups = 1;
  int64_t size = 0;  // out features per group
  int64_t r = 0;     // rank per enabled group
  std::vector<int64_t> groups;
  int64_t enabled() const { return static_cast<int64_t>(groups.size()); }
  int64_t col0(int64_t i) const { return groups[i] * size; }  // first out column of group i
  // A plain Linear: B is already laid out over all out features.
  bool plain() const { return num_groups == 1 && enabled() == 1; }
};

inline GroupLayout make_layout(const char* op, int64_t out_features, int64_t num_groups,
                               at::IntArrayRef groups, const Tensor& lora_A,
                               const Tensor& lora_B, int64_t in_features) {
  check_dim(op, "lora_A", lora_A, 2);
  check_dim(op, "lora_B", lora_B, 2);
  TORCH_CHECK(num_groups >= 1, op, ": num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(out_features % num_groups == 0, op, ": num_groups (", num_groups,
              ") must divide the out features (", out_features, ")");
  GroupLayout L;
  L.num_groups = num_groups;
  L.size = out_features / num_groups;
  std::vector<bool> seen(static_cast<size_t>(num_groups), false);
  for (const int64_t g : groups) {
    TORCH_CHECK(g >= 0 && g < num_groups, op, ": groups must lie in [0, num_groups=", num_groups,
                "), got ", groups);
    TORCH_CHECK(!seen[g], op, ": groups must be distinct, got ", groups);
    seen[g] = true;
    L.groups.push_back(g);
  }
  const int64_t ng = L.enabled();
  if (ng == 0) {
    TORCH_CHECK(lora_A.size(0) == 0 && lora_B.size(0) == 0, op,
                ": with no enabled groups lora_A and lora_B must have 0 rows, got lora_A ",
                shape_str(lora_A), " and lora_B ", shape_str(lora_B));
    L.r = 0;
  } else {
    TORCH_CHECK(lora_A.size(0) % ng == 0, op, ": lora_A rows (", lora_A.size(0),
                ") must be r * len(groups) = r * ", ng);
    L.r = lora_A.size(0) / ng;
  }
  TORCH_CHECK(lora_A.size(1) == in_features, op, ": lora_A must have shape [r*len(groups), ",
              in_features, "] (in_features = ", in_features, "), got ", shape_str(lora_A));
  check_shape(op, "lora_B", lora_B, {ng * L.size, L.r},
              "[len(groups) * out_features / num_groups, r]");
  return L;
}

// The sizes of a (Merged)Linear op: tokens (0 for merge_), in and out
// features, and the group layout.
struct LinearShapes {
  int64_t T = 0, in = 0, out = 0;
  GroupLayout L;
};

// The in and out features of W: (out, in), or (in, out) with fan_in_fan_out.
inline LinearShapes weight_features(const Tensor& weight, bool fan_in_fan_out) {
  LinearShapes d;
  d.in = fan_in_fan_out ? weight.size(0) : weight.size(1);
  d.out = fan_in_fan_out ? weight.size(1) : weight.size(0);
  return d;
}

// The operands both linear ops check alike: ref (x or grad) and weight are
// 2-D floating tensors on the backend's device; weight, lora_A and lora_B
// have ref's dtype and ref's device.
template <typename DeviceChecks>
void check_linear_operands(const char* op, const char* ref_name, const Tensor& ref,
                           const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B) {
  DeviceChecks::first(op, ref_name, ref);
  check_dim(op, ref_name, ref, 2);
  check_floating(op, ref_name, ref);
  DeviceChecks::same(op, "weight", weight, ref_name, ref);
  check_dim(op, "weight", weight, 2);
  check_same_dtype(op, "weight", weight, ref_name, ref);
  DeviceChecks::same(op, "lora_A", lora_A, ref_name, ref);
  DeviceChecks::same(op, "lora_B", lora_B, ref_name, ref);
  check_same_dtype(op, "lora_A", lora_A, ref_name, ref);
  check_same_dtype(op, "lora_B", lora_B, ref_name, ref);
}

// lora_linear_fwd's inputs: x (tokens, in), weight (out, in) or (in, out)
// with fan_in_fan_out, the optional bias (out), and the group layout.
template <typename DeviceChecks>
LinearShapes check_linear_fwd(const char* op, const Tensor& x, const Tensor& weight,
                              const std::optional<Tensor>& bias, const Tensor& lora_A,
                              const Tensor& lora_B, bool fan_in_fan_out, int64_t num_groups,
                              at::IntArrayRef groups) {
  check_linear_operands<DeviceChecks>(op, "x", x, weight, lora_A, lora_B);
  LinearShapes d = weight_features(weight, fan_in_fan_out);
  d.T = x.size(0);
  TORCH_CHECK(d.in == x.size(1), op, ": weight must have shape ",
              fan_in_fan_out ? "[in_features, out_features]" : "[out_features, in_features]",
              " with in_features = ", x.size(1), " (x is ", shape_str(x), ", fan_in_fan_out=",
              fan_in_fan_out, "), got ", shape_str(weight));
  if (bias.has_value() && bias->defined()) {
    DeviceChecks::same(op, "bias", *bias, "x", x);
    check_same_dtype(op, "bias", *bias, "x", x);
    check_shape(op, "bias", *bias, {d.out}, "[out_features]");
  }
  d.L = make_layout(op, d.out, num_groups, groups, lora_A, lora_B, d.in);
  return d;
}

// The outputs lora_linear_bwd is asked for.
struct LinearBwdWants {
  bool dx, dw, db, dA, dB;
};

inline LinearBwdWants linear_bwd_wants(const char* op, const c10::List<bool>& output_mask) {
  TORCH_CHECK(output_mask.size() == 5, op,
              ": output_mask must have 5 flags (dx, dweight, dbias, dA, dB), got ",
              output_mask.size());
  return {output_mask[0], output_mask[1], output_mask[2], output_mask[3], output_mask[4]};
}

// lora_linear_bwd's inputs: grad (tokens, out), weight, x (tokens, in) when
// dA or dweight is asked for, s (tokens, R) in the low-rank dtype when dB is,
// the group layout and the dropout probability.
template <typename DeviceChecks>
LinearShapes check_linear_bwd(const char* op, const LinearBwdWants& want, const Tensor& grad,
                              const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                              const Tensor& lora_B, const Tensor& s, double dropout_p,
                              bool fan_in_fan_out, int64_t num_groups, at::IntArrayRef groups) {
  check_linear_operands<DeviceChecks>(op, "grad", grad, weight, lora_A, lora_B);
  LinearShapes d = weight_features(weight, fan_in_fan_out);
  d.T = grad.size(0);
  TORCH_CHECK(d.out == grad.size(1), op, ": weight must have ", grad.size(1),
              " out features (grad is ", shape_str(grad), ", fan_in_fan_out=", fan_in_fan_out,
              "), got ", shape_str(weight));
  if (want.dA || want.dw) {
    DeviceChecks::same(op, "x", x, "grad", grad);
    check_same_dtype(op, "x", x, "grad", grad);
    check_shape(op, "x", x, {d.T, d.in}, "[tokens, in_features]; needed for dA or dweight");
  }
  d.L = make_layout(op, d.out, num_groups, groups, lora_A, lora_B, d.in);
  const int64_t R = lora_A.size(0);
  const auto lt = lowrank_dtype(grad.scalar_type());
  if (want.dB) {
    DeviceChecks::same(op, "s", s, "grad", grad);
    TORCH_CHECK(s.scalar_type() == lt, op, ": s must have dtype ", lt, " (the low-rank dtype of ",
                grad.scalar_type(), "), got ", s.scalar_type());
    check_shape(op, "s", s, {d.T, R}, "[tokens, r * len(groups)], from lora_linear_fwd");
  }
  check_dropout_p(op, dropout_p);
  return d;
}

// lora_delta_fwd's inputs: x (tokens, in) and base (tokens, out), floating
// tensors of one dtype on the backend's device, and lora_A / lora_B of that
// dtype in the group layout of base's out features.
template <typename DeviceChecks>
LinearShapes check_delta_fwd(const char* op, const Tensor& x, const Tensor& base,
                             const Tensor& lora_A, const Tensor& lora_B, int64_t num_groups,
                             at::IntArrayRef groups) {
  DeviceChecks::first(op, "x", x);
  check_dim(op, "x", x, 2);
  check_floating(op, "x", x);
  DeviceChecks::same(op, "base", base, "x", x);
  check_dim(op, "base", base, 2);
  check_same_dtype(op, "base", base, "x", x);
  TORCH_CHECK(base.size(0) == x.size(0), op, ": base must have the ", x.size(0),
              " rows of x (its tokens), got ", shape_str(base));
  DeviceChecks::same(op, "lora_A", lora_A, "x", x);
  DeviceChecks::same(op, "lora_B", lora_B, "x", x);
  check_same_dtype(op, "lora_A", lora_A, "x", x);
  check_same_dtype(op, "lora_B", lora_B, "x", x);
  LinearShapes d;
  d.T = x.size(0);
  d.in = x.size(1);
  d.out = base.size(1);
  d.L = make_layout(op, d.out, num_groups, groups, lora_A, lora_B, d.in);
  return d;
}

// The outputs lora_delta_bwd is asked for (dx, dA, dB).
inline LinearBwdWants delta_bwd_wants(const char* op, const c10::List<bool>& output_mask) {
  TORCH_CHECK(output_mask.size() == 3, op, ": output_mask must have 3 flags (dx, dA, dB), got ",
              output_mask.size());
  return {output_mask[0], false, false, output_mask[1], output_mask[2]};
}

// lora_delta_bwd's inputs: grad (tokens, out), x (tokens, in) when dA is
// asked for, s (tokens, R) in the low-rank dtype when dB is, the group
// layout and the dropout probability.
template <typename DeviceChecks>
LinearShapes check_delta_bwd(const char* op, const LinearBwdWants& want, const Tensor& grad,
                             const Tensor& x, const Tensor& lora_A, const Tensor& lora_B,
                             const Tensor& s, double dropout_p, int64_t num_groups,
                             at::IntArrayRef groups) {
  DeviceChecks::first(op, "grad", grad);
  check_dim(op, "grad", grad, 2);
  check_floating(op, "grad", grad);
  DeviceChecks::same(op, "lora_A", lora_A, "grad", grad);
  DeviceChecks::same(op, "lora_B", lora_B, "grad", grad);
  check_same_dtype(op, "lora_A", lora_A, "grad", grad);
  check_same_dtype(op, "lora_B", lora_B, "grad", grad);
  check_dim(op, "lora_A", lora_A, 2);
  LinearShapes d;
  d.T = grad.size(0);
  d.out = grad.size(1);
  d.in = lora_A.size(1);
  if (want.dA) {
    DeviceChecks::same(op, "x", x, "grad", grad);
    check_same_dtype(op, "x", x, "grad", grad);
    check_shape(op, "x", x, {d.T, d.in}, "[tokens, in_features]; needed for dA");
  }
  d.L = make_layout(op, d.out, num_groups, groups, lora_A, lora_B, d.in);
  const int64_t R = lora_A.size(0);
  const auto lt = lowrank_dtype(grad.scalar_type());
  if (want.dB) {
    DeviceChecks::same(op, "s", s, "grad", grad);
    TORCH_CHECK(s.scalar_type() == lt, op, ": s must have dtype ", lt, " (the low-rank dtype of ",
                grad.scalar_type(), "), got ", s.scalar_type());
    check_shape(op, "s", s, {d.T, R}, "[tokens, r * len(groups)], from lora_delta_fwd");
  }
  check_dropout_p(op, dropout_p);
  return d;
}

// merge_'s inputs: weight (out, in), or (in, out) with fan_in_fan_out,
// floating; lora_A floating and lora_B of its dtype, on weight's device; the
// group layout.
template <typename DeviceChecks>
LinearShapes check_merge(const char* op, const Tensor& weight, const Tensor& lora_A,
                         const Tensor& lora_B, bool fan_in_fan_out, int64_t num_groups,
                         at::IntArrayRef groups) {
  DeviceChecks::first(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_floating(op, "weight", weight);
  DeviceChecks::same(op, "lora_A", lora_A, "weight", weight);
  DeviceChecks::same(op, "lora_B", lora_B, "weight", weight);
  check_floating(op, "lora_A", lora_A);
  check_same_dtype(op, "lora_B", lora_B, "lora_A", lora_A);
  LinearShapes d = weight_features(weight, fan_in_fan_out);
  d.L = make_layout(op, d.out, num_groups, groups, lora_A, lora_B, d.in);
  return d;
}

// The embedding ops' operands: weight (num, dim), A (r, num), B (dim, r),
// floating tensors of one dtype on the backend's device; indices 1-D int64
// or int32 on their device. The index values are the backend's to check.
template <typename DeviceChecks>
void check_embedding_operands(const char* op, const Tensor& indices, const Tensor& weight,
                              const Tensor& lora_A, const Tensor& lora_B) {
  DeviceChecks::first(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_floating(op, "weight", weight);
  DeviceChecks::same(op, "lora_A", lora_A, "weight", weight);
  DeviceChecks::same(op, "lora_B", lora_B, "weight", weight);
  check_dim(op, "lora_A", lora_A, 2);
  check_dim(op, "lora_B", lora_B, 2);
  check_same_dtype(op, "lora_A", lora_A, "weight", weight);
  check_same_dtype(op, "lora_B", lora_B, "weight", weight);
  const int64_t num = weight.size(0), dim = weight.size(1), r = lora_A.size(0);
  check_shape(op, "lora_A", lora_A, {r, num}, "[r, num_embeddings]");
  check_shape(op, "lora_B", lora_B, {dim, r}, "[embedding_dim, r]");
  DeviceChecks::same(op, "indices", indices, "weight", weight);
  check_dim(op, "indices", indices, 1);
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
              ": indices must be int64 (or int32), got ", indices.scalar_type());
}

// The outputs lora_embedding_bwd is asked for.
struct EmbeddingBwdWants {
  bool dw, dA, dB;
};

inline EmbeddingBwdWants embedding_bwd_wants(const char* op, const c10::List<bool>& output_mask) {
  TORCH_CHECK(output_mask.size() == 3, op,
              ": output_mask must have 3 flags (dweight, dA, dB), got ", output_mask.size());
  return {output_mask[0], output_mask[1], output_mask[2]};
}

// lora_embedding_bwd's inputs past the operands (checked first): grad
// (tokens, dim) of weight's dtype, padding_idx, and s (tokens, r) in the
// low-rank dtype when dB is asked for.
template <typename DeviceChecks>
void check_embedding_bwd(const char* op, const EmbeddingBwdWants& want, const Tensor& grad,
                         const Tensor& indices, const Tensor& weight, const Tensor& lora_A,
                         const Tensor& s, int64_t padding_idx) {
  const int64_t T = indices.size(0), num = weight.size(0), dim = weight.size(1),
                r = lora_A.size(0);
  DeviceChecks::same(op, "grad", grad, "weight", weight);
  check_same_dtype(op, "grad", grad, "weight", weight);
  check_shape(op, "grad", grad, {T, dim}, "[tokens, embedding_dim]");
  TORCH_CHECK(padding_idx >= -1 && padding_idx < num, op,
              ": padding_idx must be -1 (none) or in [0, num_embeddings=", num, "), got ",
              padding_idx);
  const auto lt = lowrank_dtype(weight.scalar_type());
  if (want.dB) {
    DeviceChecks::same(op, "s", s, "weight", weight);
    TORCH_CHECK(s.scalar_type() == lt, op, ": s must have dtype ", lt, ", got ",
                s.scalar_type());
    check_shape(op, "s", s, {T, r}, "[tokens, r], from lora_embedding_fwd");
  }
}

}  // namespace lora_kernels
