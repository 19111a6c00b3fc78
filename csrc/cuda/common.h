// Host-side helpers of the CUDA ops: input checks with readable messages,
// the group layout of (Merged)Linear, the dropout mask arguments (seed read
// in place on the device), the grouped B, and the plumbing to the kernel
// launchers (kernels/launch.h). ATen pieces only: no torch/extension.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowAutograd
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/launch.h"

namespace lora_kernels {
namespace cuda {

using at::Tensor;

// The kernels are registered for the CUDA dispatch key only, so they are
// entered with autograd still on: each op opens AutoDispatchBelowAutograd
// (nested ATen calls skip autograd, as in ATen's own kernels) and works on
// detached aliases of its tensors (same storage and version counter, so
// merge_ still updates the caller's weight in place).
inline Tensor plain(const Tensor& t) { return t.defined() ? t.detach() : t; }
inline std::optional<Tensor> plain(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? std::optional<Tensor>(t->detach()) : std::nullopt;
}

inline std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << "]";
  return os.str();
}

// `t` is a CUDA tensor on the device of `ref` (the op's first tensor).
inline void check_cuda(const char* op, const char* name, const Tensor& t, const char* ref_name,
                       const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ",
              ref_name, " (", ref.device(), "), got ", t.device());
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

// What a kernel reads through a raw pointer: contiguous (the op makes its
// own contiguous copy of small operands before this check).
inline void check_contiguous(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides(), " for shape ", shape_str(t));
}

// x-like operands are read row by row: unit stride along the last dimension
// (any row stride). Anything else is copied once into that layout.
inline Tensor rows_layout(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}
inline int64_t row_stride(const Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : t.size(1);
}

// The operands both linear ops check alike: ref (x or grad) and weight are
// 2-D floating CUDA tensors on one device; weight, lora_A and lora_B have
// ref's dtype.
inline void check_linear_operands(const char* op, const char* ref_name, const Tensor& ref,
                                  const Tensor& weight, const Tensor& lora_A,
                                  const Tensor& lora_B) {
  TORCH_CHECK(ref.is_cuda(), op, ": ", ref_name, " must be a CUDA tensor, got device ",
              ref.device());
  check_dim(op, ref_name, ref, 2);
  check_floating(op, ref_name, ref);
  check_cuda(op, "weight", weight, ref_name, ref);
  check_dim(op, "weight", weight, 2);
  check_same_dtype(op, "weight", weight, ref_name, ref);
  check_cuda(op, "lora_A", lora_A, ref_name, ref);
  check_cuda(op, "lora_B", lora_B, ref_name, ref);
  check_same_dtype(op, "lora_A", lora_A, ref_name, ref);
  check_same_dtype(op, "lora_B", lora_B, ref_name, ref);
}

// weight (num, dim), A (r, num), B (dim, r): floating CUDA tensors of one dtype;
// indices 1-D int64 or int32 on their device.
inline void check_embedding_operands(const char* op, const Tensor& indices, const Tensor& weight,
                              const Tensor& lora_A, const Tensor& lora_B) {
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor, got device ",
              weight.device());
  check_dim(op, "weight", weight, 2);
  check_floating(op, "weight", weight);
  check_cuda(op, "lora_A", lora_A, "weight", weight);
  check_cuda(op, "lora_B", lora_B, "weight", weight);
  check_dim(op, "lora_A", lora_A, 2);
  check_dim(op, "lora_B", lora_B, 2);
  check_same_dtype(op, "lora_A", lora_A, "weight", weight);
  check_same_dtype(op, "lora_B", lora_B, "weight", weight);
  const int64_t num = weight.size(0), dim = weight.size(1), r = lora_A.size(0);
  check_shape(op, "lora_A", lora_A, {r, num}, "[r, num_embeddings]");
  check_shape(op, "lora_B", lora_B, {dim, r}, "[embedding_dim, r]");
  check_cuda(op, "indices", indices, "weight", weight);
  check_dim(op, "indices", indices, 1);
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
              ": indices must be int64 (or int32), got ", indices.scalar_type());
}

inline void check_dropout_p(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dropout probability must be in [0, 1], got ", p);
}

