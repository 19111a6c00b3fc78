// lora_embedding_fwd / lora_embedding_bwd:
//   y = W[idx] + scaling · Aᵀ[idx] · Bᵀ        (A: r×num, B: dim×r)
//
// Memory plan
//   * Forward: y (tokens×dim) is written once, row block by row block. For
//     float32 on a CPU with AVX-512 each row is gathered and gets its
//     low-rank update in one pass while in registers (lowrank_rows.h);
//     otherwise the block's rows of W are gathered and the update is added
//     by a GEMM while they are in cache (no second pass over y).
//     s = Aᵀ[idx] (tokens×r, float32 for half weights) is returned and kept
//     by the caller for dB; the indices are kept for dA and dweight.
//   * Backward: dB = scaling · gᵀ·s and dS = g·(scaling·B) (tokens×r, one
//     small buffer) come from one parallel loop over fixed row chunks;
//     dA[:, idx[t]] += dS[t] is a scatter over tokens in token order (rows
//     of dA in parallel), skipping padding_idx. dweight is ATen's dense
//     embedding backward (a num×dim tensor, only when asked for). dB
//     partials are summed slot by slot in a fixed order, so every result is
//     bitwise the same for any number of threads.
#include <cstring>

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
        mm_rm(y_blk, s_blk, Bt, /*add=*/true, n == kRowBlock);
      } else {
        Tensor t = tmp.narrow(0, 0, n);
        t.copy_(y_blk);
        mm_rm(t, s_blk, Bt, /*add=*/true, n == kRowBlock);
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
  const Tensor idx = indices.to(at::kLong).contiguous();
  const Tensor A_c = lora_A.contiguous();
  const Tensor Bt = (lora_B.to(lt).t() * scaling).contiguous();  // (r, dim), scaled
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), kFwd, [&] {
    lookup_and_add<scalar_t>(idx, weight, A_c, y, s, Bt);
  });
  return {y, s};
}

// dS = g·(scaling·B) (tokens×r) and dB = scaling · gᵀ·s, in the low-rank dtype.
// dB is accumulated transposed, (r, dim), per slot of row chunks.
template <typename scalar_t>
void lowrank_grads(const Tensor& g, const Tensor& s_in, const Tensor& B_l, double scaling,
                   bool want_dS, bool want_dB, Tensor& dS, Tensor& dB) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t T = g.size(0), dim = g.size(1), r = B_l.size(1);
  const auto acc_opts = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t nchunks = num_row_blocks(T);
  const int64_t S = std::min(nchunks, kMaxSlots);
  const Tensor B_sc = (B_l * scaling).contiguous();  // (dim, r)
  const Tensor s = want_dB ? s_in.contiguous() : s_in;  // read by raw pointer below
  if (want_dS) dS = at::empty({T, r}, acc_opts);
  Tensor parts = want_dB ? at::empty({S, r, dim}, acc_opts) : Tensor();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    Tensor gbuf = kSame ? Tensor() : at::empty({kRowBlock, dim}, acc_opts);
    Tensor tbuf = at::empty({r * kRowBlock}, acc_opts);
    for (int64_t slot = s0; slot < s1; ++slot) {
      const int64_t c_begin = slot * nchunks / S, c_end = (slot + 1) * nchunks / S;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t r0 = c * kRowBlock;
        const int64_t n = std::min(kRowBlock, T - r0);
        Tensor g_c = g.narrow(0, r0, n);
        if constexpr (!kSame) {
          Tensor gb = gbuf.narrow(0, 0, n);
          gb.copy_(g_c);
          g_c = gb;
        }
        if (want_dS) mm_rm(dS.narrow(0, r0, n), g_c, B_sc, /*add=*/false, n == kRowBlock);
        if (want_dB) {
          Tensor st = tbuf.narrow(0, 0, r * n).view({r, n});
          transpose_scaled<acc_t>(st.data_ptr<acc_t>(), s.data_ptr<acc_t>() + r0 * r, n, r, r,
                                  static_cast<acc_t>(scaling));
          mm_rm(parts[slot], st, g_c, /*add=*/c != c_begin, n == kRowBlock);
        }
      }
    }
  });
  if (want_dB) {
    dB = S ? sum_slots<acc_t>(parts).t() : at::zeros({dim, r}, acc_opts);
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
  const auto lt = lowrank_dtype(weight.scalar_type());

  const Tensor dw = embedding_dweight(want.dw, grad, indices, weight, padding_idx);
  if ((!want.dA && !want.dB) || T == 0 || r == 0 || dim == 0)
    return {dw, zero_grad_or_empty(want.dA, lora_A), zero_grad_or_empty(want.dB, lora_B)};
  Tensor dA = lora_A.new_empty({0});
  Tensor dB = lora_B.new_empty({0});
  const Tensor B_l = lora_B.to(lt).contiguous();
  Tensor dS, dB_acc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), kBwd, [&] {
    lowrank_grads<scalar_t>(grad, s, B_l, scaling, want.dA, want.dB, dS, dB_acc);
  });
  if (want.dB) dB = dB_acc.to(lora_B.scalar_type()).contiguous();
  if (want.dA) {
    // dA[k, idx[t]] += dS[t, k], tokens in order; rows of dA in parallel.
    Tensor dA_acc = at::zeros({r, num}, dS.options());
    const Tensor ic = indices.contiguous();
    AT_DISPATCH_FLOATING_TYPES(dS.scalar_type(), kBwd, [&] {
      AT_DISPATCH_INDEX_TYPES(ic.scalar_type(), kBwd, [&] {
        const index_t* idx = ic.data_ptr<index_t>();
        const scalar_t* dsp = dS.data_ptr<scalar_t>();
        scalar_t* dap = dA_acc.data_ptr<scalar_t>();
        at::parallel_for(0, r, 1, [&](int64_t k0, int64_t k1) {
          for (int64_t k = k0; k < k1; ++k) {
            scalar_t* row = dap + k * num;
            for (int64_t t = 0; t < T; ++t) {
              const int64_t j = static_cast<int64_t>(idx[t]);
              if (j == padding_idx) continue;
              row[j] += dsp[t * r + k];
            }
          }
        });
      });
    });
    dA = dA_acc.to(lora_A.scalar_type());
  }
  return {dw, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("lora_embedding_fwd", below_autograd<&lora_embedding_fwd_impl>);
  m.impl("lora_embedding_bwd", below_autograd<&lora_embedding_bwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
