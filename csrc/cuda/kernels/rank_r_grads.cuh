// dS = g·Bm (tokens × R) and dB = gᵀ·S (N × R) from ONE read of g, the
// incoming gradient (tokens × N). The scaling is applied when the partials
// are summed (sum_parts).
//
// The two products reduce g over different axes, so one pass leaves one of
// them partial per block. A block owns a chunk of g's columns and a slot of
// its row blocks (slot, slot + slots, ...). For each row block it loads each
// g tile of its chunk once into shared memory and
//   * adds the tile's g·Bm into its threads' dS registers (written once per
//     row block: partial over the chunk's columns),
//   * adds the tile's gᵀ·S into its own dB rows of the slot's partial (a
//     load-add-store by the same thread in row-block order; no other block
//     touches them, no atomics).
// Partials: chunks·T·R + slots·N·R floats, kept small by plan_rank_r_grads.
#pragma once

#include "common.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t, int RB>
__global__ void __launch_bounds__(kGradsThreads)
    rank_r_grads_kernel(const RankGradsArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  constexpr int BT = grads_tile<acc_t>();     // tile rows = tile columns
  constexpr int NQ = kGradsThreads / BT;      // rank groups
  constexpr int RQ = RB / NQ;                 // ranks per thread
  constexpr int G = BT * BT / kGradsThreads;  // g elements a thread loads per tile
  constexpr int TPR = BT / G;                 // threads per tile row
  static_assert(RQ >= 1 && RB % NQ == 0, "ranks split evenly over the rank groups");
  __shared__ __align__(16) acc_t gs[BT][BT + 1];  // the g tile (padded: no bank conflicts)
  __shared__ __align__(16) acc_t Bs[BT][RB];      // Bs[c][k] = Bm[c0 + c, rank0 + k]
  __shared__ __align__(16) acc_t Ss[BT][RB];      // Ss[t][k] = S[t0 + t, rank0 + k]

  const int tid = static_cast<int>(threadIdx.x);
  const int own = tid % BT;  // the tile row (dS) and tile column (dB) this thread owns
  const int q = tid / BT;    // and its ranks q·RQ .. q·RQ + RQ of the rank block
  const int ld_row = tid / TPR, ld_col = (tid % TPR) * G;  // its part of a tile load
  const int64_t rank0 = static_cast<int64_t>(blockIdx.z) * RB;
  const int64_t slot = blockIdx.y;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.x) * a.chunk_cols;
  const int64_t c_end = lk_min<int64_t>(a.N, c_begin + a.chunk_cols);
  const bool want_ds = a.ds_parts != nullptr, want_db = a.db_parts != nullptr;
  const int64_t row_blocks = ceil_div(a.T, BT);

  for (int64_t mb = slot; mb < row_blocks; mb += a.slots) {
    const int64_t t0 = mb * BT;
    acc_t ds[RQ];
#pragma unroll
    for (int j = 0; j < RQ; ++j) ds[j] = acc_t(0);

    for (int64_t c0 = c_begin; c0 < c_end; c0 += BT) {
      __syncthreads();  // the previous tiles are consumed
      {
        const int64_t t = t0 + ld_row, c = c0 + ld_col;
        const bool in_rows = t < a.T;
        acc_t v[G];
        load_n<G>(a.g + (in_rows ? t : 0) * a.ldg + c, in_rows ? c_end - c : 0, a.g_vec, v);
#pragma unroll
        for (int l = 0; l < G; ++l) gs[ld_row][ld_col + l] = v[l];
      }
      if (want_ds) {
        for (int e = tid; e < BT * RB; e += kGradsThreads) {
          const int c = e / RB, k = e % RB;
          const int64_t gc = c0 + c, rank = rank0 + k;
          Bs[c][k] = (gc < c_end && rank < a.R) ? a.Bm[gc * a.R + rank] : acc_t(0);
        }
      }
      if (want_db && c0 == c_begin) {  // S's rows: once per row block
        for (int e = tid; e < BT * RB; e += kGradsThreads) {
          const int i = e / RB, k = e % RB;
          const int64_t t = t0 + i, rank = rank0 + k;
          Ss[i][k] = (t < a.T && rank < a.R) ? a.S[t * a.R + rank] : acc_t(0);
        }
      }
      __syncthreads();
      if (want_ds) {
        for (int c = 0; c < BT; ++c) {
          const acc_t gv = gs[own][c];
#pragma unroll
          for (int j = 0; j < RQ; ++j) ds[j] += gv * Bs[c][q * RQ + j];
        }
      }
      if (want_db) {
        acc_t db[RQ];
#pragma unroll
        for (int j = 0; j < RQ; ++j) db[j] = acc_t(0);
        for (int i = 0; i < BT; ++i) {
          const acc_t gv = gs[i][own];
#pragma unroll
          for (int j = 0; j < RQ; ++j) db[j] += gv * Ss[i][q * RQ + j];
        }
        const int64_t c = c0 + own;
        if (c < c_end) {
          acc_t* d = a.db_parts + (slot * a.N + c) * a.R;
#pragma unroll
          for (int j = 0; j < RQ; ++j) {
            const int64_t rank = rank0 + q * RQ + j;
            if (rank < a.R) d[rank] = (mb == slot) ? db[j] : d[rank] + db[j];
          }
        }
      }
    }
    if (want_ds) {
      const int64_t t = t0 + own;
      if (t < a.T) {
        acc_t* d = a.ds_parts + (static_cast<int64_t>(blockIdx.x) * a.T + t) * a.R;
#pragma unroll
        for (int j = 0; j < RQ; ++j) {
          const int64_t rank = rank0 + q * RQ + j;
          if (rank < a.R) d[rank] = ds[j];
        }
      }
    }
  }
}

template <typename scalar_t>
inline void (*rank_r_grads_kernel_for(int64_t R))(const RankGradsArgs<scalar_t>) {
  switch (rank_block(R, kGradsMaxRanks)) {
    case 8:
      return &rank_r_grads_kernel<scalar_t, 8>;
    case 16:
      return &rank_r_grads_kernel<scalar_t, 16>;
    default:
      return &rank_r_grads_kernel<scalar_t, 32>;
  }
}

}  // namespace cuda
}  // namespace lora_kernels
