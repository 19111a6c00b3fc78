// dropped_linear / dropped_linear_bwd_ on the CPU: the frozen GEMM over the
// entries dropout drops, and only those (csrc/dropped_linear.cpp has the
// contract and the math).
//
// With dropout p, a fraction p of x's entries is dropped, so
// ((1 − D) ⊙ x)·Wᵀ is a sparse-dense product: p·tokens·in·out multiply-adds
// instead of a GEMM's tokens·in·out (DoRA at p = 0.05 gets x̂·Wᵀ from x·Wᵀ
// for 5% of a GEMM's arithmetic). The plan, for both directions:
//   1. the dropped positions of each row, from the Philox mask (regenerated
//      from the seed: nothing is stored between forward and backward), as
//      compressed rows (column, and for the forward x's value), built per
//      block of kRowBlock rows in parallel;
//   2. W in blocks of kCols output features, the tasks of the parallel loop:
//      each task transposes its block into a (in × kCols) buffer of its own,
//      so the kCols weights an entry meets are one contiguous run of cache
//      lines, in that core's caches;
//   3. per row, over the block's k-tiles (sweep_rows):
//        forward:  acc[0:kCols] += x[n,k] · Wt[k, 0:kCols] for each dropped k
//                  (kCols accumulators in registers; each output row segment
//                  is written once);
//        backward: part[e] += grad[n, block] · Wt[k, block] for each dropped
//                  (n, k) = entry e (a dot of kCols), blocks in groups with
//                  partials of their own, added in group order.
// Every sum runs in a fixed order that does not depend on the thread count,
// so neither do the results.
//
// Memory: the compressed rows (p·tokens·in entries of 4 + sizeof(T) bytes);
// per thread, a transposed weight block (in × kCols) and one sweep's
// accumulators; for the backward, kBwdGroups partial sums per dropped entry. float32 and float64; other dtypes take the dense form
// (dropped_linear.h).
#include <torch/library.h>

#include "../below_autograd.h"
#include "../dropped_linear.h"
#include "common.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kFwdOp = "dropped_linear";
constexpr const char* kBwdOp = "dropped_linear_bwd_";

// Output features per weight block: 64 floats / 32 doubles (256 bytes, four
// cache lines, per dropped entry).
template <typename T>
constexpr int kCols = 256 / static_cast<int>(sizeof(T));

// Rows of Wt per k-tile: 128 KiB of it (kCols · sizeof(T) = 256 bytes a
// row), which stays in L2 while a row block's entries in the tile read it.
constexpr int64_t kTileK = 512;

// Row blocks that sweep the k-tiles together: a tile, once in L2, serves
// kSweep · kRowBlock rows (their accumulators, kSweep · 32 KiB, stream).
constexpr int64_t kSweep = 8;

// The dropped entries of a rows × cols matrix, per block of kRowBlock rows:
// row_ptr (rows of the block + 1, offsets into col/val), col, and the
// matrix's value at each (forward only).
template <typename T>
struct DroppedRows {
  std::vector<std::vector<int64_t>> row_ptr;
  std::vector<std::vector<int32_t>> col;
  std::vector<std::vector<T>> val;
};

