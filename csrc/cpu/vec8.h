// The AVX2 row kernels' vector type (lowrank_rows.cpp, lowrank_grads.cpp):
// 8 floats as a GCC vector type, compiled to ymm registers by the AVX2 + FMA
// target attribute of the functions that use it (the helpers carry it too,
// so no 32-byte vector crosses a function without AVX: the -Wpsabi case).
// x86-64 with GCC or Clang only: include it where the x86 kernels are built.
#pragma once

#define LK_AVX2 __attribute__((target("avx2,fma")))
#define LK_AVX2_INLINE inline __attribute__((always_inline, target("avx2,fma")))

namespace lora_kernels {
namespace cpu {
namespace {

using V8 __attribute__((vector_size(32), aligned(4))) = float;  // unaligned loads

LK_AVX2_INLINE V8 load8(const float* p) { return *reinterpret_cast<const V8*>(p); }

LK_AVX2_INLINE void store8(float* p, V8 v) { *reinterpret_cast<V8*>(p) = v; }

// The lanes of v added as a tree (halves onto halves, a fixed order).
LK_AVX2_INLINE float lane_sum(V8 v) {
  float t[8];
#pragma GCC unroll 8
  for (int l = 0; l < 8; ++l) t[l] = v[l];
#pragma GCC unroll 4
  for (int half = 4; half >= 1; half /= 2)
#pragma GCC unroll 4
    for (int l = 0; l < half; ++l) t[l] += t[l + half];
  return t[0];
}

}  // namespace
}  // namespace cpu
}  // namespace lora_kernels
