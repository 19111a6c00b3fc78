// The embedding forward's row kernel, float32 (see lowrank_rows.h), in two
// variants: AVX-512 intrinsics and, for CPUs with AVX2 but no AVX-512, GCC
// vector types compiled for AVX2 + FMA.
//
// AVX-512 register plan (32 zmm registers). The rank is taken in chunks of
// at most R = 8 (a template parameter, so the per-rank values live in
// registers); rows are taken two at a time and columns 16 at a time. The
// 2·R values s[t, k] are broadcast once per row pair; each 16-column step
// loads the two source rows and R values of Bt and does 2·R FMAs (about 0.6
// loads per FMA), then stores the two output rows. The next pair's source
// rows are prefetched one cache line per step, so the gather's memory
// latency overlaps the FMAs: the whole forward costs about what the plain
// row gather costs.
// Tails (columns not a multiple of 16) use masked loads and stores.
//
// AVX2 register plan (16 ymm registers): one row at a time, 16 columns (two
// vectors) per step: R broadcasts of s[t, k], two accumulators and two Bt
// vectors, 2·R FMAs for 2 + 2·R loads. Two rows at a time would need 2·R
// broadcasts, more registers than AVX2 has. The source row of the row after
// next is prefetched one cache line per step. Columns past the last multiple
// of 8 are done one by one, in the same order of terms.
#include "lowrank_rows.h"

#include "common.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LK_ROWS_AVX512 1
#include <immintrin.h>

#include "vec8.h"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lora_kernels {
namespace cpu {

namespace {

// nullptr when the row kernels run, else why not (read on each call: the
// variable may change between calls, and tests compare both paths).
const char* row_kernels_off_reason() {
#ifdef LK_ROWS_AVX512
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!has) return "this CPU has neither AVX-512F nor AVX2";
  const char* env = std::getenv("LORA_KERNELS_CPU_SIMD");
  if (env && std::strcmp(env, "0") == 0) return "LORA_KERNELS_CPU_SIMD=0";
  if (cpu_isa() < CpuIsa::kAvx2) return "LORA_KERNELS_CPU_ISA is below avx2";
  return nullptr;
#else
  return "not an x86-64 build";
#endif
}

// What lora_kernels.info prints for the row kernels.
std::string row_kernels_status() {
  const char* why = row_kernels_off_reason();
  if (why) return std::string("off: ") + why;
  return cpu_isa() >= CpuIsa::kAvx512 ? "on (AVX-512)" : "on (AVX2)";
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels_cpu, CompositeImplicitAutograd, m) {
  m.impl("_row_kernels", &row_kernels_status);
}

bool lowrank_rows_available() { return row_kernels_off_reason() == nullptr; }

#ifdef LK_ROWS_AVX512
namespace {

#define LK_AVX512 __attribute__((target("avx512f")))
#define LK_INLINE inline __attribute__((always_inline, target("avx512f")))

template <bool kMasked>
LK_INLINE __m512 load(const float* p, __mmask16 m) {
  return kMasked ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}

template <bool kMasked>
LK_INLINE void store(float* p, __m512 v, __mmask16 m) {
  if (kMasked) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}

// ---------------------------------------------------------------------------
// y rows = source rows + s·Bt
// ---------------------------------------------------------------------------

template <int R, int kRows, bool kMasked>
LK_INLINE void fwd_step(float* const* y, const float* const* src, const float* const* pf,
                        const __m512* sv, const float* Bt, int64_t ld_bt, int64_t j,
                        __mmask16 m) {
  __m512 a[kRows];
#pragma GCC unroll 2
  for (int i = 0; i < kRows; ++i) {
    a[i] = load<kMasked>(src[i] + j, m);
    _mm_prefetch(reinterpret_cast<const char*>(pf[i] + j), _MM_HINT_T0);
  }
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) {
    const __m512 b = load<kMasked>(Bt + k * ld_bt + j, m);
#pragma GCC unroll 2
    for (int i = 0; i < kRows; ++i) a[i] = _mm512_fmadd_ps(sv[i * R + k], b, a[i]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < kRows; ++i) store<kMasked>(y[i] + j, a[i], m);
}

template <int R>
LK_AVX512 void fwd_rank_chunk(float* y, int64_t ld_y, const float* base, int64_t ld_base,
                              const int64_t* rows, int64_t n, int64_t dim, const float* s,
                              int64_t ld_s, const float* Bt, int64_t ld_bt) {
  const int64_t full = dim & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (dim - full)) - 1u);
  auto src_row = [&](int64_t t) { return base + (rows ? rows[t] : t) * ld_base; };
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) {
    float* yr[2] = {y + t * ld_y, y + (t + 1) * ld_y};
    const float* sr[2] = {src_row(t), src_row(t + 1)};
    const float* pf[2] = {src_row(t + 2 < n ? t + 2 : t), src_row(t + 3 < n ? t + 3 : t)};
    __m512 sv[2 * R];
#pragma GCC unroll 16
    for (int q = 0; q < 2 * R; ++q) sv[q] = _mm512_set1_ps(s[(t + q / R) * ld_s + q % R]);
    for (int64_t j = 0; j < full; j += 16) fwd_step<R, 2, false>(yr, sr, pf, sv, Bt, ld_bt, j, 0);
    if (full < dim) fwd_step<R, 2, true>(yr, sr, pf, sv, Bt, ld_bt, full, tail);
  }
  if (t < n) {
    float* yr[1] = {y + t * ld_y};
    const float* sr[1] = {src_row(t)};
    __m512 sv[R];
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) sv[k] = _mm512_set1_ps(s[t * ld_s + k]);
    for (int64_t j = 0; j < full; j += 16) fwd_step<R, 1, false>(yr, sr, sr, sv, Bt, ld_bt, j, 0);
    if (full < dim) fwd_step<R, 1, true>(yr, sr, sr, sv, Bt, ld_bt, full, tail);
  }
}