template <typename T>
DroppedRows<T> dropped_rows(const MaskParams& mask, int64_t rows, int64_t cols, const T* xp,
                            bool values) {
  const int64_t blocks = num_row_blocks(rows);
  DroppedRows<T> d;
  d.row_ptr.resize(blocks);
  d.col.resize(blocks);
  d.val.resize(blocks);
  // threshold 65536 (p = 1): every lane is below it
  const uint32_t thr = mask.threshold;
  const int64_t lane_ld = lane_stride(cols);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    auto lanes = scratch<uint16_t>(kRowBlock * lane_ld);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, n = std::min(kRowBlock, rows - r0);
      mask_lanes(mask, r0, n, cols, lanes.get());
      auto& rp = d.row_ptr[b];
      auto& col = d.col[b];
      auto& val = d.val[b];
      rp.assign(static_cast<size_t>(n + 1), 0);
      const size_t expect = static_cast<size_t>(
          static_cast<double>(n * cols) * (static_cast<double>(thr) / 65536.0) * 1.1 + 64);
      col.reserve(expect);
      if (values) val.reserve(expect);
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t* lr = lanes.get() + i * lane_ld;
        const T* xr = values ? xp + (r0 + i) * cols : nullptr;
        for (int64_t j = 0; j < cols; ++j) {
          if (static_cast<uint32_t>(lr[j]) < thr) {
            col.push_back(static_cast<int32_t>(j));
            if (values) val.push_back(xr[j]);
          }
        }
        rp[i + 1] = static_cast<int64_t>(col.size());
      }
    }
  });
  return d;
}

// Wt (in × C, contiguous) = W[o0 : o0 + w, :]ᵀ for W (out × in) with strides
// (ws0, ws1), zero past column w. Run by the task that reads it, so the
// block lands in that core's caches.
template <typename T, int C>
void transpose_block(const T* wp, int64_t ws0, int64_t ws1, int64_t o0, int64_t w, int64_t in,
                     T* wt) {
  if (ws0 == 1) {  // W stored (in, out): each k's run of features is contiguous
    for (int64_t k = 0; k < in; ++k) {
      const T* src = wp + o0 + k * ws1;
      T* dst = wt + k * C;
      for (int64_t j = 0; j < w; ++j) dst[j] = src[j];
      for (int64_t j = w; j < C; ++j) dst[j] = T(0);
    }
    return;
  }
  constexpr int64_t kTile = 16;  // tiles of kTile × C: reads and writes stay in L1
  for (int64_t t0 = 0; t0 < in; t0 += kTile) {
    const int64_t t1 = std::min(in, t0 + kTile);
    for (int64_t j = 0; j < w; ++j) {
      const T* src = wp + (o0 + j) * ws0;
      for (int64_t k = t0; k < t1; ++k) wt[k * C + j] = src[k * ws1];
    }
    for (int64_t k = t0; k < t1; ++k)
      for (int64_t j = w; j < C; ++j) wt[k * C + j] = T(0);
  }
}

// The inner loops, on GCC/Clang vector types of 32 bytes (8 floats, 4
// doubles), which each ISA variant below compiles to its own SIMD (two SSE
// registers per vector without AVX). C is a compile-time constant, so the
// C accumulators stay in registers.
template <typename T>
using Vec __attribute__((vector_size(32), aligned(sizeof(T)))) = T;  // unaligned loads

template <typename T>
constexpr int kVecs = kCols<T> * static_cast<int>(sizeof(T)) / 32;

// The Wt row (four cache lines) of entry e, fetched kAhead entries before it
// is read: the rows an entry meets are random, so the hardware prefetcher
// cannot see them coming, and L2's latency would otherwise stall each entry.
constexpr int64_t kAhead = 6;
template <typename T>
inline __attribute__((always_inline)) void prefetch_row(const T* wt, const int32_t* col,
                                                        int64_t e, int64_t end) {
  if (e >= end) return;
  const char* p = reinterpret_cast<const char*>(wt + static_cast<int64_t>(col[e]) * kCols<T>);
  __builtin_prefetch(p);
  __builtin_prefetch(p + 64);
  __builtin_prefetch(p + 128);
  __builtin_prefetch(p + 192);
}

