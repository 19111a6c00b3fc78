// Shared helpers of the CPU kernels: the CPU device checks (the checks
// common to both backends are in ../op_checks.h), the dropout mask of a row
// block, and the small row-major GEMM used inside the fused loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/irange.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "../op_checks.h"
#include "../philox.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the CPU dropout mask reads Philox words as 16-bit lanes: little-endian hosts only"
#endif

namespace lora_kernels {
namespace cpu {

using at::Tensor;

// Rows of x handled per step of the fused loops. Fixed (never derived from
// the thread count), so every result is bitwise the same for any number of
// threads.
constexpr int64_t kRowBlock = 128;

// The CPU side of the shared device checks (op_checks.h).
inline void check_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ",
              t.device());
}

struct DeviceChecks {
  static void first(const char* op, const char* name, const Tensor& t) { check_cpu(op, name, t); }
  static void same(const char* op, const char* name, const Tensor& t, const char* /*ref_name*/,
                   const Tensor& /*ref*/) {
    check_cpu(op, name, t);
  }
};

// The 64-bit seed (reinterpreted as unsigned). Only read when p > 0.
inline uint64_t read_seed(const char* op, const Tensor& seed) {
  check_seed(op, seed);
  TORCH_CHECK(seed.device().is_cpu(), op, ": seed must be a CPU tensor, got device ",
              seed.device());
  return static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());  // no item(): no dispatch
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

// The x86 SIMD level the kernels use: the CPU's best, capped by
// LORA_KERNELS_CPU_ISA (cpu_isa.cpp). Ordered: a level implies the ones below.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
CpuIsa cpu_isa();

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

// Rows [r0, r0 + n) of x (row stride xs0, column stride xs1), times the
// mask when `lanes` is given, in the low-rank dtype: into buf (n × in,
// contiguous). Plain loops and the SIMD mask multiply, no ATen calls.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* xp, int64_t xs0, int64_t xs1, int64_t r0, int64_t n, int64_t in,
               acc_t* buf, const uint16_t* lanes, int64_t lane_ld,
               const LaneMask<acc_t>& lane_mask) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t* dst = buf + i * in;
    const scalar_t* row = xp + (r0 + i) * xs0;
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      if (xs1 == 1 && lanes) {
        mask_mul(dst, row, lanes + i * lane_ld, in, lane_mask.thr, lane_mask.scale);
        continue;
      }
    }
    for (int64_t j = 0; j < in; ++j) dst[j] = static_cast<acc_t>(row[j * xs1]);
    if (lanes) mask_mul(dst, dst, lanes + i * lane_ld, in, lane_mask.thr, lane_mask.scale);
  }
}

// Which dimension of an mm_rm call follows the token count of a row block:
// none for a full block (kRowBlock rows), else the rows (M) or the inner
// dimension (K) of a partial one.
enum class Vary { kNone, kM, kK };
inline Vary vary_m(bool full) { return full ? Vary::kNone : Vary::kM; }
inline Vary vary_k(bool full) { return full ? Vary::kNone : Vary::kK; }

#ifdef CPUBLAS_BRGEMM_F32F32F32
// ATen's float32 batch-reduce GEMM (oneDNN's JIT micro-kernel where the CPU
// has AVX2 or better, else BLAS). Its kernels are generated and cached per
// shape and thread, so a dimension that follows the token count is split
// into power-of-two pieces (64, 32, ..., 1 rows; a partial block has fewer
// than kRowBlock = 128): at most 7 more kernels per layer shape, and tiny
// token counts never fall back to BLAS, whose fixed cost per call dwarfs
// these GEMMs. Along K the pieces accumulate in order.
inline void brgemm_f32(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                       bool add, const float* A, const float* B, float* C, Vary vary) {
  if (vary == Vary::kNone) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
    return;
  }
  const int64_t total = vary == Vary::kM ? M : K;
  int64_t done = 0;
  for (int64_t piece = 64; piece >= 1; piece /= 2) {
    for (; total - done >= piece; done += piece) {
      if (vary == Vary::kM) {
        at::native::cpublas::brgemm(piece, N, K, lda, ldb, ldc, add, A + done * lda, B,
                                    C + done * ldc, /*is_vnni=*/false);
      } else {
        at::native::cpublas::brgemm(M, N, piece, lda, ldb, ldc, add || done > 0, A + done,
                                    B + done * ldb, C, /*is_vnni=*/false);
      }
    }
  }
}
#endif

// C = A·B, or C += A·B with `add`, for 2-D views A (M×K), B (K×N), C (M×N).
// float32 row-major operands (unit column stride) go to ATen's batch-reduce
// GEMM (brgemm_f32 above): it reads plain row-major blocks with no packing
// pass, which is most of the cost of BLAS on these skinny shapes (one of M,
// N, K is the rank). Everything else goes through at::mm_out / addmm_ (BLAS,
// any strides). `vary` says which dimension follows the token count. The
// result depends only on the shapes, never on the calling thread.
inline void mm_rm(const Tensor& C, const Tensor& A, const Tensor& B, bool add, Vary vary) {
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
  if (row_major && C.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat &&
      B.scalar_type() == at::kFloat) {
    brgemm_f32(M, N, K, ld(A), ld(B), ld(C), add, A.data_ptr<float>(), B.data_ptr<float>(),
               C.data_ptr<float>(), vary);
    return;
  }
#else
  (void)vary;
  (void)row_major;
#endif
  if (add) {
    C.addmm_(A, B);
  } else {
    at::mm_out(const_cast<Tensor&>(C), A, B);
  }
}

// mm_rm on raw row-major pointers (C is M×N with row stride ldc, A M×K /
// lda, B K×N / ldb): float32 goes to brgemm_f32 directly, with no tensor
// views made per call; other types go through mm_rm on views of the memory.
template <typename T>
inline void mm_rm_ptr(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool add, Vary vary) {
  if (M == 0 || N == 0) return;
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same<T, float>::value) {
    if (K > 0) {
      brgemm_f32(M, N, K, lda, ldb, ldc, add, A, B, C, vary);
      return;
    }
  }
#endif
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  mm_rm(at::from_blob(C, {M, N}, {ldc, 1}, opts),
        at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts),
        at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts), add, vary);
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

// dst (cols × rows, contiguous) = scale · srcᵀ for a rows × cols block (src
// row stride src_ld): the transposed operands the small row-major GEMMs read
// (Aᵀ, scaling·Bᵀ, the transposed low-rank activations). In 16 × 16 tiles,
// so reads and writes both stay within a few cache lines; plain loops, no
// ATen calls.
template <typename T>
inline void transpose_scaled(T* dst, const T* src, int64_t rows, int64_t cols, int64_t src_ld,
                             T scale) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t k0 = 0; k0 < cols; k0 += kTile) {
      const int64_t k1 = std::min(cols, k0 + kTile);
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t i = i0; i < i1; ++i) dst[k * rows + i] = scale * src[i * src_ld + k];
    }
  }
}

// An uninitialised buffer of n elements (a std::vector would zero it first).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n > 0 ? n : 1)]);
}

// Whether a 2-D tensor is readable in place as a row-major matrix (unit
// column stride, rows that do not overlap), and its row stride as such.
inline bool rows_in_place(const Tensor& t) {
  return (t.stride(1) == 1 || t.size(1) <= 1) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}
inline int64_t row_ld(const Tensor& t) {
  return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0);
}

// Row blocks [b*kRowBlock, ...) of `rows` rows.
inline int64_t num_row_blocks(int64_t rows) { return (rows + kRowBlock - 1) / kRowBlock; }

}  // namespace cpu
}  // namespace lora_kernels