using FwdFn = void (*)(float*, int64_t, const float*, int64_t, const int64_t*, int64_t, int64_t,
                       const float*, int64_t, const float*, int64_t);
constexpr FwdFn kFwd[9] = {nullptr,
                           &fwd_rank_chunk<1>,
                           &fwd_rank_chunk<2>,
                           &fwd_rank_chunk<3>,
                           &fwd_rank_chunk<4>,
                           &fwd_rank_chunk<5>,
                           &fwd_rank_chunk<6>,
                           &fwd_rank_chunk<7>,
                           &fwd_rank_chunk<8>};

// --- AVX2 (vec8.h)

template <int R>
LK_AVX2_INLINE void fwd_row_v8(float* y, const float* src, const float* pf, const float* sr,
                               const float* Bt, int64_t ld_bt, int64_t dim) {
  float sv[R];
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) sv[k] = sr[k];
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    __builtin_prefetch(pf + j);
    V8 a0 = load8(src + j), a1 = load8(src + j + 8);
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) {
      a0 += sv[k] * load8(Bt + k * ld_bt + j);
      a1 += sv[k] * load8(Bt + k * ld_bt + j + 8);
    }
    store8(y + j, a0);
    store8(y + j + 8, a1);
  }
  if (j + 8 <= dim) {
    V8 a0 = load8(src + j);
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) a0 += sv[k] * load8(Bt + k * ld_bt + j);
    store8(y + j, a0);
    j += 8;
  }
  for (; j < dim; ++j) {
    float a = src[j];
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k) a += sv[k] * Bt[k * ld_bt + j];
    y[j] = a;
  }
}

template <int R>
LK_AVX2 void fwd_rank_chunk_avx2(
    float* y, int64_t ld_y, const float* base, int64_t ld_base, const int64_t* rows, int64_t n,
    int64_t dim, const float* s, int64_t ld_s, const float* Bt, int64_t ld_bt) {
  auto src_row = [&](int64_t t) { return base + (rows ? rows[t] : t) * ld_base; };
  for (int64_t t = 0; t < n; ++t)
    fwd_row_v8<R>(y + t * ld_y, src_row(t), src_row(t + 2 < n ? t + 2 : t), s + t * ld_s, Bt,
                  ld_bt, dim);
}

constexpr FwdFn kFwdAvx2[9] = {nullptr,
                               &fwd_rank_chunk_avx2<1>,
                               &fwd_rank_chunk_avx2<2>,
                               &fwd_rank_chunk_avx2<3>,
                               &fwd_rank_chunk_avx2<4>,
                               &fwd_rank_chunk_avx2<5>,
                               &fwd_rank_chunk_avx2<6>,
                               &fwd_rank_chunk_avx2<7>,
                               &fwd_rank_chunk_avx2<8>};

}  // namespace
#endif  // LK_ROWS_AVX512

constexpr int64_t kRankChunk = 8;

void rows_plus_lowrank(float* y, int64_t ld_y, const float* base, int64_t ld_base,
                       const int64_t* rows, int64_t n, int64_t dim, const float* s,
                       int64_t ld_s, const float* Bt, int64_t ld_bt, int64_t r) {
#ifdef LK_ROWS_AVX512
  if (n <= 0 || dim <= 0) return;
  const FwdFn* fwd = cpu_isa() >= CpuIsa::kAvx512 ? kFwd : kFwdAvx2;
  for (int64_t k0 = 0; k0 < r; k0 += kRankChunk) {
    const int64_t R = std::min(kRankChunk, r - k0);
    // The first chunk reads the source rows; later ones add to y in place.
    const bool first = k0 == 0;
    fwd[R](y, ld_y, first ? base : y, first ? ld_base : ld_y, first ? rows : nullptr, n, dim,
            s + k0, ld_s, Bt + k0 * ld_bt, ld_bt);
  }
#else
  (void)y, (void)ld_y, (void)base, (void)ld_base, (void)rows, (void)n, (void)dim, (void)s,
      (void)ld_s, (void)Bt, (void)ld_bt, (void)r;
#endif
}

}  // namespace cpu
}  // namespace lora_kernels