// Forward, one k-tile of Wt (rows < k_end): acc_i += Σ val[e] · Wt[col[e]]
// over row i's dropped entries from cur[i] on with col < k_end (the columns
// of a row are ascending, so cur[i] walks each row once over the tiles).
template <typename T>
inline __attribute__((always_inline)) void fwd_rows_loop(const int64_t* __restrict__ rp,
                                                         int64_t* __restrict__ cur,
                                                         const int32_t* __restrict__ col,
                                                         const T* __restrict__ val, int64_t n,
                                                         int32_t k_end, const T* __restrict__ wt,
                                                         T* __restrict__ acc) {
  constexpr int NV = kVecs<T>;
  for (int64_t i = 0; i < n; ++i) {
    int64_t e = cur[i];
    const int64_t end = rp[i + 1];
    if (e == end || col[e] >= k_end) continue;
    Vec<T>* dst = reinterpret_cast<Vec<T>*>(acc + i * kCols<T>);
    Vec<T> a[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) a[j] = dst[j];
    for (; e < end && col[e] < k_end; ++e) {
      prefetch_row<T>(wt, col, e + kAhead, end);
      const T v = val[e];
      const Vec<T>* w = reinterpret_cast<const Vec<T>*>(wt + static_cast<int64_t>(col[e]) * kCols<T>);
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) a[j] += v * w[j];
    }
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) dst[j] = a[j];
    cur[i] = e;
  }
}

// The lanes of v added as a tree (halves onto halves: depth log2(lanes),
// in a fixed order).
template <typename T>
inline __attribute__((always_inline)) T lane_sum(Vec<T> v) {
  constexpr int kLanes = 32 / static_cast<int>(sizeof(T));
  T t[kLanes];
#pragma GCC unroll 8
  for (int l = 0; l < kLanes; ++l) t[l] = v[l];
#pragma GCC unroll 4
  for (int half = kLanes / 2; half >= 1; half /= 2)
#pragma GCC unroll 4
    for (int l = 0; l < half; ++l) t[l] += t[l + half];
  return t[0];
}

// Backward, one k-tile as the forward: part[e] += g_i · Wt[col[e]] for each
// dropped entry e of row i in the tile, with g (n × C) the rows' gradient on
// this weight block. The dot runs in two vector partial sums (vertical SIMD:
// no reassociation needed), then adds their lanes in a fixed order.
template <typename T>
inline __attribute__((always_inline)) void bwd_rows_loop(const int64_t* __restrict__ rp,
                                                         int64_t* __restrict__ cur,
                                                         const int32_t* __restrict__ col,
                                                         int64_t n, int32_t k_end,
                                                         const T* __restrict__ g,
                                                         const T* __restrict__ wt,
                                                         T* __restrict__ part) {
  constexpr int NV = kVecs<T>;
  for (int64_t i = 0; i < n; ++i) {
    int64_t e = cur[i];
    const int64_t end = rp[i + 1];
    if (e == end || col[e] >= k_end) continue;
    Vec<T> gi[NV];
    const Vec<T>* src = reinterpret_cast<const Vec<T>*>(g + i * kCols<T>);
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) gi[j] = src[j];
    for (; e < end && col[e] < k_end; ++e) {
      prefetch_row<T>(wt, col, e + kAhead, end);
      const Vec<T>* w = reinterpret_cast<const Vec<T>*>(wt + static_cast<int64_t>(col[e]) * kCols<T>);
      Vec<T> s0 = gi[0] * w[0], s1 = gi[1] * w[1];
#pragma GCC unroll 16
      for (int j = 2; j < NV; j += 2) {
        s0 += gi[j] * w[j];
        s1 += gi[j + 1] * w[j + 1];
      }
      s0 += s1;
      part[e] += lane_sum<T>(s0);
    }
    cur[i] = e;
  }
}

template <typename T>
using FwdRowsFn = void (*)(const int64_t*, int64_t*, const int32_t*, const T*, int64_t, int32_t,
                           const T*, T*);
template <typename T>
using BwdRowsFn = void (*)(const int64_t*, int64_t*, const int32_t*, int64_t, int32_t, const T*,
                           const T*, T*);

