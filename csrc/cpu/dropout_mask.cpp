// The dropout mask on the CPU: Philox4x32-10 over a range of counters (see
// csrc/philox.h for the layout; lora_kernels/reference.py defines it), and
// the masked multiply. The scalar loop of philox.h is the definition; the
// AVX-512 and AVX2 versions below run 16 / 8 counters at once. Variants are
// chosen once, at run time, from cpu_isa() (the CPU's features, capped by
// LORA_KERNELS_CPU_ISA); all give the same bits.
#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LK_X86_SIMD 1
#include <immintrin.h>
// GCC's AVX-512 headers trip -Wmaybe-uninitialized (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lora_kernels {
namespace cpu {
namespace {

using philox::kKeyA;
using philox::kKeyB;
using philox::kRoundA;
using philox::kRoundB;
using philox::kRounds;

#ifdef LK_X86_SIMD

__attribute__((target("avx512f"))) void words_avx512(uint64_t seed, uint64_t n0, int64_t count,
                                                     uint32_t* out) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i ka = _mm512_set1_epi32(static_cast<int>(kRoundA));
  const __m512i kb = _mm512_set1_epi32(static_cast<int>(kRoundB));
  const __mmask16 odd = 0xAAAA;
  int64_t k = 0;
  for (; k + 16 <= count; k += 16) {
    const uint64_t n = n0 + static_cast<uint64_t>(k);
    const uint32_t lo = static_cast<uint32_t>(n);
    if (lo > 0xFFFFFFFFu - 15u) {  // the low word wraps inside this batch
      philox::mask_words_range(seed, n, 16, out + 4 * k);
      continue;
    }
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo)), iota);
    __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(n >> 32)));
    __m512i c2 = _mm512_setzero_si512();
    __m512i c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kRounds; ++round) {
      const __m512i pb_e = _mm512_mul_epu32(c2, kb);
      const __m512i pb_o = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), kb);
      const __m512i pa_e = _mm512_mul_epu32(c0, ka);
      const __m512i pa_o = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), ka);
      const __m512i hi_b = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pb_e, 32), pb_o);
      const __m512i lo_b = _mm512_mask_blend_epi32(odd, pb_e, _mm512_slli_epi64(pb_o, 32));
      const __m512i hi_a = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pa_e, 32), pa_o);
      const __m512i lo_a = _mm512_mask_blend_epi32(odd, pa_e, _mm512_slli_epi64(pa_o, 32));
      c0 = _mm512_ternarylogic_epi32(hi_b, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
      c2 = _mm512_ternarylogic_epi32(hi_a, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
      c1 = lo_b;
      c3 = lo_a;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    // 4 x 16 transpose: counter after counter, words o0..o3.
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1);
    const __m512i t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3);
    const __m512i t3 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2);  // counters 4j
    const __m512i u1 = _mm512_unpackhi_epi64(t0, t2);  // 4j + 1
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3);  // 4j + 2
    const __m512i u3 = _mm512_unpackhi_epi64(t1, t3);  // 4j + 3
    const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE);
    const __m512i v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    uint32_t* dst = out + 4 * k;
    _mm512_storeu_si512(dst + 0, _mm512_shuffle_i32x4(v0, v1, 0x88));
    _mm512_storeu_si512(dst + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
    _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
    _mm512_storeu_si512(dst + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
  }
  philox::mask_words_range(seed, n0 + static_cast<uint64_t>(k), count - k, out + 4 * k);
}

__attribute__((target("avx2"))) void words_avx2(uint64_t seed, uint64_t n0, int64_t count,
                                                uint32_t* out) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i ka = _mm256_set1_epi32(static_cast<int>(kRoundA));
  const __m256i kb = _mm256_set1_epi32(static_cast<int>(kRoundB));
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    const uint64_t n = n0 + static_cast<uint64_t>(k);
    const uint32_t lo = static_cast<uint32_t>(n);
    if (lo > 0xFFFFFFFFu - 7u) {
      philox::mask_words_range(seed, n, 8, out + 4 * k);
      continue;
    }
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), iota);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(n >> 32)));
    __m256i c2 = _mm256_setzero_si256();
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kRounds; ++round) {
      const __m256i pb_e = _mm256_mul_epu32(c2, kb);
      const __m256i pb_o = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), kb);
      const __m256i pa_e = _mm256_mul_epu32(c0, ka);
      const __m256i pa_o = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), ka);
      const __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(pb_e, 32), pb_o, 0xAA);
      const __m256i lo_b = _mm256_blend_epi32(pb_e, _mm256_slli_epi64(pb_o, 32), 0xAA);
      const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(pa_e, 32), pa_o, 0xAA);
      const __m256i lo_a = _mm256_blend_epi32(pa_e, _mm256_slli_epi64(pa_o, 32), 0xAA);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo_b;
      c3 = lo_a;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1);
    const __m256i t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3);
    const __m256i t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2);  // counters 0 | 4
    const __m256i u1 = _mm256_unpackhi_epi64(t0, t2);  // 1 | 5
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3);  // 2 | 6
    const __m256i u3 = _mm256_unpackhi_epi64(t1, t3);  // 3 | 7
    __m256i* dst = reinterpret_cast<__m256i*>(out + 4 * k);
    _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(u0, u1, 0x20));  // counters 0, 1
    _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(u2, u3, 0x20));  // 2, 3
    _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(u0, u1, 0x31));  // 4, 5
    _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(u2, u3, 0x31));  // 6, 7
  }
  philox::mask_words_range(seed, n0 + static_cast<uint64_t>(k), count - k, out + 4 * k);
}

