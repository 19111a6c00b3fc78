// Device building blocks shared by the CUDA kernels: the dropout mask of 8
// columns and row loads of N elements (vectorised when aligned).
//
// Nothing here (or in the other kernels/*.cuh headers) includes ATen: the
// kernels see raw pointers, sizes and strides, and the launchers in
// kernels/*.cu are plain functions the op files (csrc/cuda/*.cpp) call. The
// same headers also compile as host C++ under LK_CUDA_EMULATION
// (emulation/cuda_emulation.h), where each CUDA thread of a block is a host
// thread: tests/test_cuda_build.py runs the kernels that way on machines
// without a GPU, against the reference.
#pragma once

#include <stdint.h>
#include <string.h>

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT (checked even with NDEBUG)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../../philox.h"
#include "launch.h"

#ifdef LK_CUDA_EMULATION
#include "../emulation/cuda_emulation.h"
#endif

#define LK_DEVICE __device__ __forceinline__

namespace lora_kernels {
namespace cuda {

LK_DEVICE bool mask_active(const MaskArgs& m) { return m.threshold > 0; }

LK_DEVICE uint64_t mask_seed(const MaskArgs& m) {
  return m.seed_ptr != nullptr ? static_cast<uint64_t>(*m.seed_ptr) : m.seed;
}

// Bit l (0..7) set: element (i, j0 + l) is kept. j0 is a multiple of 8, so
// the 8 columns are exactly the lanes of one Philox call.
LK_DEVICE uint32_t keep_bits8(uint64_t seed, int64_t i, int64_t j0, int64_t words,
                              uint32_t threshold) {
  const philox::Out4 o = philox::mask_words(seed, philox::counter_of(i, j0, words));
  uint32_t bits = 0;
#pragma unroll
  for (int l = 0; l < philox::kLanes; ++l)
    bits |= (philox::lane(o, l) >= threshold ? 1u : 0u) << l;
  return bits;
}

// v[l] *= (kept ? scale : 0) for the N columns j0 .. j0 + N of row i, N a
// multiple of 8, or 4 with j0 % 8 in {0, 4} (then half of one call is used).
// Dropped values are multiplied by 0, as the reference does (NaN stays NaN).
template <int N, typename acc_t>
LK_DEVICE void apply_mask(acc_t (&v)[N], uint64_t seed, int64_t i, int64_t j0, int64_t words,
                          uint32_t threshold, acc_t scale) {
  static_assert(N % 8 == 0 || N == 4, "mask groups are 8 columns, or half of 8");
  const acc_t zero = acc_t(0);
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int c = 0; c < N; c += 8) {
      const uint32_t bits = keep_bits8(seed, i, j0 + c, words, threshold);
#pragma unroll
      for (int l = 0; l < 8; ++l) v[c + l] = v[c + l] * (((bits >> l) & 1u) ? scale : zero);
    }
  } else {
    const int64_t base = j0 & ~int64_t(7);
    const uint32_t bits = keep_bits8(seed, i, base, words, threshold) >> (j0 - base);
#pragma unroll
    for (int l = 0; l < N; ++l) v[l] = v[l] * (((bits >> l) & 1u) ? scale : zero);
  }
}

// 16 bytes: the unit of a vectorised global load.
struct alignas(16) Pack16 {
  uint32_t w[4];
};

// out[l] = p[l] for l < min(valid, N) (converted to acc_t), 0 beyond. With
// `vec` (p 16-byte aligned, set by the caller) and a whole group, the group
// is read with 16-byte loads.
template <int N, typename scalar_t, typename acc_t>
LK_DEVICE void load_n(const scalar_t* p, int64_t valid, bool vec, acc_t (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(scalar_t));
  if constexpr (kBytes % 16 == 0) {
    if (vec && valid >= N) {
      constexpr int kPacks = kBytes / 16;
      Pack16 packs[kPacks];
      const Pack16* src = reinterpret_cast<const Pack16*>(p);
#pragma unroll
      for (int q = 0; q < kPacks; ++q) packs[q] = src[q];
      scalar_t vals[N];
      memcpy(vals, packs, sizeof(vals));
#pragma unroll
      for (int l = 0; l < N; ++l) out[l] = static_cast<acc_t>(vals[l]);
      return;
    }
  }
#pragma unroll
  for (int l = 0; l < N; ++l) out[l] = l < valid ? static_cast<acc_t>(p[l]) : acc_t(0);
}

}  // namespace cuda
}  // namespace lora_kernels