#define LK_DROPPED_VARIANTS(SUFFIX, ATTR)                                                     \
  template <typename T>                                                                      \
  ATTR void fwd_rows_##SUFFIX(const int64_t* rp, int64_t* cur, const int32_t* col,           \
                              const T* val, int64_t n, int32_t k_end, const T* wt, T* acc) {  \
    fwd_rows_loop<T>(rp, cur, col, val, n, k_end, wt, acc);                                   \
  }                                                                                          \
  template <typename T>                                                                      \
  ATTR void bwd_rows_##SUFFIX(const int64_t* rp, int64_t* cur, const int32_t* col, int64_t n, \
                              int32_t k_end, const T* g, const T* wt, T* part) {              \
    bwd_rows_loop<T>(rp, cur, col, n, k_end, g, wt, part);                                    \
  }

LK_DROPPED_VARIANTS(default, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LK_DROPPED_X86 1
LK_DROPPED_VARIANTS(avx2, __attribute__((target("avx2,fma"))))
LK_DROPPED_VARIANTS(avx512, __attribute__((target("avx512f,avx512vl"))))
#endif
#undef LK_DROPPED_VARIANTS

template <typename T>
FwdRowsFn<T> pick_fwd_rows() {
#ifdef LK_DROPPED_X86
  if (cpu_isa() >= CpuIsa::kAvx512) return &fwd_rows_avx512<T>;
  if (cpu_isa() >= CpuIsa::kAvx2) return &fwd_rows_avx2<T>;
#endif
  return &fwd_rows_default<T>;
}

template <typename T>
BwdRowsFn<T> pick_bwd_rows() {
#ifdef LK_DROPPED_X86
  if (cpu_isa() >= CpuIsa::kAvx512) return &bwd_rows_avx512<T>;
  if (cpu_isa() >= CpuIsa::kAvx2) return &bwd_rows_avx2<T>;
#endif
  return &bwd_rows_default<T>;
}

// W as (out, in) with its strides, and the number of weight blocks.
struct WeightView {
  int64_t out, in, s0, s1;
};

// Runs rows_fn over every dropped entry against weight block Wt, row blocks
// in sweeps of kSweep: per sweep, the k-tiles in order, each serving the
// sweep's rows while it is in L2. cur is the sweep's row cursors.
template <typename T, typename Fn>
void sweep_rows(const DroppedRows<T>& d, int64_t rows, int64_t in, int64_t* cur, Fn&& fn) {
  const int64_t blocks = num_row_blocks(rows);
  for (int64_t s0 = 0; s0 < blocks; s0 += kSweep) {
    const int64_t s1 = std::min(blocks, s0 + kSweep);
    for (int64_t blk = s0; blk < s1; ++blk)
      std::copy(d.row_ptr[blk].begin(), d.row_ptr[blk].end() - 1,
                cur + (blk - s0) * kRowBlock);
    for (int64_t k0 = 0; k0 < in; k0 += kTileK) {
      const auto k_end = static_cast<int32_t>(std::min(in, k0 + kTileK));
      for (int64_t blk = s0; blk < s1; ++blk)
        fn(blk, (blk - s0) * kRowBlock, std::min(kRowBlock, rows - blk * kRowBlock), k_end);
    }
  }
}

// out = beta·input + alpha·((1 − D) ⊙ x)·Wᵀ; x (tokens × in) contiguous.
// In parallel over weight blocks (tasks write disjoint output columns).
template <typename T>
void fwd_kernel(const Tensor& out, const Tensor& input, const Tensor& x, const Tensor& weight,
                const MaskParams& mask, double beta, double alpha) {
  constexpr int C = kCols<T>;
  static const FwdRowsFn<T> rows_fn = pick_fwd_rows<T>();
  const int64_t T_ = x.size(0);
  const WeightView wv{weight.size(0), weight.size(1), weight.stride(0), weight.stride(1)};
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* ip = beta != 0.0 ? input.data_ptr<T>() : nullptr;
  const int64_t is0 = beta != 0.0 ? input.stride(0) : 0, is1 = beta != 0.0 ? input.stride(1) : 0;
  const T b = static_cast<T>(beta), a = static_cast<T>(alpha);
  const DroppedRows<T> d = dropped_rows<T>(mask, T_, wv.in, x.data_ptr<T>(), /*values=*/true);
  const int64_t wblocks = (wv.out + C - 1) / C;
  const int64_t sweep_rows_n = std::min(T_, kSweep * kRowBlock);
  at::parallel_for(0, wblocks, 1, [&](int64_t q0, int64_t q1) {
    auto wt = scratch<T>(wv.in * C);
    auto acc = scratch<T>(sweep_rows_n * C);
    auto cur = scratch<int64_t>(sweep_rows_n);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t o0 = q * C, w = std::min<int64_t>(C, wv.out - o0);
      transpose_block<T, C>(wp, wv.s0, wv.s1, o0, w, wv.in, wt.get());
      sweep_rows(d, T_, wv.in, cur.get(), [&](int64_t blk, int64_t r, int64_t n, int32_t k_end) {
        T* accb = acc.get() + r * C;
        const int64_t* rp = d.row_ptr[blk].data();
        if (k_end <= kTileK) std::fill(accb, accb + n * C, T(0));  // the sweep's first tile
        rows_fn(rp, cur.get() + r, d.col[blk].data(), d.val[blk].data(), n, k_end, wt.get(),
                accb);
        if (k_end < wv.in) return;  // not the last tile: the rows go on accumulating
        const int64_t r0 = blk * kRowBlock;
        for (int64_t i = 0; i < n; ++i) {
          T* orow = op + (r0 + i) * wv.out + o0;
          const T* arow = accb + i * C;
          if (ip) {
            const T* irow = ip + (r0 + i) * is0 + o0 * is1;
            for (int64_t j = 0; j < w; ++j) orow[j] = b * irow[j * is1] + a * arow[j];
          } else {
            for (int64_t j = 0; j < w; ++j) orow[j] = a * arow[j];
          }
        }
      });
    }
  });
}

