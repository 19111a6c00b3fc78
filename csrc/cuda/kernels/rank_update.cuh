// out = base + m ⊙ (alpha · L·Rmᵀ): the rank-R update written into a T × N
// output in one pass, L (T × R) and Rm (N × R) tiny next to it.
//
//   forward   y  = bias + scaling · S·B_fullᵀ       (then cuBLAS adds x·Wᵀ)
//   backward  dx = m ⊙ (dS·A) · keep_scale           (then cuBLAS adds g·W)
//   embedding y  = W[idx] + scaling · s·Bᵀ
//   merge_    W  = W + scaling · B_full·A            (in place)
//
// Each block owns a 64 × 64 tile of the output and each thread a 4 × 4
// patch of it, accumulated in registers over the ranks in steps of 16 (L's
// and Rm's slices in shared memory); every output element is read at most
// once (the base) and written once, by one thread, so in-place updates are
// safe. The mask of the tile (one Philox call per 8 columns) is computed
// once into shared memory as bits.
#pragma once

#include "common.cuh"

namespace lora_kernels {
namespace cuda {

// tile[k][i] = M[(i0 + i)·s_i + (k0 + k)·s_k] for i < kTile, k < kUpdRanks
// (0 outside the n × R matrix). Threads walk M's unit-stride dimension.
template <int kTile, typename acc_t>
LK_DEVICE void load_rank_tile(acc_t (*tile)[kTile], const acc_t* M, int64_t s_i, int64_t s_k,
                              int64_t i0, int64_t n, int64_t k0, int64_t R) {
  const bool i_fast = s_i == 1 && s_k != 1;
  for (int e = static_cast<int>(threadIdx.x); e < kUpdRanks * kTile;
       e += static_cast<int>(blockDim.x)) {
    const int i = i_fast ? e % kTile : e / kUpdRanks;
    const int k = i_fast ? e / kTile : e % kUpdRanks;
    const int64_t gi = i0 + i, gk = k0 + k;
    tile[k][i] = (gi < n && gk < R) ? M[gi * s_i + gk * s_k] : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kUpdThreads)
    rank_update_kernel(const RankUpdateArgs<scalar_t, acc_t> a) {
  constexpr int P = 4;  // patch: P rows × P columns per thread
  static_assert(kUpdThreads * P * P == kUpdTile * kUpdTile, "threads cover the tile");
  __shared__ __align__(16) acc_t Ls[kUpdRanks][kUpdTile];  // Ls[k][t] = L[t0 + t, k0 + k]
  __shared__ __align__(16) acc_t Rs[kUpdRanks][kUpdTile];  // Rs[k][c] = Rm[c0 + c, k0 + k]
  __shared__ uint8_t keep[kUpdTile][kUpdTile / 8];         // mask bits of the tile

  const int tid = static_cast<int>(threadIdx.x);
  const int ty = tid / (kUpdTile / P), tx = tid % (kUpdTile / P);
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kUpdTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kUpdTile;
  const bool drop = mask_active(a.mask);

  if (drop) {  // one Philox call per (row, 8 columns) of the tile
    const uint64_t seed = mask_seed(a.mask);
    const int64_t words = philox::words_per_row(a.N);
    for (int e = tid; e < kUpdTile * (kUpdTile / 8); e += kUpdThreads) {
      const int i = e / (kUpdTile / 8), w = e % (kUpdTile / 8);
      const int64_t t = t0 + i, c = c0 + 8 * w;
      keep[i][w] = (t < a.T && c < a.N)
                       ? static_cast<uint8_t>(keep_bits8(seed, t, c, words, a.mask.threshold))
                       : uint8_t(0);
    }
  }

  acc_t acc[P][P];
#pragma unroll
  for (int i = 0; i < P; ++i)
#pragma unroll
    for (int j = 0; j < P; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < a.R; k0 += kUpdRanks) {
    __syncthreads();  // the previous slices are consumed
    load_rank_tile<kUpdTile>(Ls, a.L, a.l_st, a.l_sk, t0, a.T, k0, a.R);
    load_rank_tile<kUpdTile>(Rs, a.Rm, a.r_sn, a.r_sk, c0, a.N, k0, a.R);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kUpdRanks; ++k) {
      acc_t l[P], r[P];
#pragma unroll
      for (int i = 0; i < P; ++i) l[i] = Ls[k][ty * P + i];
#pragma unroll
      for (int j = 0; j < P; ++j) r[j] = Rs[k][tx * P + j];
#pragma unroll
      for (int i = 0; i < P; ++i)
#pragma unroll
        for (int j = 0; j < P; ++j) acc[i][j] += l[i] * r[j];
    }
  }
  __syncthreads();  // the mask bits are written (also when R == 0)

  const acc_t scale = static_cast<acc_t>(a.mask.scale);
#pragma unroll
  for (int i = 0; i < P; ++i) {
    const int ti = ty * P + i;
    const int64_t t = t0 + ti;
    if (t >= a.T) continue;
    const scalar_t* base_row = nullptr;
    if (a.rows != nullptr) {
      const int64_t r = a.idx[t];
      CUDA_KERNEL_ASSERT(r >= 0 && r < a.num_rows);
      base_row = a.rows + r * a.rows_ld;
    }
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int cj = tx * P + j;
      const int64_t c = c0 + cj;
      if (c >= a.N) continue;
      acc_t v = a.alpha * acc[i][j];
      if (drop) v = v * (((keep[ti][cj >> 3] >> (cj & 7)) & 1) ? scale : acc_t(0));
      scalar_t* o = a.out + t * a.o_st + c * a.o_sn;
      acc_t b = a.accumulate ? static_cast<acc_t>(*o) : acc_t(0);
      if (base_row != nullptr) b += static_cast<acc_t>(base_row[c]);
      if (a.bias != nullptr) b += static_cast<acc_t>(a.bias[c]);
      *o = static_cast<scalar_t>(b + v);
    }
  }
}

}  // namespace cuda
}  // namespace lora_kernels
