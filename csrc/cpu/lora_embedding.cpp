// lora_embedding_fwd / lora_embedding_bwd:
//   y = W[idx] + scaling · Aᵀ[idx] · Bᵀ        (A: r×num, B: dim×r)
//
// Memory plan
//   * Forward: y (tokens×dim) is written once, row block by row block. For
//     float32 on a CPU with AVX-512 or AVX2 each row is gathered and gets its
//     low-rank update in one pass while in registers (lowrank_rows.h);
//     otherwise the block's rows of W are gathered and the update is added
//     by a GEMM while they are in cache (no second pass over y).
//     s = Aᵀ[idx] (tokens×r, float32 for half weights) is returned and kept
//     by the caller for dB; the indices are kept for dA and dweight.
//   * Backward: dB = scaling · gᵀ·s and dS = g·(scaling·B) (tokens×r, one
//     small buffer) come from one parallel loop over fixed row chunks (for
//     float32 with AVX-512 or AVX2, one read of each row of g gives both:
//     lowrank_rows.h; otherwise two GEMMs per chunk, the chunk in cache);
//     dA[:, idx[t]] += dS[t] is a scatter over tokens in token order (rows
//     of dA in parallel), skipping padding_idx. dweight is ATen's dense
//     embedding backward (a num×dim tensor, only when asked for). dB
//     partials are summed slot by slot in a fixed order, so every result is
//     bitwise the same for any number of threads.
#include <algorithm>
#include <cstring>
#include <vector>

#include <torch/library.h>

#include "../below_autograd.h"
#include "../frozen_layer.h"
#include "common.h"
#include "lowrank_rows.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kFwd = "lora_embedding_fwd";
constexpr const char* kBwd = "lora_embedding_bwd";
constexpr int64_t kMaxSlots = 32;

// The operands (op_checks.h) and the index values, in [0, num_embeddings).
void check_operands(const char* op, const Tensor& indices, const Tensor& weight,
                    const Tensor& lora_A, const Tensor& lora_B) {
  check_embedding_operands<DeviceChecks>(op, indices, weight, lora_A, lora_B);
  const int64_t num = weight.size(0);
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "check_indices", [&] {
    const Tensor ic = indices.contiguous();
    const index_t* p = ic.data_ptr<index_t>();
    for (int64_t t = 0; t < ic.numel(); ++t) {
      TORCH_CHECK(p[t] >= 0 && p[t] < num, op, ": indices must lie in [0, num_embeddings=", num,
                  "), got ", static_cast<int64_t>(p[t]), " at position ", t);
    }
  });
}

// s = Aᵀ[idx] and y = W[idx] + s·(scaling·B)ᵀ, row block by row block: the
// block's rows of W are gathered and the low-rank update is added while
// they are in cache (one parallel region for the whole forward).
template <typename scalar_t>
void lookup_and_add(const Tensor& idx, const Tensor& weight, const Tensor& A, Tensor& y,
                    Tensor& s, const Tensor& Bt) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t T = y.size(0), dim = y.size(1), r = A.size(0), num = A.size(1);
  const auto acc_opts = y.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const scalar_t* ap = A.data_ptr<scalar_t>();
  acc_t* sp = s.data_ptr<acc_t>();
  const bool simd = std::is_same<scalar_t, float>::value && weight.is_contiguous() &&
                    lowrank_rows_available();
  scalar_t* yp = y.data_ptr<scalar_t>();  // y and Bt are contiguous
  const scalar_t* wp = simd ? weight.data_ptr<scalar_t>() : nullptr;
  const acc_t* btp = Bt.data_ptr<acc_t>();
  at::parallel_for(0, num_row_blocks(T), 1, [&](int64_t b0, int64_t b1) {
    Tensor tmp = kSame ? Tensor() : at::empty({kRowBlock, dim}, acc_opts);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock;
      const int64_t n = std::min(kRowBlock, T - r0);
      for (int64_t t = r0; t < r0 + n; ++t)  // s[t, k] = A[k, idx[t]]
        for (int64_t k = 0; k < r; ++k) sp[t * r + k] = static_cast<acc_t>(ap[k * num + ip[t]]);
      if (simd) {  // gather and rank-r update in one pass over each row
        rows_plus_lowrank(reinterpret_cast<float*>(yp) + r0 * dim, dim,
                          reinterpret_cast<const float*>(wp), dim, ip + r0, n, dim,
                          reinterpret_cast<const float*>(sp) + r0 * r, r,
                          reinterpret_cast<const float*>(btp), dim, r);
        continue;
      }
      const Tensor s_blk = s.narrow(0, r0, n);
      Tensor y_blk = y.narrow(0, r0, n);
      if (weight.is_contiguous()) {  // row gather by memcpy: no ATen call per block
        const scalar_t* w = weight.data_ptr<scalar_t>();
        scalar_t* yb = y_blk.data_ptr<scalar_t>();
        for (int64_t t = 0; t < n; ++t)
          std::memcpy(yb + t * dim, w + ip[r0 + t] * dim, sizeof(scalar_t) * dim);
      } else {
        at::index_select_out(y_blk, weight, 0, idx.narrow(0, r0, n));
      }
      if constexpr (kSame) {
        mm_rm(y_blk, s_blk, Bt, /*add=*/true, vary_m(n == kRowBlock));
      } else {
        Tensor t = tmp.narrow(0, 0, n);
        t.copy_(y_blk);
        mm_rm(t, s_blk, Bt, /*add=*/true, vary_m(n == kRowBlock));
        y_blk.copy_(t);  // one rounding to the half dtype
      }
    }
  });
}