// Weight-block groups of the backward: its tasks. A fixed number (never the
// thread count), each with its own partial sums, added in group order.
constexpr int64_t kBwdGroups = 8;

// dx += alpha·(1 − D) ⊙ (grad·W); dx (tokens × in) contiguous. In parallel
// over groups of weight blocks, each summing its blocks' share of every
// entry into its own partials.
template <typename T>
void bwd_kernel(const Tensor& dx, const Tensor& grad, const Tensor& weight,
                const MaskParams& mask, double alpha) {
  constexpr int C = kCols<T>;
  static const BwdRowsFn<T> rows_fn = pick_bwd_rows<T>();
  const int64_t T_ = dx.size(0);
  const WeightView wv{weight.size(0), weight.size(1), weight.stride(0), weight.stride(1)};
  const T* wp = weight.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  const DroppedRows<T> d = dropped_rows<T>(mask, T_, wv.in, nullptr, /*values=*/false);
  const int64_t blocks = num_row_blocks(T_);
  std::vector<int64_t> base(static_cast<size_t>(blocks + 1), 0);  // entry offset per row block
  for (int64_t blk = 0; blk < blocks; ++blk)
    base[blk + 1] = base[blk] + static_cast<int64_t>(d.col[blk].size());
  const int64_t nnz = base[blocks];
  const int64_t wblocks = (wv.out + C - 1) / C;
  const int64_t groups = std::min(kBwdGroups, wblocks);
  auto part = scratch<T>(groups * nnz);
  const int64_t sweep_rows_n = std::min(T_, kSweep * kRowBlock);
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    auto wt = scratch<T>(wv.in * C);
    auto gbuf = scratch<T>(sweep_rows_n * C);
    auto cur = scratch<int64_t>(sweep_rows_n);
    for (int64_t grp = g0; grp < g1; ++grp) {
      T* pg = part.get() + grp * nnz;
      std::fill(pg, pg + nnz, T(0));
      // the group's weight blocks: an even split of the wblocks
      for (int64_t q = grp * wblocks / groups; q < (grp + 1) * wblocks / groups; ++q) {
        const int64_t o0 = q * C, w = std::min<int64_t>(C, wv.out - o0);
        transpose_block<T, C>(wp, wv.s0, wv.s1, o0, w, wv.in, wt.get());
        sweep_rows(d, T_, wv.in, cur.get(), [&](int64_t blk, int64_t r, int64_t n, int32_t k_end) {
          T* gb = gbuf.get() + r * C;
          if (k_end <= kTileK) {  // the sweep's first tile: the rows' gradient on this block
            const int64_t r0 = blk * kRowBlock;
            for (int64_t i = 0; i < n; ++i) {
              const T* grow = gp + (r0 + i) * gs0 + o0 * gs1;
              T* dst = gb + i * C;
              for (int64_t j = 0; j < w; ++j) dst[j] = grow[j * gs1];
              for (int64_t j = w; j < C; ++j) dst[j] = T(0);
            }
          }
          rows_fn(d.row_ptr[blk].data(), cur.get() + r, d.col[blk].data(), n, k_end, gb,
                  wt.get(), pg + base[blk]);
        });
      }
    }
  });
  const T a = static_cast<T>(alpha);
  T* dp = dx.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock, n = std::min(kRowBlock, T_ - r0);
      const auto& rp = d.row_ptr[blk];
      const auto& col = d.col[blk];
      for (int64_t i = 0; i < n; ++i) {
        T* drow = dp + (r0 + i) * wv.in;
        for (int64_t e = rp[i]; e < rp[i + 1]; ++e) {
          const int64_t at_e = base[blk] + e;
          T sum = part[at_e];
          for (int64_t grp = 1; grp < groups; ++grp) sum += part[grp * nnz + at_e];
          drow[col[e]] += a * sum;
        }
      }
    }
  });
}

