// The interface between the op files (csrc/cuda/*.cpp, ATen host code) and
// the kernels (kernels/*.cuh, launched from kernels/*.cu): argument structs of
// raw pointers, sizes and strides, the launch plans (grid shapes and the
// splits that decide the size of partial-sum buffers), and the launchers.
// Plain C++: no ATen, no CUDA headers, so the host code and the emulation
// (emulation/) include it as is.
#pragma once

#include <stdint.h>

#include "../../philox.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace lora_kernels {
namespace cuda {

using Stream = CUstream_st*;

// The accumulation type of a storage type: float for half, bfloat16 and
// float, double for double (also the dtype of the tokens×r products).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

template <typename T>
LK_HOST_DEVICE inline T lk_min(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
LK_HOST_DEVICE inline T lk_max(T a, T b) {
  return a < b ? b : a;
}
LK_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return lk_max(lo, lk_min(v, hi)); }

// Whether rows of `ld` elements starting at `p` keep groups of `group`
// elements 16-byte aligned (host side; enables load_n's vector path).
template <typename scalar_t>
inline bool rows_aligned(const scalar_t* p, int64_t ld, int64_t group) {
  const int64_t bytes = group * static_cast<int64_t>(sizeof(scalar_t));
  return bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0 &&
         (ld * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
}

// Grid (x, y, z) and threads per block of one launch.
struct LaunchShape {
  int64_t gx = 1, gy = 1, gz = 1;
  int block = 256;
};

// The dropout mask of one call (lora_kernels/reference.py): element (i, j)
// of a rows × cols matrix is kept when lane j % 8 of Philox counter
// i * ceil(cols / 8) + j / 8 is >= threshold; kept elements are multiplied by
// `scale` = 65536 / (65536 - threshold). threshold == 0: no dropout.
struct MaskArgs {
  const int64_t* seed_ptr = nullptr;  // the seed in device memory, or nullptr: `seed`
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double scale = 1.0;
};

// Ranks per block of the kernels that keep one accumulator per rank.
inline int rank_block(int64_t R, int max_block) {
  const int rb = R <= 8 ? 8 : R <= 16 ? 16 : R <= 32 ? 32 : 64;
  return rb < max_block ? rb : max_block;
}

// ---------------------------------------------------------------------------
// lowrank_in (lowrank_in.cuh): S = dropout(x)·Aᵀ, tokens × R, reduced over
// the in features. One thread per token row, K split over grid.y when there
// are too few rows to fill the GPU: splits > 1 writes partials [splits][T][R]
// that sum_parts adds up (in split order).
// ---------------------------------------------------------------------------
constexpr int kInThreads = 128;  // rows per block
constexpr int kInTile = 64;      // in features per shared tile of A
constexpr int kInGroup = 16;     // x elements a thread loads at once (2 Philox calls)
constexpr int kInMaxRanks = 64;

template <typename scalar_t>
struct LowrankInArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = nullptr;  // T × K, unit column stride, row stride ldx
  int64_t ldx = 0;
  bool x_vec = false;           // rows_aligned(x, ldx, kInGroup)
  const acc_t* A = nullptr;     // R × K, contiguous
  acc_t* out = nullptr;         // [splits][T][R], contiguous (S itself when splits == 1)
  int64_t T = 0, K = 0, R = 0;
  int64_t splits = 1, tiles_per_split = 1;
  MaskArgs mask;                // the mask of x (T × K)
};

// Splits of K (whole tiles each) so that about `target_blocks` blocks run.
inline void plan_lowrank_in(int64_t T, int64_t K, int64_t R, int64_t target_blocks,
                            int64_t* splits, int64_t* tiles_per_split) {
  const int64_t tiles = lk_max<int64_t>(1, ceil_div(K, kInTile));
  const int64_t base = ceil_div(T, kInThreads) * ceil_div(R, rank_block(R, kInMaxRanks));
  const int64_t want = clamp64(ceil_div(target_blocks, lk_max<int64_t>(base, 1)), 1, tiles);
  *tiles_per_split = ceil_div(tiles, want);
  *splits = ceil_div(tiles, *tiles_per_split);
}

template <typename scalar_t>
inline LaunchShape lowrank_in_shape(const LowrankInArgs<scalar_t>& a) {
  return {ceil_div(a.T, kInThreads), a.splits, ceil_div(a.R, rank_block(a.R, kInMaxRanks)),
          kInThreads};
}

// ---------------------------------------------------------------------------
// rank_update (rank_update.cuh): out[t, c] = base(t, c) + m(t, c) · alpha ·
// Σ_k L[t, k]·Rm[c, k] over a T × N output, one 64 × 64 tile per block.
// base = out[t, c] itself (accumulate), + rows[idx[t], c] (gather),
// + bias[c]; m = the dropout mask of a T × N matrix, or 1.
// ---------------------------------------------------------------------------
constexpr int kUpdTile = 64;
constexpr int kUpdRanks = 16;  // ranks per shared step
constexpr int kUpdThreads = 256;

template <typename scalar_t, typename acc_t>
struct RankUpdateArgs {
  const acc_t* L = nullptr;  // T × R, strides (l_st, l_sk)
  int64_t l_st = 0, l_sk = 0;
  const acc_t* Rm = nullptr;  // N × R, strides (r_sn, r_sk)
  int64_t r_sn = 0, r_sk = 0;
  scalar_t* out = nullptr;  // T × N, strides (o_st, o_sn)
  int64_t o_st = 0, o_sn = 0;
  const scalar_t* bias = nullptr;  // N, or nullptr
  const scalar_t* rows = nullptr;  // gathered base rows (num_rows × N, row stride rows_ld)
  int64_t rows_ld = 0, num_rows = 0;
  const int64_t* idx = nullptr;  // T row indices into `rows`
  bool accumulate = false;       // add to out's current value (merge)
  int64_t T = 0, N = 0, R = 0;
  acc_t alpha = acc_t(1);
  MaskArgs mask;  // on the rank-R term, as a T × N matrix

