// S = dropout(x)·Aᵀ (tokens × R): the low-rank input of the forward, one
// pass over x with the mask regenerated from Philox as x is loaded.
//
// One thread per row of x: it reads its row in groups of 16 elements (two
// Philox calls, 16-byte loads when aligned), drops and scales them in
// registers and accumulates RB ranks at once against a shared tile of A
// (kInTile in features × RB ranks, every thread reading the same element:
// a broadcast). The mask never exists in memory and x is read exactly once
// per rank block (R ≤ 64: once). When the rows alone cannot fill the GPU,
// grid.y splits the in features and each split writes its own partial
// (plan_lowrank_in), summed afterwards in split order: deterministic.
#pragma once

#include "common.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t, int RB>
__global__ void __launch_bounds__(kInThreads)
    lowrank_in_kernel(const LowrankInArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  __shared__ __align__(16) acc_t As[kInTile][RB];  // As[k][rank] = A[rank0 + rank, k0 + k]

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kInThreads + tid;
  const bool live = row < a.T;
  const int64_t rank0 = static_cast<int64_t>(blockIdx.z) * RB;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * a.tiles_per_split * kInTile;
  const int64_t k_end = lk_min<int64_t>(a.K, k_begin + a.tiles_per_split * kInTile);
  const bool drop = mask_active(a.mask);
  const uint64_t seed = drop ? mask_seed(a.mask) : 0;
  const acc_t scale = static_cast<acc_t>(a.mask.scale);
  const int64_t words = philox::words_per_row(a.K);
  const scalar_t* xr = a.x + (live ? row : 0) * a.ldx;

  acc_t acc[RB];
#pragma unroll
  for (int rr = 0; rr < RB; ++rr) acc[rr] = acc_t(0);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kInTile) {
    __syncthreads();  // the previous tile of A is consumed
    for (int e = tid; e < kInTile * RB; e += kInThreads) {
      const int rr = e / kInTile, kk = e % kInTile;  // consecutive threads: consecutive k
      const int64_t rank = rank0 + rr, col = k0 + kk;
      As[kk][rr] = (rank < a.R && col < a.K) ? a.A[rank * a.K + col] : acc_t(0);
    }
    __syncthreads();
    if (!live) continue;
    for (int g0 = 0; g0 < kInTile; g0 += kInGroup) {
      const int64_t col0 = k0 + g0;
      if (col0 >= k_end) break;
      acc_t v[kInGroup];
      load_n<kInGroup>(xr + col0, a.K - col0, a.x_vec, v);
      if (drop) apply_mask<kInGroup>(v, seed, row, col0, words, a.mask.threshold, scale);
#pragma unroll
      for (int kk = 0; kk < kInGroup; ++kk) {
#pragma unroll
        for (int rr = 0; rr < RB; ++rr) acc[rr] += v[kk] * As[g0 + kk][rr];
      }
    }
  }
  if (!live) return;
  acc_t* o = a.out + (static_cast<int64_t>(blockIdx.y) * a.T + row) * a.R;
#pragma unroll
  for (int rr = 0; rr < RB; ++rr)
    if (rank0 + rr < a.R) o[rank0 + rr] = acc[rr];
}

// The instantiation for the rank block of R (rank_block(R, kInMaxRanks)).
template <typename scalar_t>
inline void (*lowrank_in_kernel_for(int64_t R))(const LowrankInArgs<scalar_t>) {
  switch (rank_block(R, kInMaxRanks)) {
    case 8:
      return &lowrank_in_kernel<scalar_t, 8>;
    case 16:
      return &lowrank_in_kernel<scalar_t, 16>;
    case 32:
      return &lowrank_in_kernel<scalar_t, 32>;
    default:
      return &lowrank_in_kernel<scalar_t, 64>;
  }
}

}  // namespace cuda
}  // namespace lora_kernels
