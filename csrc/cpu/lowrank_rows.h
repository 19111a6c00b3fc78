// The row kernel of the embedding forward for float32 (lowrank_rows.cpp):
// y = gathered rows of W + s·Btᵀ in one pass over each row while it is in
// registers, written for AVX-512. Gathering the rows and then running ATen's
// GEMM on the block (one dimension is the rank, 4 to 64) costs a second pass
// and a GEMM that is slow on this shape.
//
// The result depends only on the arguments (fixed summation order), never on
// the thread that runs it. Callers use it only when lowrank_rows_available()
// and fall back to the GEMM path otherwise.
#pragma once

#include <cstdint>

namespace lora_kernels {
namespace cpu {

// True when the CPU has AVX-512F and LORA_KERNELS_CPU_SIMD is not "0" (the
// variable is read on each call, so tests can compare both paths).
bool lowrank_rows_available();

// y[t, :] = src(t)[:] + Σ_k s[t, k] · Bt[k, :] for t < n, where src(t) is row
// rows[t] of `base` (row stride ld_base), or row t of it when rows is null.
// s: n × r (row stride ld_s), Bt: r × dim (row stride ld_bt). y may be base
// with rows null (an in-place add). Everything float32.
void rows_plus_lowrank(float* y, int64_t ld_y, const float* base, int64_t ld_base,
                       const int64_t* rows, int64_t n, int64_t dim, const float* s,
                       int64_t ld_s, const float* Bt, int64_t ld_bt, int64_t r);

}  // namespace cpu
}  // namespace lora_kernels
