// lora_linear_bwd: gradients of y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·Bᵀ.
//
//   dS   = scaling · g[:, cols_i] · B_i            (tokens × r per group i)
//   dB_i = scaling · g[:, cols_i]ᵀ · s_i
//   dA   = dSᵀ · dropout(x)
//   dx   = g · W  +  mask ⊙ (dS · A) · keep_scale
//   dW   = gᵀ · x  (xᵀ · g with fan_in_fan_out),   dbias = Σ_tokens g
//
// Memory plan
//   * Inputs kept by the forward: s (tokens×r, for dB), x only when dA or dW
//     is asked for (else it may be empty), and the 8-byte seed; the mask is
//     regenerated here, never stored.
//   * dx (tokens×in) is the only tokens×in tensor written. It is written once
//     by the low-rank pass below (dx_c = mask ⊙ (dS_c·A) · keep_scale) and
//     then completed by ONE multithreaded BLAS GEMM dx += g·W (beta = 1), so
//     the low-rank part costs no extra pass over dx. dW = gᵀ·x is a single
//     BLAS GEMM too, only when asked for.
//   * Everything low-rank runs in ONE parallel loop over fixed row chunks of
//     kRowBlock tokens: dS_c = g_c·(scaling·B) (a per-thread kRowBlock × r
//     buffer), the dB partial from g_c and s_c, the chunk's mask regenerated
//     once and used both for dA (dS_cᵀ · dropout(x_c)) and for dx_c. The only
//     chunk-sized temporaries are per-thread buffers: dropped x_c
//     (kRowBlock × in) and its 16-bit mask lanes. The GEMMs inside the loop
//     are single-threaded micro-kernel/BLAS calls (mm_rm in common.h).
//   * Determinism: chunks are grouped into a fixed number of slots (a
//     function of the shapes only, never of the thread count). Each slot
//     accumulates its dA/dB partial over its chunks in order, and the
//     partials are summed slot by slot in a fixed order, so dA and dB are
//     bitwise the same for any number of threads. Slot partials cost
//     slots × (|A| + |B|) elements, bounded by kSlotBytes.
//   * Only what output_mask asks for is computed; the others are empty.
#include <torch/library.h>

#include "../below_autograd.h"
#include "../frozen_layer.h"
#include "common.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "lora_linear_bwd";
constexpr int64_t kMaxSlots = 32;
constexpr int64_t kSlotBytes = int64_t(64) << 20;

struct Wants {
  bool dx, dA, dB;
};

// dbias = Σ_tokens grad, column block by column block: each block is one
// single-threaded ATen sum over all tokens, so the result does not depend on
// the thread count (a plain grad.sum(0) may split the tokens across threads).
Tensor column_sum(const Tensor& grad) {
  constexpr int64_t kCols = 256;
  const int64_t out = grad.size(1);
  Tensor db = at::empty({out}, grad.options());
  at::parallel_for(0, (out + kCols - 1) / kCols, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCols, n = std::min(kCols, out - c0);
      Tensor dst = db.narrow(0, c0, n);
      at::sum_out(dst, grad.narrow(1, c0, n), {0});
    }
  });
  return db;
}

