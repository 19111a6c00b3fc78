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
//
// AVX2 variant (GCC vector types compiled for AVX2 + FMA; 16 ymm): rows two
// at a time, ranks in chunks of 4 (each chunk a pass over the row pair while
// it is in L1), 8 columns per step: 8 dS accumulators (summed over the whole
// row, their lanes added once at its end), 8 broadcasts of s, the two g
// vectors; per rank one Bs load and one part load and store for 4 FMAs.
// Past the last multiple of 8 columns of a row, g is read into a zeroed
// vector (Bs and part are zero padded to whole blocks).
#include "lowrank_rows.h"

#include "common.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LK_GRADS_AVX512 1
#include <immintrin.h>

#include "vec8.h"
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

// --- AVX2 (vec8.h)

// Rank chunk of the AVX2 kernel: 2 rows × 4 ranks of dS accumulators and
// 2 × 4 broadcasts of s fill most of the 16 ymm registers.
constexpr int kRankChunkAvx2 = 4;

// One 8-column step of kRows rows: acc[i][k] += x_i·Bs[k] and
// part[k] += Σ_i s[i][k]·x_i (rows in order).
template <int R, int kRows, bool kDS, bool kDB>
LK_AVX2_INLINE void grads_step_v8(const V8* x, const float* Bb, float* Pb, const float* sv,
                                  V8* acc) {
#pragma GCC unroll 4
  for (int k = 0; k < R; ++k) {
    if (kDS) {
      const V8 b = load8(Bb + k * kPackCols);
#pragma GCC unroll 2
      for (int i = 0; i < kRows; ++i) acc[i * R + k] += x[i] * b;
    }
    if (kDB) {
      V8 p = load8(Pb + k * kPackCols);
#pragma GCC unroll 2
      for (int i = 0; i < kRows; ++i) p += sv[i * R + k] * x[i];
      store8(Pb + k * kPackCols, p);
    }
  }
}

// Rows t .. t + kRows - 1, ranks k0 .. k0 + R - 1 (Bp, Pp, s and dS already
// offset to k0), over all columns.
template <int R, int kRows, bool kDS, bool kDB>
LK_AVX2 void grads_rows_v8(const float* g, int64_t ld_g, int64_t t, int64_t dim, const float* Bp,
                           float* Pp, int64_t blk_stride, const float* s, int64_t ld_s,
                           float* dS, int64_t ld_ds, bool prefetch) {
  float sv[kRows * R];
  for (int i = 0; i < kRows; ++i)
    for (int k = 0; k < R; ++k) sv[i * R + k] = kDB ? s[(t + i) * ld_s + k] : 0.f;
  V8 acc[kRows * R];
#pragma GCC unroll 8
  for (int q = 0; q < kRows * R; ++q) acc[q] = V8{};
  const float* gr[kRows];
  for (int i = 0; i < kRows; ++i) gr[i] = g + (t + i) * ld_g;
  const int64_t pf = kPrefetchRows * ld_g;  // a prefetch never faults, even past the end
  for (int64_t j0 = 0, blk = 0; j0 < dim; j0 += kPackCols, ++blk) {
    const int64_t w = std::min(kPackCols, dim - j0);
    const float* Bb = Bp + blk * blk_stride;
    float* Pb = kDB ? Pp + blk * blk_stride : nullptr;
    int64_t j = 0;
    V8 x[kRows];
    for (; j + 8 <= w; j += 8) {
#pragma GCC unroll 2
      for (int i = 0; i < kRows; ++i) {
        x[i] = load8(gr[i] + j0 + j);
        if (prefetch && (j & 15) == 0) __builtin_prefetch(gr[i] + pf + j0 + j);
      }
      grads_step_v8<R, kRows, kDS, kDB>(x, Bb + j, kDB ? Pb + j : nullptr, sv, acc);
    }
    if (j < w) {
      for (int i = 0; i < kRows; ++i) {
        x[i] = V8{};
        for (int64_t l = 0; l < w - j; ++l) x[i][l] = gr[i][j0 + j + l];
      }
      grads_step_v8<R, kRows, kDS, kDB>(x, Bb + j, kDB ? Pb + j : nullptr, sv, acc);
    }
  }
  if (kDS)
    for (int i = 0; i < kRows; ++i)
      for (int k = 0; k < R; ++k) dS[(t + i) * ld_ds + k] = lane_sum(acc[i * R + k]);
}

using RowsFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t,
                        const float*, int64_t, float*, int64_t, bool);

template <int kRows, bool kDS, bool kDB>
RowsFn rows_fn_avx2(int64_t R) {
  switch (R) {
    case 1: return &grads_rows_v8<1, kRows, kDS, kDB>;
    case 2: return &grads_rows_v8<2, kRows, kDS, kDB>;
    case 3: return &grads_rows_v8<3, kRows, kDS, kDB>;
    default: return &grads_rows_v8<4, kRows, kDS, kDB>;
  }
}

// Row pairs in order; for each, the rank chunks in order while the pair's
// rows are in L1 (only the first chunk prefetches the rows ahead).
template <bool kDS, bool kDB>
void grads_avx2(const float* g, int64_t ld_g, int64_t n, int64_t dim, int64_t r,
                const float* Bp, float* Pp, int64_t blk_stride, const float* s, int64_t ld_s,
                float* dS, int64_t ld_ds) {
  constexpr int64_t C = kRankChunkAvx2;
  const int64_t tail = r % C;
  const RowsFn pair_full = rows_fn_avx2<2, kDS, kDB>(C), pair_tail = rows_fn_avx2<2, kDS, kDB>(tail);
  const RowsFn one_full = rows_fn_avx2<1, kDS, kDB>(C), one_tail = rows_fn_avx2<1, kDS, kDB>(tail);
  auto run = [&](RowsFn full, RowsFn part_fn, int64_t t) {
    for (int64_t k0 = 0; k0 < r; k0 += C)
      (k0 + C <= r ? full : part_fn)(g, ld_g, t, dim, Bp + k0 * kPackCols,
                                     kDB ? Pp + k0 * kPackCols : nullptr, blk_stride,
                                     kDB ? s + k0 : nullptr, ld_s, kDS ? dS + k0 : nullptr,
                                     ld_ds, k0 == 0);
  };
  int64_t t = 0;
  for (; t + 2 <= n; t += 2) run(pair_full, pair_tail, t);
  if (t < n) run(one_full, one_tail, t);
}

}  // namespace
#endif  // LK_GRADS_AVX512

void lowrank_grads_rows(const float* g, int64_t ld_g, int64_t n, int64_t dim, int64_t r,
                        const float* Bs_packed, const float* s, int64_t ld_s, float* dS,
                        int64_t ld_ds, float* part_packed) {
#ifdef LK_GRADS_AVX512
  if (n <= 0 || dim <= 0 || r <= 0 || (!dS && !part_packed)) return;
  const int64_t blk_stride = r * kPackCols;
  if (cpu_isa() < CpuIsa::kAvx512) {
    const auto fn = !part_packed ? &grads_avx2<true, false>
                    : !dS        ? &grads_avx2<false, true>
                                 : &grads_avx2<true, true>;
    fn(g, ld_g, n, dim, r, Bs_packed, part_packed, blk_stride, s, ld_s, dS, ld_ds);
    return;
  }
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