bool fast_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

Tensor dropped_linear_impl(const Tensor& input, const Tensor& x, const Tensor& weight,
                           const Tensor& seed, double p, double beta, double alpha) {
  check_dropped_linear(kFwdOp, input, x, weight, beta);
  check_cpu(kFwdOp, "x", x);
  check_cpu(kFwdOp, "weight", weight);
  const MaskParams mask = make_mask_params(kFwdOp, seed, p);
  if (!fast_dtype(x.scalar_type()) || x.numel() == 0 || weight.size(0) == 0 ||
      weight.size(1) > std::numeric_limits<int32_t>::max())
    return dropped_linear_dense(input, x, weight, seed, p, beta, alpha);
  const Tensor xc = x.contiguous();
  Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (!mask.active) {  // nothing dropped: beta·input
    if (beta == 0.0) return out.zero_();
    return out.copy_(input).mul_(beta);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kFwdOp, [&] {
    fwd_kernel<scalar_t>(out, input, xc, weight, mask, beta, alpha);
  });
  return out;
}

void dropped_linear_bwd_impl(const Tensor& dx, const Tensor& grad, const Tensor& weight,
                             const Tensor& seed, double p, double alpha) {
  check_dropped_linear_bwd(kBwdOp, dx, grad, weight);
  check_cpu(kBwdOp, "dx", dx);
  check_cpu(kBwdOp, "weight", weight);
  const MaskParams mask = make_mask_params(kBwdOp, seed, p);
  if (!mask.active || dx.numel() == 0 || weight.size(0) == 0) return;
  if (!fast_dtype(dx.scalar_type()) || !dx.is_contiguous() ||
      weight.size(1) > std::numeric_limits<int32_t>::max()) {
    dropped_linear_bwd_dense(dx, grad, weight, seed, p, alpha);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dx.scalar_type(), kBwdOp, [&] {
    bwd_kernel<scalar_t>(dx, grad, weight, mask, alpha);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("dropped_linear", below_autograd_this_thread<&dropped_linear_impl>);
  m.impl("dropped_linear_bwd_", below_autograd_this_thread<&dropped_linear_bwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