  // The three matrices, each as a pointer and its two strides (host side).
  void set_L(const acc_t* p, int64_t st, int64_t sk) {
    L = p;
    l_st = st;
    l_sk = sk;
  }
  void set_Rm(const acc_t* p, int64_t sn, int64_t sk) {
    Rm = p;
    r_sn = sn;
    r_sk = sk;
  }
  void set_out(scalar_t* p, int64_t st, int64_t sn) {
    out = p;
    o_st = st;
    o_sn = sn;
  }
};

template <typename scalar_t, typename acc_t>
inline LaunchShape rank_update_shape(const RankUpdateArgs<scalar_t, acc_t>& a) {
  return {ceil_div(a.T, kUpdTile), ceil_div(a.N, kUpdTile), 1, kUpdThreads};
}

// ---------------------------------------------------------------------------
// rank_r_grads (rank_r_grads.cuh): from one read of g (T × N),
//   dS partials [chunks][T][R]:  Σ over the chunk's columns of g·Bm
//   dB partials [slots][N][R]:   Σ over the slot's rows of gᵀ·S
// Grid: x = column chunks, y = row slots, z = rank blocks. A block walks
// its slot's row blocks (slot, slot + slots, ...) over its chunk's column
// tiles; each (chunk, slot) pair owns its dB rows, so partials are summed
// with loads and stores in a fixed order, never atomics.
// ---------------------------------------------------------------------------
constexpr int kGradsThreads = 256;
constexpr int kGradsMaxRanks = 32;
// Tile rows (= tile columns): 64, or 32 for double (shared memory).
template <typename acc_t>
constexpr int grads_tile() {
  return sizeof(acc_t) == 8 ? 32 : 64;
}

template <typename scalar_t>
struct RankGradsArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* g = nullptr;  // T × N, unit column stride, row stride ldg
  int64_t ldg = 0;
  bool g_vec = false;           // rows_aligned(g, ldg, tile elements per thread)
  const acc_t* Bm = nullptr;    // N × R, contiguous (for dS)
  const acc_t* S = nullptr;     // T × R, contiguous (for dB)
  acc_t* ds_parts = nullptr;    // [chunks][T][R], or nullptr when dS is not wanted
  acc_t* db_parts = nullptr;    // [slots][N][R], or nullptr when dB is not wanted
  int64_t T = 0, N = 0, R = 0;
  int64_t chunks = 1, chunk_cols = 0, slots = 1;
};

// chunks × slots ≈ target_blocks / rank blocks, shaped so that the partials
// (chunks·T·R + slots·N·R) are small: chunks ≈ sqrt(blocks · N / T).
inline void plan_rank_r_grads(int64_t T, int64_t N, int64_t R, int tile, int64_t target_blocks,
                              int64_t* chunks, int64_t* chunk_cols, int64_t* slots) {
  const int64_t row_blocks = ceil_div(T, tile);
  const int64_t col_tiles = ceil_div(N, tile);
  const int64_t programs =
      lk_max<int64_t>(1, target_blocks / ceil_div(R, rank_block(R, kGradsMaxRanks)));
  const double ratio = static_cast<double>(programs) * static_cast<double>(N) /
                       static_cast<double>(lk_max<int64_t>(T, 1));
  const int64_t want = clamp64(static_cast<int64_t>(sqrt(ratio) + 0.5), 1, col_tiles);
  const int64_t tiles_per_chunk = ceil_div(col_tiles, want);
  *chunk_cols = tiles_per_chunk * tile;
  *chunks = ceil_div(col_tiles, tiles_per_chunk);
  *slots = clamp64(programs / *chunks, 1, row_blocks);
}

template <typename scalar_t>
inline LaunchShape rank_r_grads_shape(const RankGradsArgs<scalar_t>& a) {
  return {a.chunks, a.slots, ceil_div(a.R, rank_block(a.R, kGradsMaxRanks)), kGradsThreads};
}

// ---------------------------------------------------------------------------
// lowrank_da (lowrank_da.cuh): dA partials [splits][R][K] =
// Σ over a split's rows of dSᵀ·(x ⊙ mask), the mask applied as x is loaded.
// Grid: x = column blocks of x, y = row splits, z = rank blocks.
// ---------------------------------------------------------------------------
constexpr int kDaThreads = 256;
constexpr int kDaMaxRanks = 32;
template <typename acc_t>
constexpr int da_tile() {
  return sizeof(acc_t) == 8 ? 32 : 64;
}

