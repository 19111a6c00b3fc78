// Philox4x32-10 and the LoRA dropout mask, shared by the host (C++) and
// device (CUDA) kernels. No torch includes: plain integer arithmetic only.
//
// The mask is defined once, in lora_kernels/reference.py (module docstring);
// this header reproduces it bit for bit:
//
//   x is viewed as rows x cols (cols = last dim). Each row is split into
//   words = ceil(cols / 8) groups of 8 columns. Element (i, j) uses Philox
//   counter n = i * words + j / 8, i.e. counter words (n lo32, n hi32, 0, 0),
//   key (seed lo32, seed hi32), and lane l = j % 8 of the output, where lane
//   l is the 16-bit value (o[l / 2] >> (16 * (l % 2))) & 0xFFFF.
//   The element is kept when lane >= threshold = floor(p * 65536 + 0.5);
//   kept values are multiplied by 65536 / (65536 - threshold).
//
// Since every row starts a fresh counter, a tile whose first column is a
// multiple of 8 owns whole counters. On a little-endian machine the four
// output words stored in order are exactly the eight 16-bit lanes in order.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LK_HOST_DEVICE __host__ __device__
#else
#define LK_HOST_DEVICE
#endif

namespace lora_kernels {
namespace philox {

// Random123 / Triton constants.
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int kLanes = 8;          // 16-bit lanes per Philox call
constexpr uint32_t kLaneRange = 65536u;

struct Out4 {
  uint32_t v[4];
};

// High and low 32-bit words of a * b (the CUDA build may use __umulhi).
LK_HOST_DEVICE inline uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
LK_HOST_DEVICE inline Out4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                         uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    uint32_t hi_b, hi_a;
    const uint32_t lo_b = mulhilo32(kRoundB, c2, &hi_b);
    const uint32_t lo_a = mulhilo32(kRoundA, c0, &hi_a);
    const uint32_t n0 = hi_b ^ c1 ^ k0;
    const uint32_t n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  Out4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// The four output words of the mask counter n for a 64-bit seed.
LK_HOST_DEVICE inline Out4 mask_words(uint64_t seed, uint64_t n) {
  return philox4x32_10(static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Lane l (0..7) of an output: lo(o0), hi(o0), lo(o1), ..., hi(o3).
LK_HOST_DEVICE inline uint32_t lane(const Out4& o, int l) {
  return (o.v[l >> 1] >> (16 * (l & 1))) & 0xFFFFu;
}

// Counters per row of `cols` columns, and the (counter, lane) of element (i, j).
LK_HOST_DEVICE inline int64_t words_per_row(int64_t cols) { return (cols + kLanes - 1) / kLanes; }
LK_HOST_DEVICE inline uint64_t counter_of(int64_t i, int64_t j, int64_t words) {
  return static_cast<uint64_t>(i) * static_cast<uint64_t>(words) +
         static_cast<uint64_t>(j / kLanes);
}
LK_HOST_DEVICE inline int lane_of(int64_t j) { return static_cast<int>(j % kLanes); }

// Lane values below the threshold are dropped: floor(p * 65536 + 0.5),
// clamped to [0, 65536] (p outside [0, 1] is rejected by the callers).
LK_HOST_DEVICE inline uint32_t dropout_threshold(double p) {
  const double t = floor(p * static_cast<double>(kLaneRange) + 0.5);
  if (!(t > 0.0)) return 0u;
  if (t >= static_cast<double>(kLaneRange)) return kLaneRange;
  return static_cast<uint32_t>(t);
}

// Factor applied to kept elements: 65536 / (65536 - threshold), 0 when
// everything is dropped.
LK_HOST_DEVICE inline double dropout_keep_scale(uint32_t threshold) {
  return threshold < kLaneRange
             ? static_cast<double>(kLaneRange) / static_cast<double>(kLaneRange - threshold)
             : 0.0;
}

LK_HOST_DEVICE inline bool keep(uint32_t lane_value, uint32_t threshold) {
  return lane_value >= threshold;
}

// The four output words of `count` consecutive counters n0, n0+1, ...
// stored counter after counter (= the 8 * count 16-bit lanes in lane order on
// little-endian hosts). Scalar reference loop; the CPU kernels use a SIMD
// version of it (csrc/cpu/dropout_mask.cpp) that must agree bit for bit.
inline void mask_words_range(uint64_t seed, uint64_t n0, int64_t count, uint32_t* out) {
  for (int64_t k = 0; k < count; ++k) {
    const Out4 o = mask_words(seed, n0 + static_cast<uint64_t>(k));
    out[4 * k + 0] = o.v[0];
    out[4 * k + 1] = o.v[1];
    out[4 * k + 2] = o.v[2];
    out[4 * k + 3] = o.v[3];
  }
}

}  // namespace philox
}  // namespace lora_kernels