// The dropout mask of one call; inactive (threshold 0) when p == 0. The seed
// is read by the kernels from device memory (no host synchronisation); a
// CPU seed is read here.
inline MaskArgs make_mask(const char* op, const Tensor& seed, double p, const Tensor& ref) {
  check_dropout_p(op, p);
  MaskArgs m;
  if (!(p > 0.0)) return m;
  TORCH_CHECK(seed.defined() && seed.scalar_type() == at::kLong, op,
              ": seed must be an int64 tensor, got ",
              seed.defined() ? c10::toString(seed.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(seed.numel() == 1, op, ": seed must have exactly one element, got ", seed.numel(),
              " (shape ", shape_str(seed), ")");
  if (seed.is_cuda()) {
    TORCH_CHECK(seed.device() == ref.device(), op, ": seed must be on ", ref.device(),
                " (or the CPU), got ", seed.device());
    m.seed_ptr = seed.data_ptr<int64_t>();  // one element: always contiguous
  } else {
    TORCH_CHECK(seed.device().is_cpu(), op, ": seed must be a CUDA or CPU tensor, got ",
                seed.device());
    m.seed = static_cast<uint64_t>(seed.item<int64_t>());
  }
  m.threshold = philox::dropout_threshold(p);
  m.scale = philox::dropout_keep_scale(m.threshold);
  return m;
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

// B laid out over all out features, (out, r·len(groups)) in dtype `dt`,
// contiguous: group groups[i]'s rows hold B_i in columns [i·r, (i+1)·r) and
// zeros elsewhere, so a grouped layer is a plain rank-R one. A plain Linear
// uses lora_B itself. Only this out × R tensor is padded, never tokens × out.
inline Tensor b_full(const Tensor& lora_B, const GroupLayout& L, at::ScalarType dt) {
  if (L.plain()) return lora_B.to(dt).contiguous();
  const int64_t R = L.r * L.enabled();
  Tensor full = at::zeros({L.num_groups * L.size, R}, lora_B.options().dtype(dt));
  for (int64_t i = 0; i < L.enabled(); ++i)
    full.narrow(0, L.groups[i] * L.size, L.size)
        .narrow(1, i * L.r, L.r)
        .copy_(lora_B.narrow(0, i * L.size, L.size));
  return full;
}

// The inverse of b_full for a gradient: lora_B's (size·len(groups), r) rows.
inline Tensor ungroup_b(const Tensor& full, const GroupLayout& L) {
  if (L.plain()) return full;
  Tensor out = at::empty({L.enabled() * L.size, L.r}, full.options());
  for (int64_t i = 0; i < L.enabled(); ++i)
    out.narrow(0, i * L.size, L.size)
        .copy_(full.narrow(0, L.groups[i] * L.size, L.size).narrow(1, i * L.r, L.r));
  return out;
}

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Blocks that keep the current device busy: `per_sm` per multiprocessor.
inline int64_t target_blocks(int per_sm) {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = c10::cuda::current_device();
  int sms = dev >= 0 && dev < 64 ? cache[dev].load() : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    if (dev >= 0 && dev < 64) cache[dev].store(sms);
  }
  return static_cast<int64_t>(sms) * per_sm;
}

// A partial-sum buffer [n][rows][cols] of the low-rank dtype, and its sum
// (alpha · Σ over n, in order) into `out` (rows × cols, row stride out_ld).
template <typename acc_t>
inline Tensor parts_buffer(const Tensor& like, int64_t n, int64_t rows, int64_t cols) {
  return at::empty({n, rows, cols}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename acc_t, typename out_t>
inline void sum_parts_into(const Tensor& parts, double alpha, const Tensor& out) {
  check_contiguous("sum_parts", "parts", parts);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == parts.size(1) && out.size(1) == parts.size(2) &&
                  (out.size(1) <= 1 || out.stride(1) == 1),
              "sum_parts: out must be a row-major ", parts.size(1), " x ", parts.size(2),
              " matrix, got shape ", shape_str(out));
  SumPartsArgs<acc_t, out_t> a;
  a.parts = parts.data_ptr<acc_t>();
  a.n = parts.size(0);
  a.rows = parts.size(1);
  a.cols = parts.size(2);
  a.alpha = static_cast<acc_t>(alpha);
  a.out = out.data_ptr<out_t>();
  a.out_ld = row_stride(out);
  launch_sum_parts<acc_t, out_t>(a, current_stream());
}

}  // namespace cuda
}  // namespace lora_kernels