#endif  // LK_X86_SIMD

// dst[j] = src[j] * (lane[j] >= thr ? scale : 0): the dropout multiply. Written
// as plain loops and compiled once per ISA (the vectoriser does the rest);
// an in-place twin avoids the aliasing check that would keep dst == src
// scalar.
template <typename T>
inline __attribute__((always_inline)) void mask_mul_loop(T* __restrict__ dst,
                                                         const T* __restrict__ src,
                                                         const uint16_t* __restrict__ lanes,
                                                         int64_t n, uint16_t thr, T scale) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * (lanes[j] >= thr ? scale : T(0));
}

template <typename T>
inline __attribute__((always_inline)) void mask_mul_inplace_loop(T* __restrict__ buf,
                                                                 const uint16_t* __restrict__ lanes,
                                                                 int64_t n, uint16_t thr,
                                                                 T scale) {
  for (int64_t j = 0; j < n; ++j) buf[j] = buf[j] * (lanes[j] >= thr ? scale : T(0));
}

template <typename T>
using MaskMulFn = void (*)(T*, const T*, const uint16_t*, int64_t, uint16_t, T);

#define LK_MASK_MUL_VARIANT(NAME, ATTR)                                                       \
  template <typename T>                                                                      \
  ATTR void NAME(T* dst, const T* src, const uint16_t* lanes, int64_t n, uint16_t thr,        \
                 T scale) {                                                                   \
    if (dst == src)                                                                           \
      mask_mul_inplace_loop<T>(dst, lanes, n, thr, scale);                                    \
    else                                                                                      \
      mask_mul_loop<T>(dst, src, lanes, n, thr, scale);                                       \
  }

LK_MASK_MUL_VARIANT(mask_mul_default, )
#ifdef LK_X86_SIMD
LK_MASK_MUL_VARIANT(mask_mul_avx2, __attribute__((target("avx2,fma"))))
LK_MASK_MUL_VARIANT(mask_mul_avx512, __attribute__((target("avx512f,avx512bw,avx512vl"))))
#endif
#undef LK_MASK_MUL_VARIANT

template <typename T>
MaskMulFn<T> pick_mask_mul() {
#ifdef LK_X86_SIMD
  if (cpu_isa() >= CpuIsa::kAvx512) return &mask_mul_avx512<T>;
  if (cpu_isa() >= CpuIsa::kAvx2) return &mask_mul_avx2<T>;
#endif
  return &mask_mul_default<T>;
}

using WordsFn = void (*)(uint64_t, uint64_t, int64_t, uint32_t*);

WordsFn pick_words_fn() {
#ifdef LK_X86_SIMD
  if (cpu_isa() >= CpuIsa::kAvx512) return &words_avx512;
  if (cpu_isa() >= CpuIsa::kAvx2) return &words_avx2;
#endif
  return &philox::mask_words_range;
}

}  // namespace

void mask_words(uint64_t seed, uint64_t n0, int64_t count, uint32_t* out, MaskIsa isa) {
  static const WordsFn best = pick_words_fn();
  WordsFn fn = best;
#ifdef LK_X86_SIMD
  if (isa == MaskIsa::kScalar) fn = &philox::mask_words_range;
  if (isa == MaskIsa::kAvx2 && __builtin_cpu_supports("avx2")) fn = &words_avx2;
#else
  (void)isa;
#endif
  fn(seed, n0, count, out);
}

void mask_mul(float* dst, const float* src, const uint16_t* lanes, int64_t n, uint16_t thr,
              float scale) {
  static const MaskMulFn<float> fn = pick_mask_mul<float>();
  fn(dst, src, lanes, n, thr, scale);
}

void mask_mul(double* dst, const double* src, const uint16_t* lanes, int64_t n, uint16_t thr,
              double scale) {
  static const MaskMulFn<double> fn = pick_mask_mul<double>();
  fn(dst, src, lanes, n, thr, scale);
}

}  // namespace cpu
}  // namespace lora_kernels
