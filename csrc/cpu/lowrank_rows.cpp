// The embedding forward's row kernel, float32 (see lowrank_rows.h).
//
// Register plan (AVX-512, 32 zmm registers). The rank is taken in chunks of
// at most R = 8 (a template parameter, so the per-rank values live in
// registers); rows are taken two at a time and columns 16 at a time. The
// 2·R values s[t, k] are broadcast once per row pair; each 16-column step
// loads the two source rows and R values of Bt and does 2·R FMAs (about 0.6
// loads per FMA), then stores the two output rows. The next pair's source
// rows are prefetched one cache line per step, so the gather's memory
// latency overlaps the FMAs: the whole forward costs about what the plain
// row gather costs.
// Tails (columns not a multiple of 16) use masked loads and stores.
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
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lora_kernels {
namespace cpu {

namespace {

// nullptr when the row kernels run, else why not (read on each call: the
// variable may change between calls, and tests compare both paths).
const char* row_kernels_off_reason() {
#ifdef LK_ROWS_AVX512
  static const bool has = __builtin_cpu_supports("avx512f");
  if (!has) return "this CPU has no AVX-512F";
  const char* env = std::getenv("LORA_KERNELS_CPU_SIMD");
  if (env && std::strcmp(env, "0") == 0) return "LORA_KERNELS_CPU_SIMD=0";
  if (cpu_isa() < CpuIsa::kAvx512) return "LORA_KERNELS_CPU_ISA is below avx512";
  return nullptr;
#else
  return "not an x86-64 build";
#endif
}

// What lora_kernels.info prints for the row kernels.
std::string row_kernels_status() {
  const char* why = row_kernels_off_reason();
  return why ? std::string("off: ") + why : std::string("on (AVX-512)");
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

}  // namespace
#endif  // LK_ROWS_AVX512

constexpr int64_t kRankChunk = 8;

void rows_plus_lowrank(float* y, int64_t ld_y, const float* base, int64_t ld_base,
                       const int64_t* rows, int64_t n, int64_t dim, const float* s,
                       int64_t ld_s, const float* Bt, int64_t ld_bt, int64_t r) {
#ifdef LK_ROWS_AVX512
  if (n <= 0 || dim <= 0) return;
  for (int64_t k0 = 0; k0 < r; k0 += kRankChunk) {
    const int64_t R = std::min(kRankChunk, r - k0);
    // The first chunk reads the source rows; later ones add to y in place.
    const bool first = k0 == 0;
    kFwd[R](y, ld_y, first ? base : y, first ? ld_base : ld_y, first ? rows : nullptr, n, dim,
            s + k0, ld_s, Bt + k0 * ld_bt, ld_bt);
  }
#else
  (void)y, (void)ld_y, (void)base, (void)ld_base, (void)rows, (void)n, (void)dim, (void)s,
      (void)ld_s, (void)Bt, (void)ld_bt, (void)r;
#endif
}

}  // namespace cpu
}  // namespace lora_kernels
