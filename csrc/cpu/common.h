// Shared helpers of the CPU kernels: input checks with readable messages,
// the group layout of (Merged)Linear, the dropout mask of a row block, and
// the small row-major GEMM used inside the fused loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/irange.h>

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "../philox.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the CPU dropout mask reads Philox words as 16-bit lanes: little-endian hosts only"
#endif

namespace lora_kernels {
namespace cpu {

using at::Tensor;

// The kernels are registered for the CPU dispatch key only, so they are
// entered with autograd still on and with inputs that may require grad. Each
// op is a thin wrapper that opens AutoDispatchBelowAutograd (nested ATen
// calls on this thread skip autograd, as in ATen's own kernels) and passes
// detached aliases of its tensors to the implementation: at::parallel_for's
// worker threads do not inherit the dispatch guard, and plain tensors keep
// nested out= / in-place calls legal there too. Aliases share storage and
// version counter, so merge_ still updates the caller's weight in place.
inline Tensor plain(const Tensor& t) { return t.defined() ? t.detach() : t; }
inline std::optional<Tensor> plain(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? std::optional<Tensor>(t->detach()) : std::nullopt;
}

// Rows of x handled per step of the fused loops. Fixed (never derived from
// the thread count), so every result is bitwise the same for any number of
// threads.
constexpr int64_t kRowBlock = 128;

inline std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << "]";
  return os.str();
}

inline void check_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ",
              t.device());
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

// The operands both linear ops check alike: ref (x or grad) and weight are
// 2-D floating CPU tensors; weight, lora_A and lora_B have ref's dtype.
inline void check_linear_operands(const char* op, const char* ref_name, const Tensor& ref,
                                  const Tensor& weight, const Tensor& lora_A,
                                  const Tensor& lora_B) {
  check_cpu(op, ref_name, ref);
  check_dim(op, ref_name, ref, 2);
  check_floating(op, ref_name, ref);
  check_cpu(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  check_same_dtype(op, "weight", weight, ref_name, ref);
  check_cpu(op, "lora_A", lora_A);
  check_cpu(op, "lora_B", lora_B);
  check_same_dtype(op, "lora_A", lora_A, ref_name, ref);
  check_same_dtype(op, "lora_B", lora_B, ref_name, ref);
}

inline void check_dropout_p(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": dropout probability must be in [0, 1], got ", p);
}