std::tuple<Tensor, Tensor> lora_embedding_fwd_impl(const Tensor& indices, const Tensor& weight,
                                                   const Tensor& lora_A, const Tensor& lora_B,
                                                   double scaling) {
  check_operands(kFwd, indices, weight, lora_A, lora_B);
  const auto lt = lowrank_dtype(weight.scalar_type());
  const int64_t T = indices.size(0), dim = weight.size(1), r = lora_A.size(0);
  Tensor s = at::empty({T, r}, weight.options().dtype(lt));
  if (T == 0 || r == 0 || dim == 0) {
    if (T && r) s.copy_(at::index_select(lora_A, 1, indices).t());
    return {at::index_select(weight, 0, indices).contiguous(), s};
  }
  Tensor y = at::empty({T, dim}, weight.options());
  const Tensor idx = (indices.scalar_type() == at::kLong && indices.is_contiguous())
                         ? indices
                         : indices.to(at::kLong).contiguous();
  const Tensor A_c = lora_A.contiguous();
  Tensor Bt = at::empty({r, dim}, weight.options().dtype(lt));  // scaling·Bᵀ
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), kFwd, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor Bc = lora_B.contiguous();
    const scalar_t* bp = Bc.data_ptr<scalar_t>();
    acc_t* o = Bt.data_ptr<acc_t>();
    for (int64_t j = 0; j < dim; ++j)
      for (int64_t k = 0; k < r; ++k)
        o[k * dim + j] = static_cast<acc_t>(scaling) * static_cast<acc_t>(bp[j * r + k]);
    lookup_and_add<scalar_t>(idx, weight, A_c, y, s, Bt);
  });
  return {y, s};
}

// dA = the scatter of dS (T × r, acc_t): dA[k, idx[t]] += dS[t, k], tokens
// in order, padding_idx skipped; rows of dA in parallel. dA comes out in
// acc_t; the caller converts.
template <typename acc_t>
void scatter_dA(const Tensor& indices, const acc_t* dsp, int64_t T, int64_t r, int64_t num,
                int64_t padding_idx, const at::TensorOptions& acc_opts, Tensor& dA) {
  dA = at::empty({r, num}, acc_opts);
  acc_t* dap = dA.data_ptr<acc_t>();
  const Tensor ic = indices.contiguous();
  AT_DISPATCH_INDEX_TYPES(ic.scalar_type(), kBwd, [&] {
    const index_t* idx = ic.data_ptr<index_t>();
    at::parallel_for(0, r, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        acc_t* row = dap + k * num;
        std::fill(row, row + num, acc_t(0));
        for (int64_t t = 0; t < T; ++t) {
          const int64_t j = static_cast<int64_t>(idx[t]);
          if (j == padding_idx) continue;
          row[j] += dsp[t * r + k];
        }
      }
    });
  });
}