template <typename scalar_t>
void lowrank_backward(const Tensor& g, const Tensor& x, const Tensor& A_l, const Tensor& B_l,
                      const Tensor& s_in, const GroupLayout& L, double scaling,
                      const MaskParams& mask, Wants w, Tensor& dx, Tensor& dA_acc,
                      Tensor& dB_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t T = g.size(0);
  const int64_t in = A_l.size(1);
  const int64_t R = A_l.size(0);
  const int64_t r = L.r;
  const int64_t ng = L.enabled();
  const int64_t gcols = ng * L.size;
  const int64_t lane_ld = lane_stride(in);
  const bool need_dS = w.dx || w.dA;
  const bool need_lanes = mask.active && need_dS;
  const auto acc_opts = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const LaneMask<acc_t> lane_mask(mask);
  const bool need_xbuf = (w.dA && (mask.active || !kSame)) || (w.dx && !kSame);

  const int64_t nchunks = num_row_blocks(T);
  const int64_t slot_bytes =
      ((w.dA ? R * in : 0) + (w.dB ? gcols * r : 0)) * static_cast<int64_t>(sizeof(acc_t));
  int64_t S = std::min(nchunks, kMaxSlots);
  if (slot_bytes > 0) S = std::max<int64_t>(1, std::min(S, kSlotBytes / slot_bytes));
  Tensor dA_parts = w.dA ? at::empty({S, R, in}, acc_opts) : Tensor();
  // dB is accumulated transposed, (r, size) per group: s_cᵀ·g_c has
  // row-major operands; it is transposed back once at the end.
  Tensor dBt_parts = w.dB ? at::empty({S, ng, r, L.size}, acc_opts) : Tensor();

  // Row-major operands for mm_rm (common.h), scaling folded into B once.
  Tensor B_sc = at::empty({B_l.size(0), r}, acc_opts);  // (len(groups)·size, r)
  {
    const acc_t* b = B_l.data_ptr<acc_t>();  // contiguous
    acc_t* o = B_sc.data_ptr<acc_t>();
    for (int64_t e = 0; e < B_l.numel(); ++e) o[e] = b[e] * static_cast<acc_t>(scaling);
  }
  const Tensor s = w.dB ? s_in.contiguous() : s_in;   // read by raw pointer below

  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    Tensor gbuf = kSame ? Tensor() : at::empty({kRowBlock, gcols}, acc_opts);
    Tensor dSbuf = need_dS ? at::empty({kRowBlock * R}, acc_opts) : Tensor();
    Tensor tbuf = at::empty({R * kRowBlock}, acc_opts);  // a transposed (R × n) block
    Tensor xbuf = need_xbuf ? at::empty({kRowBlock, in}, acc_opts) : Tensor();
    std::vector<uint16_t> lanes(need_lanes ? static_cast<size_t>(kRowBlock * lane_ld) : 0);
    std::vector<Tensor> g_i(ng);
    for (int64_t slot = s0; slot < s1; ++slot) {
      const int64_t c_begin = slot * nchunks / S;
      const int64_t c_end = (slot + 1) * nchunks / S;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const bool add = c != c_begin;  // accumulate into the slot's partials
        const int64_t r0 = c * kRowBlock;
        const int64_t n = std::min(kRowBlock, T - r0);
        const bool full = n == kRowBlock;  // a stable shape for mm_rm
        const Tensor g_c = g.narrow(0, r0, n);
        // Group columns of g_c, in the low-rank dtype.
        for (int64_t i = 0; i < ng; ++i) {
          const Tensor src = g_c.narrow(1, L.col0(i), L.size);
          if constexpr (kSame) {
            g_i[i] = src;
          } else {
            g_i[i] = gbuf.narrow(0, 0, n).narrow(1, i * L.size, L.size);
            g_i[i].copy_(src);
          }
        }
        Tensor tb = tbuf.narrow(0, 0, R * n).view({R, n});
        if (w.dB) {
          // dBᵀ_i += (scaling · s_c,i)ᵀ · g_c,i
          transpose_scaled<acc_t>(tb.data_ptr<acc_t>(), s.data_ptr<acc_t>() + r0 * R, n, R, R,
                                  static_cast<acc_t>(scaling));
          Tensor dBt_s = dBt_parts[slot];
          for (int64_t i = 0; i < ng; ++i)
            mm_rm(dBt_s[i], tb.narrow(0, i * r, r), g_i[i], add, vary_k(full));
        }
        if (!need_dS) continue;
        Tensor dS = dSbuf.narrow(0, 0, n * R).view({n, R});
        for (int64_t i = 0; i < ng; ++i)
          mm_rm(dS.narrow(1, i * r, r), g_i[i], B_sc.narrow(0, i * L.size, L.size), false,
                vary_m(full));
        if (need_lanes) mask_lanes(mask, r0, n, in, lanes.data());
        const uint16_t* lp = need_lanes ? lanes.data() : nullptr;
        if (w.dA) {
          // dA += dS_cᵀ · dropout(x_c)
          transpose_scaled<acc_t>(tb.data_ptr<acc_t>(), dS.data_ptr<acc_t>(), n, R, R, acc_t(1));
          const Tensor x_c = x.narrow(0, r0, n);
          if (kSame && !mask.active) {
            mm_rm(dA_parts[slot], tb, x_c, add, vary_k(full));
          } else {
            Tensor xb = xbuf.narrow(0, 0, n);
            load_masked<scalar_t, acc_t>(x_c, xb, lp, lane_ld, lane_mask);
            mm_rm(dA_parts[slot], tb, xb, add, vary_k(full));
          }
        }
        if (w.dx) {
          // dx_c = mask ⊙ (dS_c·A) · keep_scale; the frozen g·W is added later.
          Tensor dx_c = dx.narrow(0, r0, n);
          if constexpr (kSame) {
            mm_rm(dx_c, dS, A_l, false, vary_m(full));
            if (lp)
              apply_mask_inplace<acc_t>(dx_c.data_ptr<acc_t>(), in, lp, lane_ld, n, in,
                                        lane_mask);
          } else {
            Tensor t = xbuf.narrow(0, 0, n);
            mm_rm(t, dS, A_l, false, vary_m(full));
            if (lp)
              apply_mask_inplace<acc_t>(t.data_ptr<acc_t>(), in, lp, lane_ld, n, in, lane_mask);
            dx_c.copy_(t);  // one rounding to the half dtype
          }
        }
      }
    }
  });
  if (w.dA) dA_acc = S ? sum_slots<acc_t>(dA_parts) : at::zeros({R, in}, acc_opts);
  if (w.dB) {  // dB[i·size + c, k] = Σ_slot dBt_parts[slot, i, k, c], slots in order
    dB_acc = at::empty({gcols, r}, acc_opts);
    const acc_t* p = dBt_parts.data_ptr<acc_t>();
    acc_t* o = dB_acc.data_ptr<acc_t>();
    const int64_t per_slot = ng * r * L.size;
    for (int64_t i = 0; i < ng; ++i)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t c = 0; c < L.size; ++c) {
          const int64_t e = (i * r + k) * L.size + c;
          acc_t v = S ? p[e] : acc_t(0);
          for (int64_t q = 1; q < S; ++q) v += p[q * per_slot + e];
          o[(i * L.size + c) * r + k] = v;
        }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_impl(
    const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& s, const Tensor& seed, double scaling, double dropout_p,
    bool fan_in_fan_out, int64_t num_groups, at::IntArrayRef groups,
    c10::List<bool> output_mask) {
  const LinearBwdWants want = linear_bwd_wants(kOp, output_mask);
  const LinearShapes d =
      check_linear_bwd<DeviceChecks>(kOp, want, grad, x, weight, lora_A, lora_B, s, dropout_p,
                                     fan_in_fan_out, num_groups, groups);
  const int64_t T = d.T, in = d.in, out = d.out, R = lora_A.size(0);
  const GroupLayout& L = d.L;
  const auto lt = lowrank_dtype(grad.scalar_type());
  const bool lora_needs_mask = (want.dx || want.dA) && R > 0 && T > 0 && in > 0;
  const MaskParams mask = lora_needs_mask ? make_mask_params(kOp, seed, dropout_p) : MaskParams{};

  const bool lowrank = R > 0 && T > 0 && in > 0 && out > 0;
  const Wants w{want.dx && lowrank, want.dA && lowrank, want.dB && lowrank};
  Tensor dw = linear_dweight(want.dw, grad, x, weight, fan_in_fan_out);
  Tensor db = want.db ? column_sum(grad) : grad.new_empty({0});
  Tensor dx = w.dx ? at::empty({T, in}, grad.options()) : grad.new_empty({0});
  Tensor dA = w.dA ? Tensor() : zero_grad_or_empty(want.dA, lora_A);
  Tensor dB = w.dB ? Tensor() : zero_grad_or_empty(want.dB, lora_B);
  if (w.dx || w.dA || w.dB) {
    const Tensor A_l = lora_A.to(lt).contiguous();
    const Tensor B_l = lora_B.to(lt).contiguous();
    Tensor dA_acc, dB_acc;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), kOp, [&] {
      lowrank_backward<scalar_t>(grad, x, A_l, B_l, s, L, scaling, mask, w, dx, dA_acc, dB_acc);
    });
    if (w.dA) dA = dA_acc.to(lora_A.scalar_type()).contiguous();
    if (w.dB) dB = dB_acc.to(lora_B.scalar_type()).contiguous();
  }
  add_frozen_dx(dx, w.dx, want.dx, grad, weight, fan_in_fan_out);
  return {dx, dw, db, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("lora_linear_bwd", below_autograd<&lora_linear_bwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
