// Row kernels of the embedding's low-rank branch for float32, for AVX-512
// and for AVX2: the forward's gather + rank-r update (lowrank_rows.cpp) and
// the backward's dS/dB from one read of g (lowrank_grads.cpp). Gathering rows and
// then running ATen's GEMMs on the block (one dimension is the rank, 4 to 64)
// costs extra passes, and those GEMMs are slow on these shapes.
//
// Each result depends only on the arguments (fixed summation order), never on
// the thread that runs it (the AVX-512 and AVX2 variants may differ in the
// last bits: their sums are grouped differently). Callers use them only when
// lowrank_rows_available() and fall back to the GEMM path otherwise.
#pragma once

#include <cstdint>

namespace lora_kernels {
namespace cpu {

// True when the CPU has AVX2 and FMA (or AVX-512F: that variant then runs),
// LORA_KERNELS_CPU_ISA does not cap the level at "scalar", and
// LORA_KERNELS_CPU_SIMD is not "0" (read on each call, so tests can compare
// the row kernels with the GEMM path).
bool lowrank_rows_available();

// y[t, :] = src(t)[:] + Σ_k s[t, k] · Bt[k, :] for t < n, where src(t) is row
// rows[t] of `base` (row stride ld_base), or row t of it when rows is null.
// s: n × r (row stride ld_s), Bt: r × dim (row stride ld_bt), r ≥ 1. y may
// be base with rows null (an in-place add). Everything float32.
void rows_plus_lowrank(float* y, int64_t ld_y, const float* base, int64_t ld_base,
                       const int64_t* rows, int64_t n, int64_t dim, const float* s,
                       int64_t ld_s, const float* Bt, int64_t ld_bt, int64_t r);

// The packed column-block layout of lowrank_grads_rows' r × dim operands:
// block b = [b·kPackCols, (b+1)·kPackCols) holds its r rows contiguously
// ([r][kPackCols], zero padded past dim), so element (k, j) is at
// packed_index(r, k, j).
constexpr int64_t kPackCols = 128;
inline int64_t packed_size(int64_t r, int64_t dim) {
  return (dim + kPackCols - 1) / kPackCols * r * kPackCols;
}
inline int64_t packed_index(int64_t r, int64_t k, int64_t j) {
  return (j / kPackCols * r + k) * kPackCols + j % kPackCols;
}

// For the n rows of g (n × dim, row stride ld_g, unit column stride):
//   dS[t, k] = Σ_j g[t, j] · Bs[k, j]           (dS: n × r, row stride ld_ds)
//   part[k, j] += Σ_t s[t, k] · g[t, j]          (rows t in order)
// Bs and part are r × dim in the packed layout above (padding of Bs zero);
// s is n × r (row stride ld_s). Either output may be null (not computed).
void lowrank_grads_rows(const float* g, int64_t ld_g, int64_t n, int64_t dim, int64_t r,
                        const float* Bs_packed, const float* s, int64_t ld_s, float* dS,
                        int64_t ld_ds, float* part_packed);

}  // namespace cpu
}  // namespace lora_kernels