// float32 dS (when dsp is set) and dB (when want_dB) with the row kernel of
// lowrank_rows.h: one read of each row of g for both. Bs = scaling·Bᵀ (from B,
// bp: dim × r) and the per-slot dB partials use its packed column-block layout.
void grads_by_rows(const float* gp, int64_t ld_g, int64_t T, int64_t dim, int64_t r,
                   const float* bp, const float* sp, double scaling, int64_t nchunks,
                   int64_t S, float* dsp, bool want_dB, const Tensor& lora_B, Tensor& dB) {
  const int64_t P = packed_size(r, dim);
  std::vector<float> Bs(P, 0.f);  // scaling·Bᵀ, packed; B (bp) is (dim, r)
  for (int64_t j = 0; j < dim; ++j)
    for (int64_t k = 0; k < r; ++k)
      Bs[packed_index(r, k, j)] = static_cast<float>(scaling) * bp[j * r + k];
  // Per-slot dB partials, each zeroed by its slot (uninitialized here).
  const Tensor parts_t = at::empty({want_dB ? S * P : 0}, lora_B.options());
  float* parts = parts_t.data_ptr<float>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> sbuf(want_dB ? kRowBlock * r : 0);  // scaling · s of one chunk
    for (int64_t slot = s0; slot < s1; ++slot) {
      float* part = want_dB ? parts + slot * P : nullptr;
      if (part) std::fill(part, part + P, 0.f);
      for (int64_t c = slot * nchunks / S; c < (slot + 1) * nchunks / S; ++c) {
        const int64_t r0 = c * kRowBlock;
        const int64_t n = std::min(kRowBlock, T - r0);
        if (want_dB)
          for (int64_t e = 0; e < n * r; ++e)
            sbuf[e] = static_cast<float>(scaling) * sp[r0 * r + e];
        lowrank_grads_rows(gp + r0 * ld_g, ld_g, n, dim, r, Bs.data(), sbuf.data(), r,
                           dsp ? dsp + r0 * r : nullptr, r, part);
      }
    }
  });
  if (!want_dB) return;
  // dB[j, k] = Σ_slot part, slots in order; packed blocks in parallel, each
  // summed slot by slot over its contiguous r × kPackCols elements.
  dB = at::empty({dim, r}, lora_B.options());
  float* o = dB.data_ptr<float>();
  const int64_t blk = r * kPackCols;
  at::parallel_for(0, P / blk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> sum(blk);
    for (int64_t b = b0; b < b1; ++b) {
      const float* first = parts + b * blk;
      std::copy(first, first + blk, sum.begin());
      for (int64_t q = 1; q < S; ++q) {
        const float* src = first + q * P;
        for (int64_t e = 0; e < blk; ++e) sum[e] += src[e];
      }
      const int64_t j0 = b * kPackCols, w = std::min(kPackCols, dim - j0);
      for (int64_t k = 0; k < r; ++k)
        for (int64_t jj = 0; jj < w; ++jj) o[(j0 + jj) * r + k] = sum[k * kPackCols + jj];
    }
  });
}

// dA and dB (each only when asked for), for T > 0, r > 0, dim > 0:
//   dS = g·(scaling·B) (tokens×r, in acc_t), then dA[:, idx[t]] += dS[t];
//   dB = scaling · gᵀ·s, accumulated transposed, (r, dim), per slot of row
//   chunks, and summed slot by slot into (dim, r) at the end.
// Raw pointers throughout (mm_rm_ptr): no tensor views per row chunk.
template <typename scalar_t>
void embedding_grads(const Tensor& grad, const Tensor& indices, const Tensor& lora_B,
                     const Tensor& s_in, double scaling, int64_t padding_idx, int64_t num,
                     bool want_dA, bool want_dB, Tensor& dA, Tensor& dB) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t T = grad.size(0), dim = grad.size(1), r = lora_B.size(1);
  const auto acc_opts = grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t nchunks = num_row_blocks(T);
  const int64_t S = std::min(nchunks, kMaxSlots);

  // Row-major g with a row stride the micro-kernel accepts.
  const Tensor g = (grad.stride(1) == 1 && grad.stride(0) >= dim) ? grad : grad.contiguous();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const int64_t ld_g = g.stride(0);
  const Tensor Bc = lora_B.contiguous();  // (dim, r)
  const scalar_t* bp = Bc.data_ptr<scalar_t>();
  const Tensor s = want_dB ? s_in.contiguous() : s_in;
  const acc_t* sp = want_dB ? s.data_ptr<acc_t>() : nullptr;
  Tensor dS = want_dA ? at::empty({T, r}, acc_opts) : Tensor();
  acc_t* dsp = want_dA ? dS.data_ptr<acc_t>() : nullptr;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (lowrank_rows_available()) {
      grads_by_rows(gp, ld_g, T, dim, r, bp, sp, scaling, nchunks, S, dsp, want_dB, lora_B, dB);
      if (want_dA) scatter_dA<acc_t>(indices, dsp, T, r, num, padding_idx, acc_opts, dA);
      return;
    }
  }
  // scaling·B (dim, r) in acc_t, the micro-kernel's right operand for dS.
  Tensor B_sc = at::empty({dim, r}, acc_opts);
  acc_t* bsp = B_sc.data_ptr<acc_t>();
  for (int64_t e = 0; e < dim * r; ++e)
    bsp[e] = static_cast<acc_t>(scaling) * static_cast<acc_t>(bp[e]);
  Tensor parts = want_dB ? at::empty({S, r, dim}, acc_opts) : Tensor();
  acc_t* pp = want_dB ? parts.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    std::vector<acc_t> gbuf(kSame ? 0 : kRowBlock * dim);
    std::vector<acc_t> tbuf(want_dB ? r * kRowBlock : 0);
    for (int64_t slot = s0; slot < s1; ++slot) {
      const int64_t c_begin = slot * nchunks / S, c_end = (slot + 1) * nchunks / S;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t r0 = c * kRowBlock;
        const int64_t n = std::min(kRowBlock, T - r0);
        const bool full = n == kRowBlock;  // a stable shape for the micro-kernel
        const acc_t* gc;
        int64_t ldc;
        if constexpr (kSame) {
          gc = reinterpret_cast<const acc_t*>(gp) + r0 * ld_g;
          ldc = ld_g;
        } else {  // half rows, widened once per chunk
          for (int64_t t = 0; t < n; ++t)
            for (int64_t j = 0; j < dim; ++j)
              gbuf[t * dim + j] = static_cast<acc_t>(gp[(r0 + t) * ld_g + j]);
          gc = gbuf.data();
          ldc = dim;
        }
        if (want_dA) mm_rm_ptr<acc_t>(n, r, dim, gc, ldc, bsp, r, dsp + r0 * r, r, false, vary_m(full));
        if (want_dB) {
          transpose_scaled<acc_t>(tbuf.data(), sp + r0 * r, n, r, r, static_cast<acc_t>(scaling));
          mm_rm_ptr<acc_t>(r, dim, n, tbuf.data(), n, gc, ldc, pp + slot * r * dim, dim,
                           /*add=*/c != c_begin, vary_k(full));
        }
      }
    }
  });

  if (want_dB) {  // dB[j, k] = Σ_slot parts[slot, k, j], slots in order; ranks in parallel
    dB = at::empty({dim, r}, lora_B.options());
    scalar_t* o = dB.data_ptr<scalar_t>();
    at::parallel_for(0, r, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t j = 0; j < dim; ++j) {
          acc_t v = pp[k * dim + j];
          for (int64_t q = 1; q < S; ++q) v += pp[(q * r + k) * dim + j];
          o[j * r + k] = static_cast<scalar_t>(v);
        }
      }
    });
  }
  if (want_dA) {
    scatter_dA<acc_t>(indices, dsp, T, r, num, padding_idx, acc_opts, dA);
    if (!kSame) dA = dA.to(c10::CppTypeToScalarType<scalar_t>::value);
  }
}

