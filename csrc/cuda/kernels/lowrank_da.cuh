// dA = dSᵀ·(x ⊙ m) (R × in), reduced over the tokens, with the dropout mask
// regenerated and applied as x is loaded (never stored, never loaded).
//
// A block owns a column block of x and a split of its rows; per tile of
// rows it loads the x tile (masked, in the accumulation type) and the
// matching dS rows into shared memory, and each thread accumulates its
// column's RQ ranks in registers. Splits write partials [splits][R][in],
// summed afterwards in split order (plan_lowrank_da): deterministic.
#pragma once

#include "common.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t, int RB>
__global__ void __launch_bounds__(kDaThreads) lowrank_da_kernel(const LowrankDaArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  constexpr int BT = da_tile<acc_t>();     // tile rows = tile columns
  constexpr int NQ = kDaThreads / BT;      // rank groups
  constexpr int RQ = RB / NQ;              // ranks per thread
  constexpr int G = BT * BT / kDaThreads;  // x elements a thread loads per tile (16 or 4)
  constexpr int TPR = BT / G;              // threads per tile row
  static_assert(RQ >= 1 && RB % NQ == 0, "ranks split evenly over the rank groups");
  __shared__ __align__(16) acc_t xs[BT][BT + 1];  // the masked x tile (padded)
  __shared__ __align__(16) acc_t dss[BT][RB];     // dss[t][k] = dS[t0 + t, rank0 + k]

  const int tid = static_cast<int>(threadIdx.x);
  const int own = tid % BT;  // the column this thread accumulates
  const int q = tid / BT;    // and its ranks q·RQ .. q·RQ + RQ of the rank block
  const int ld_row = tid / TPR, ld_col = (tid % TPR) * G;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BT;
  const int64_t split = blockIdx.y;
  const int64_t rank0 = static_cast<int64_t>(blockIdx.z) * RB;
  const int64_t t_begin = split * a.rows_per_split;
  const int64_t t_end = lk_min<int64_t>(a.T, t_begin + a.rows_per_split);
  const bool drop = mask_active(a.mask);
  const uint64_t seed = drop ? mask_seed(a.mask) : 0;
  const acc_t scale = static_cast<acc_t>(a.mask.scale);
  const int64_t words = philox::words_per_row(a.K);

  acc_t acc[RQ];
#pragma unroll
  for (int j = 0; j < RQ; ++j) acc[j] = acc_t(0);

  for (int64_t t0 = t_begin; t0 < t_end; t0 += BT) {
    __syncthreads();  // the previous tiles are consumed
    {
      const int64_t t = t0 + ld_row, c = j0 + ld_col;
      const bool in_rows = t < t_end;
      acc_t v[G];
      load_n<G>(a.x + (in_rows ? t : 0) * a.ldx + c, in_rows ? a.K - c : 0, a.x_vec, v);
      if (drop && in_rows && c < a.K)
        apply_mask<G>(v, seed, t, c, words, a.mask.threshold, scale);
#pragma unroll
      for (int l = 0; l < G; ++l) xs[ld_row][ld_col + l] = v[l];
    }
    for (int e = tid; e < BT * RB; e += kDaThreads) {
      const int i = e / RB, k = e % RB;
      const int64_t t = t0 + i, rank = rank0 + k;
      dss[i][k] = (t < t_end && rank < a.R) ? a.dS[t * a.R + rank] : acc_t(0);
    }
    __syncthreads();
    for (int i = 0; i < BT; ++i) {
      const acc_t xv = xs[i][own];
#pragma unroll
      for (int j = 0; j < RQ; ++j) acc[j] += dss[i][q * RQ + j] * xv;
    }
  }

  const int64_t col = j0 + own;
  if (col >= a.K) return;
#pragma unroll
  for (int j = 0; j < RQ; ++j) {
    const int64_t rank = rank0 + q * RQ + j;
    if (rank < a.R) a.parts[(split * a.R + rank) * a.K + col] = acc[j];
  }
}

template <typename scalar_t>
inline void (*lowrank_da_kernel_for(int64_t R))(const LowrankDaArgs<scalar_t>) {
  switch (rank_block(R, kDaMaxRanks)) {
    case 8:
      return &lowrank_da_kernel<scalar_t, 8>;
    case 16:
      return &lowrank_da_kernel<scalar_t, 16>;
    default:
      return &lowrank_da_kernel<scalar_t, 32>;
  }
}

}  // namespace cuda
}  // namespace lora_kernels
