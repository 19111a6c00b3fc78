// The embedding backward's row kernel, float32 (see lowrank_rows.h):
// dS = g·Bsᵀ and part += sᵀ·g from one read of each row of g.
//
// Memory plan. Bs (r × dim) and part (r × dim) are stored in packed column
// blocks of kPackCols columns: block b holds the r rows' columns
// [b·kPackCols, (b+1)·kPackCols) contiguously ([r][kPackCols], zero padded).
// A row-major r × dim matrix would put its r rows 4 KB apart for dim = 1024,
// all in the same L1 set, and the part stores would alias the loads of the
// next rank row (4K aliasing); this kernel ran at a quarter of its speed that
// way. A block of both is 2 · 8 · 128 · 4 = 8 KB: it stays in L1 while a row
// pair passes over it.
//
// Register plan (AVX-512, 32 zmm). Rows two at a time, rank chunks of R ≤ 8,
// 16 columns per step: the two g vectors are loaded once and used for both
// gradients:
//   dS: 2·R accumulators (one per row and rank), reduced to scalars at the
//       end of each block (a transposing reduction: 8 vectors → 8 sums);
//   dB: R part vectors loaded, two FMAs each (rows in order), stored.
// 32 FMAs per step for 18 vector loads and 8 stores. Rows are read in order,
// each prefetched kPrefetchRows rows ahead (one line per step), so the
// stream of g from memory overlaps the FMAs.
#include "lowrank_rows.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LK_GRADS_AVX512 1
#include <immintrin.h>
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lora_kernels {
namespace cpu {

#ifdef LK_GRADS_AVX512
namespace {

#define LK_AVX512 __attribute__((target("avx512f")))
#define LK_INLINE inline __attribute__((always_inline, target("avx512f")))

constexpr int64_t kPrefetchRows = 4;

// v[0..7] → the 8 sums (lane k = Σ v[k]) in a ymm.
LK_INLINE __m256 reduce8(const __m512* v) {
  const __m512 a01 = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
  const __m512 a23 = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
  const __m512 a45 = _mm512_add_ps(_mm512_unpacklo_ps(v[4], v[5]), _mm512_unpackhi_ps(v[4], v[5]));
  const __m512 a67 = _mm512_add_ps(_mm512_unpacklo_ps(v[6], v[7]), _mm512_unpackhi_ps(v[6], v[7]));
  // Per 128-bit lane: a01 = [v0, v1, v0, v1] partial sums, and so on.
  const __m512 b0 = _mm512_add_ps(_mm512_shuffle_ps(a01, a23, 0x44), _mm512_shuffle_ps(a01, a23, 0xEE));
  const __m512 b1 = _mm512_add_ps(_mm512_shuffle_ps(a45, a67, 0x44), _mm512_shuffle_ps(a45, a67, 0xEE));
  // Per lane: b0 = [v0, v1, v2, v3], b1 = [v4, v5, v6, v7]; add the 4 lanes.
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(b0, b1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_f32x4(b0, b1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 d = _mm512_add_ps(c, _mm512_shuffle_f32x4(c, c, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm512_extractf32x4_ps(d, 0)),
                              _mm512_extractf32x4_ps(d, 2), 1);
}

template <int R, int kRows, bool kDS, bool kDB, bool kMasked>
LK_INLINE void grads_step(const float* const* g, const float* const* s, const float* Bb,
                          float* Pb, __m512* acc, int64_t j, __mmask16 m, int64_t pf) {
  __m512 x[kRows];
#pragma GCC unroll 2
  for (int i = 0; i < kRows; ++i) {
    x[i] = kMasked ? _mm512_maskz_loadu_ps(m, g[i] + j) : _mm512_loadu_ps(g[i] + j);
    _mm_prefetch(reinterpret_cast<const char*>(g[i] + pf + j), _MM_HINT_T0);
  }
  // Bs and part are zero padded to whole blocks: no masks needed for them.
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) {
    if (kDS) {
      const __m512 b = _mm512_loadu_ps(Bb + k * kPackCols + j);
#pragma GCC unroll 2
      for (int i = 0; i < kRows; ++i) acc[i * R + k] = _mm512_fmadd_ps(x[i], b, acc[i * R + k]);
    }
    if (kDB) {
      __m512 p = _mm512_loadu_ps(Pb + k * kPackCols + j);
#pragma GCC unroll 2
      for (int i = 0; i < kRows; ++i) p = _mm512_fmadd_ps(x[i], _mm512_set1_ps(s[i][k]), p);
      _mm512_storeu_ps(Pb + k * kPackCols + j, p);
    }
  }
}

template <int R, int kRows, bool kDS, bool kDB>
LK_INLINE void grads_rows(const float* g, int64_t ld_g, int64_t t, int64_t dim, const float* Bp,
                          float* Pp, int64_t blk_stride, const float* s, int64_t ld_s, float* dS,
                          int64_t ld_ds) {
  const float* gr[kRows];
  const float* sr[kRows];
#pragma GCC unroll 2
  for (int i = 0; i < kRows; ++i) {
    gr[i] = g + (t + i) * ld_g;
    sr[i] = s + (t + i) * ld_s;
  }
  const int64_t pf = kPrefetchRows * ld_g;  // a prefetch never faults, even past the end
  __m256 total[kRows];
#pragma GCC unroll 2
  for (int i = 0; i < kRows; ++i) total[i] = _mm256_setzero_ps();
  for (int64_t j0 = 0, blk = 0; j0 < dim; j0 += kPackCols, ++blk) {
    const int64_t w = std::min(kPackCols, dim - j0);
    const int64_t wf = w & ~int64_t(15);
    const float* Bb = Bp + blk * blk_stride;
    float* Pb = Pp + blk * blk_stride;
    const float* gb[kRows];
#pragma GCC unroll 2
    for (int i = 0; i < kRows; ++i) gb[i] = gr[i] + j0;
    __m512 acc[kRows * R];
#pragma GCC unroll 16
    for (int q = 0; q < kRows * R; ++q) acc[q] = _mm512_setzero_ps();
    for (int64_t j = 0; j < wf; j += 16)
      grads_step<R, kRows, kDS, kDB, false>(gb, sr, Bb, Pb, acc, j, 0, pf);
    if (wf < w) {
      const __mmask16 m = static_cast<__mmask16>((1u << (w - wf)) - 1u);
      grads_step<R, kRows, kDS, kDB, true>(gb, sr, Bb, Pb, acc, wf, m, pf);
    }
    if (kDS) {
#pragma GCC unroll 2
      for (int i = 0; i < kRows; ++i) {
        __m512 v[8];
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) v[k] = k < R ? acc[i * R + k] : _mm512_setzero_ps();
        total[i] = _mm256_add_ps(total[i], reduce8(v));
      }
    }
  }
  if (kDS) {
#pragma GCC unroll 2
    for (int i = 0; i < kRows; ++i) {
      alignas(32) float out[8];
      _mm256_store_ps(out, total[i]);
      std::memcpy(dS + (t + i) * ld_ds, out, sizeof(float) * R);
    }
  }
}

template <int R, bool kDS, bool kDB>
LK_AVX512 void grads_rank_chunk(const float* g, int64_t ld_g, int64_t n, int64_t dim,
                                const float* Bp, float* Pp, int64_t blk_stride, const float* s,
                                int64_t ld_s, float* dS, int64_t ld_ds) {
  int64_t t = 0;
  for (; t + 2 <= n; t += 2)
    grads_rows<R, 2, kDS, kDB>(g, ld_g, t, dim, Bp, Pp, blk_stride, s, ld_s, dS, ld_ds);
  if (t < n) grads_rows<R, 1, kDS, kDB>(g, ld_g, t, dim, Bp, Pp, blk_stride, s, ld_s, dS, ld_ds);
}

using GradsFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t,
                         const float*, int64_t, float*, int64_t);

template <bool kDS, bool kDB>
GradsFn grads_fn(int64_t R) {
  switch (R) {
    case 1: return &grads_rank_chunk<1, kDS, kDB>;
    case 2: return &grads_rank_chunk<2, kDS, kDB>;
    case 3: return &grads_rank_chunk<3, kDS, kDB>;
    case 4: return &grads_rank_chunk<4, kDS, kDB>;
    case 5: return &grads_rank_chunk<5, kDS, kDB>;
    case 6: return &grads_rank_chunk<6, kDS, kDB>;
    case 7: return &grads_rank_chunk<7, kDS, kDB>;
    default: return &grads_rank_chunk<8, kDS, kDB>;
  }
}

}  // namespace
#endif  // LK_GRADS_AVX512

void lowrank_grads_rows(const float* g, int64_t ld_g, int64_t n, int64_t dim, int64_t r,
                        const float* Bs_packed, const float* s, int64_t ld_s, float* dS,
                        int64_t ld_ds, float* part_packed) {
#ifdef LK_GRADS_AVX512
  if (n <= 0 || dim <= 0 || r <= 0 || (!dS && !part_packed)) return;
  const int64_t blk_stride = r * kPackCols;
  for (int64_t k0 = 0; k0 < r; k0 += 8) {
    const int64_t R = std::min<int64_t>(8, r - k0);
    const GradsFn fn = !part_packed ? grads_fn<true, false>(R)
                       : !dS        ? grads_fn<false, true>(R)
                                    : grads_fn<true, true>(R);
    fn(g, ld_g, n, dim, Bs_packed + k0 * kPackCols,
       part_packed ? part_packed + k0 * kPackCols : nullptr, blk_stride, s + k0, ld_s,
       dS ? dS + k0 : nullptr, ld_ds);
  }
#else
  (void)g, (void)ld_g, (void)n, (void)dim, (void)r, (void)Bs_packed, (void)s, (void)ld_s,
      (void)dS, (void)ld_ds, (void)part_packed;
#endif
}

}  // namespace cpu
}  // namespace lora_kernels