std::tuple<Tensor, Tensor, Tensor> lora_embedding_bwd_impl(
    const Tensor& grad, const Tensor& indices, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& s, double scaling, int64_t padding_idx,
    c10::List<bool> output_mask) {
  const EmbeddingBwdWants want = embedding_bwd_wants(kBwd, output_mask);
  check_operands(kBwd, indices, weight, lora_A, lora_B);
  check_embedding_bwd<DeviceChecks>(kBwd, want, grad, indices, weight, lora_A, s, padding_idx);
  const int64_t T = indices.size(0), num = weight.size(0), dim = weight.size(1),
                r = lora_A.size(0);

  const Tensor dw = embedding_dweight(want.dw, grad, indices, weight, padding_idx);
  if ((!want.dA && !want.dB) || T == 0 || r == 0 || dim == 0)
    return {dw, zero_grad_or_empty(want.dA, lora_A), zero_grad_or_empty(want.dB, lora_B)};
  Tensor dA = lora_A.new_empty({0});
  Tensor dB = lora_B.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), kBwd, [&] {
    embedding_grads<scalar_t>(grad, indices, lora_B, s, scaling, padding_idx, num, want.dA,
                              want.dB, dA, dB);
  });
  return {dw, dA, dB};
}

// lora_kernels::lora_embedding_fwd also takes the padding index, which only
// its backward uses.
std::tuple<Tensor, Tensor> lora_embedding_fwd_op(const Tensor& indices, const Tensor& weight,
                                                 const Tensor& lora_A, const Tensor& lora_B,
                                                 double scaling, int64_t /*padding_idx*/) {
  return lora_embedding_fwd_impl(indices, weight, lora_A, lora_B, scaling);
}

}  // namespace

// The dispatcher's CPU kernels of lora_kernels::lora_embedding_{fwd,bwd}, and
// the cpu backend's handles on them (lora_kernels_cpu, for use_backend("cpu")
// and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("lora_embedding_fwd", below_autograd<&lora_embedding_fwd_op>);
  m.impl("lora_embedding_bwd", below_autograd<&lora_embedding_bwd_impl>);
}

TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("lora_embedding_fwd", below_autograd<&lora_embedding_fwd_impl>);
  m.impl("lora_embedding_bwd", below_autograd<&lora_embedding_bwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