template <typename scalar_t>
struct LowrankDaArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = nullptr;  // T × K, unit column stride, row stride ldx
  int64_t ldx = 0;
  bool x_vec = false;
  const acc_t* dS = nullptr;  // T × R, contiguous
  acc_t* parts = nullptr;     // [splits][R][K], contiguous
  int64_t T = 0, K = 0, R = 0;
  int64_t splits = 1, rows_per_split = 0;  // rows_per_split: a multiple of the tile
  MaskArgs mask;                           // the mask of x (T × K)
};

inline void plan_lowrank_da(int64_t T, int64_t K, int64_t R, int tile, int64_t target_blocks,
                            int64_t* splits, int64_t* rows_per_split) {
  const int64_t row_blocks = lk_max<int64_t>(1, ceil_div(T, tile));
  const int64_t base = ceil_div(K, tile) * ceil_div(R, rank_block(R, kDaMaxRanks));
  const int64_t want = clamp64(ceil_div(target_blocks, lk_max<int64_t>(base, 1)), 1, row_blocks);
  *rows_per_split = ceil_div(row_blocks, want) * tile;
  *splits = lk_max<int64_t>(1, ceil_div(T, *rows_per_split));
}

template <typename scalar_t>
inline LaunchShape lowrank_da_shape(const LowrankDaArgs<scalar_t>& a) {
  return {ceil_div(a.K, da_tile<acc_type<scalar_t>>()), a.splits,
          ceil_div(a.R, rank_block(a.R, kDaMaxRanks)), kDaThreads};
}

// ---------------------------------------------------------------------------
// dropout (dropout.cuh): out = x · mask, one thread per Philox counter (8
// elements), grid-stride.
// ---------------------------------------------------------------------------
constexpr int kDropThreads = 256;
constexpr int64_t kDropMaxBlocks = 65536;

template <typename scalar_t>
struct DropoutArgs {
  const scalar_t* x = nullptr;  // rows × cols, contiguous
  scalar_t* out = nullptr;      // rows × cols, contiguous
  int64_t rows = 0, cols = 0;
  bool vec = false;             // cols % 8 == 0 and both pointers 16-byte aligned
  MaskArgs mask;
  scalar_t keep = scalar_t(1);  // the keep scale rounded to scalar_t, as the reference does
};

template <typename scalar_t>
inline LaunchShape dropout_shape(const DropoutArgs<scalar_t>& a) {
  const int64_t counters = a.rows * philox::words_per_row(a.cols);
  return {clamp64(ceil_div(counters, kDropThreads), 1, kDropMaxBlocks), 1, 1, kDropThreads};
}

// ---------------------------------------------------------------------------
// sum_parts (sum_parts.cuh): out[r, c] = alpha · Σ_p parts[p, r, c], p in
// order (deterministic), converted to out_t.
// ---------------------------------------------------------------------------
constexpr int kSumThreads = 256;
constexpr int64_t kSumMaxBlocks = 65536;

template <typename acc_t, typename out_t>
struct SumPartsArgs {
  const acc_t* parts = nullptr;  // [n][rows][cols], contiguous
  int64_t n = 1, rows = 0, cols = 0;
  acc_t alpha = acc_t(1);
  out_t* out = nullptr;  // rows × cols, row stride out_ld
  int64_t out_ld = 0;
};

template <typename acc_t, typename out_t>
inline LaunchShape sum_parts_shape(const SumPartsArgs<acc_t, out_t>& a) {
  return {clamp64(ceil_div(a.rows * a.cols, kSumThreads), 1, kSumMaxBlocks), 1, 1, kSumThreads};
}

// ---------------------------------------------------------------------------
// Launchers (kernels/*.cu): launch on `stream`, check the launch. Defined for
// scalar_t in {c10::Half, c10::BFloat16, float, double}; rank_update also
// for (W dtype, double) pairs (merge_ of a half/float W with fp64 factors,
// or of an fp64 W with fp32 factors).
// ---------------------------------------------------------------------------
template <typename scalar_t>
void launch_lowrank_in(const LowrankInArgs<scalar_t>& a, Stream stream);
template <typename scalar_t, typename acc_t>
void launch_rank_update(const RankUpdateArgs<scalar_t, acc_t>& a, Stream stream);
template <typename scalar_t>
void launch_rank_r_grads(const RankGradsArgs<scalar_t>& a, Stream stream);
template <typename scalar_t>
void launch_lowrank_da(const LowrankDaArgs<scalar_t>& a, Stream stream);
template <typename scalar_t>
void launch_dropout(const DropoutArgs<scalar_t>& a, Stream stream);
template <typename acc_t, typename out_t>
void launch_sum_parts(const SumPartsArgs<acc_t, out_t>& a, Stream stream);

// Whether the kernels of this build run on the current GPU (kernels/arch.cu).
bool kernels_run_on_current_device();

}  // namespace cuda
}  // namespace lora_kernels