// The 64-bit seed (reinterpreted as unsigned). Only read when p > 0.
inline uint64_t read_seed(const char* op, const Tensor& seed) {
  TORCH_CHECK(seed.scalar_type() == at::kLong, op, ": seed must be an int64 tensor, got ",
              seed.scalar_type());
  TORCH_CHECK(seed.numel() == 1, op, ": seed must have exactly one element, got ", seed.numel(),
              " (shape ", shape_str(seed), ")");
  TORCH_CHECK(seed.device().is_cpu(), op, ": seed must be a CPU tensor, got device ",
              seed.device());
  return static_cast<uint64_t>(seed.item<int64_t>());
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
  int64_t size = 0;          // out features per group
  int64_t r = 0;             // rank per enabled group
  std::vector<int64_t> groups;
  int64_t enabled() const { return static_cast<int64_t>(groups.size()); }
  int64_t col0(int64_t i) const { return groups[i] * size; }  // first out column of group i
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

// The dropout mask of one op call (reference.py: threshold = round(p·2¹⁶),
// keep scale = 2¹⁶ / (2¹⁶ − threshold)); inactive when p == 0.
struct MaskParams {
  bool active = false;       // p > 0
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double scale = 1.0;        // keep scale
};

inline MaskParams make_mask_params(const char* op, const Tensor& seed, double p) {
  check_dropout_p(op, p);
  MaskParams m;
  if (p > 0.0) {
    m.active = true;
    m.seed = read_seed(op, seed);
    m.threshold = philox::dropout_threshold(p);
    m.scale = philox::dropout_keep_scale(m.threshold);
  }
  return m;
}

inline int64_t lane_stride(int64_t cols) { return philox::words_per_row(cols) * philox::kLanes; }

// Philox output words of counters n0 .. n0+count-1, counter after counter
// (dropout_mask.cpp: SIMD where the CPU has it; `isa` forces a variant, for
// tests).
enum class MaskIsa : int64_t { kBest = 0, kScalar = 1, kAvx2 = 2 };
void mask_words(uint64_t seed, uint64_t n0, int64_t count, uint32_t* out,
                MaskIsa isa = MaskIsa::kBest);

// The 16-bit lanes of whole rows [row0, row0 + rows) of a matrix with `cols`
// columns, row after row with row stride lane_stride(cols).
inline void mask_lanes(const MaskParams& m, int64_t row0, int64_t rows, int64_t cols,
                       uint16_t* lanes) {
  const int64_t words = philox::words_per_row(cols);
  mask_words(m.seed, static_cast<uint64_t>(row0) * static_cast<uint64_t>(words), rows * words,
             reinterpret_cast<uint32_t*>(lanes));
}

// The dropout multiply of n elements: dst[j] = src[j] * (lanes[j] >= thr ?
// scale : 0) (dst == src allowed; SIMD, dropout_mask.cpp).
void mask_mul(float* dst, const float* src, const uint16_t* lanes, int64_t n, uint16_t thr,
              float scale);
void mask_mul(double* dst, const double* src, const uint16_t* lanes, int64_t n, uint16_t thr,
              double scale);

// thr and scale of mask_mul for a mask: keep_scale when kept, 0 when dropped.
// With threshold 65536 everything is dropped and the scale is 0 as well.
template <typename T>
struct LaneMask {
  uint16_t thr;
  T scale;
  explicit LaneMask(const MaskParams& m)
      : thr(static_cast<uint16_t>(m.threshold > 0xFFFFu ? 0xFFFFu : m.threshold)),
        scale(m.threshold > 0xFFFFu ? T(0) : static_cast<T>(m.scale)) {}
};

// buf[i, j] *= mask(i, j) over a rows x cols block (buf row stride ld).
template <typename T>
inline void apply_mask_inplace(T* buf, int64_t ld, const uint16_t* lanes, int64_t lane_ld,
                               int64_t rows, int64_t cols, const LaneMask<T>& mask) {
  for (int64_t i = 0; i < rows; ++i)
    mask_mul(buf + i * ld, buf + i * ld, lanes + i * lane_ld, cols, mask.thr, mask.scale);
}

// buf (rows x cols, contiguous) = src in acc_t, times the mask when `lanes`
// is given. src is any 2-D view: rows with unit column stride and src's
// dtype are read directly, anything else goes through ATen's strided,
// converting copy first.
template <typename scalar_t, typename acc_t>
inline void load_masked(const Tensor& src, const Tensor& buf, const uint16_t* lanes,
                        int64_t lane_ld, const LaneMask<acc_t>& mask) {
  const int64_t rows = src.size(0), cols = src.size(1);
  acc_t* bp = buf.data_ptr<acc_t>();
  if (std::is_same<scalar_t, acc_t>::value && lanes && (src.stride(1) == 1 || cols == 1)) {
    const acc_t* sp = reinterpret_cast<const acc_t*>(src.data_ptr<scalar_t>());
    for (int64_t i = 0; i < rows; ++i)
      mask_mul(bp + i * cols, sp + i * src.stride(0), lanes + i * lane_ld, cols, mask.thr,
               mask.scale);
    return;
  }
  buf.copy_(src);
  if (lanes) apply_mask_inplace<acc_t>(bp, cols, lanes, lane_ld, rows, cols, mask);
}

// C = A·B, or C += A·B with `add`, for 2-D views A (M×K), B (K×N), C (M×N).
// float32 row-major operands (unit column stride) go to ATen's batch-reduce
// GEMM (oneDNN's JIT micro-kernel where the CPU has AVX2 or better, else
// BLAS): it reads plain row-major blocks with no packing pass, which is most
// of the cost of BLAS on these skinny shapes (one of M, N, K is the rank).
// Everything else goes through at::mm_out / addmm_ (BLAS, any strides). The
// result depends only on the shapes, never on the calling thread.
// The micro-kernels are generated (JIT) and cached per shape and thread, so
// callers pass `stable` = false for shapes that vary from call to call (the
// last, partial row block of a variable token count): those go to BLAS and
// the cache stays bounded by the layer shapes.
inline void mm_rm(const Tensor& C, const Tensor& A, const Tensor& B, bool add, bool stable) {
  const int64_t M = A.size(0), K = A.size(1), N = B.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!add) C.zero_();
    return;
  }
  auto ld = [](const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); };
  auto unit = [](const Tensor& t) { return t.size(1) == 1 || t.stride(1) == 1; };
  const bool row_major = unit(A) && unit(B) && unit(C) && ld(A) >= K && ld(B) >= N && ld(C) >= N;
#ifdef CPUBLAS_BRGEMM_F32F32F32  // torch versions without a float32 brgemm use BLAS
  if (stable && row_major && C.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat &&
      B.scalar_type() == at::kFloat) {
    at::native::cpublas::brgemm(M, N, K, ld(A), ld(B), ld(C), add, A.data_ptr<float>(),
                                B.data_ptr<float>(), C.data_ptr<float>(), /*is_vnni=*/false);
    return;
  }
#else
  (void)stable;
  (void)row_major;
#endif
  if (add) {
    C.addmm_(A, B);
  } else {
    at::mm_out(const_cast<Tensor&>(C), A, B);
  }
}

// Σ over slots (in slot order, element by element: deterministic) of
// parts[slot] → a tensor of parts' trailing shape.
template <typename acc_t>
inline Tensor sum_slots(const Tensor& parts) {
  const int64_t S = parts.size(0);
  if (S == 1) return parts[0];
  const int64_t numel = parts[0].numel();
  Tensor out = at::empty(parts[0].sizes(), parts.options());
  const acc_t* p = parts.data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, numel, 16384, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) o[e] = p[e];
    for (int64_t k = 1; k < S; ++k) {
      const acc_t* __restrict__ pk = p + k * numel;
      for (int64_t e = e0; e < e1; ++e) o[e] += pk[e];
    }
  });
  return out;
}

// dst (cols × rows, contiguous) = scale · srcᵀ for a small rows × cols block
// (src row stride src_ld): the transposed low-rank activations the
// accumulating GEMMs read. Raw loops, no ATen calls, inside the fused loops.
template <typename T>
inline void transpose_scaled(T* dst, const T* src, int64_t rows, int64_t cols, int64_t src_ld,
                             T scale) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < cols; ++k) dst[k * rows + i] = scale * src[i * src_ld + k];
}

// Row blocks [b*kRowBlock, ...) of `rows` rows.
inline int64_t num_row_blocks(int64_t rows) { return (rows + kRowBlock - 1) / kRowBlock; }

}  // namespace cpu
}  // namespace lora_kernels
