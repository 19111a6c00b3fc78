// The backward low-rank pass of the CPU kernels, shared by lora_linear_bwd
// (which adds the frozen layer's gradients) and lora_delta_bwd (the branch
// alone): dS = scaling·g·B, dB, dA = dSᵀ·dropout(x) and the branch's dx
// term, in one parallel loop over fixed row chunks with deterministic slot
// partials. The memory plan is lora_linear_bwd.cpp's.
#pragma once

#include <algorithm>
#include <vector>

#include "../frozen_layer.h"
#include "common.h"

namespace lora_kernels {
namespace cpu {

constexpr int64_t kMaxSlots = 32;
constexpr int64_t kSlotBytes = int64_t(64) << 20;

struct Wants {
  bool dx, dA, dB;
};

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
  const int64_t size = L.size;
  const int64_t gcols = ng * size;
  const int64_t lane_ld = lane_stride(in);
  const bool need_dS = w.dx || w.dA;
  const bool need_lanes = mask.active && need_dS;
  const auto acc_opts = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const LaneMask<acc_t> lane_mask(mask);

  const int64_t nchunks = num_row_blocks(T);
  const int64_t slot_bytes =
      ((w.dA ? R * in : 0) + (w.dB ? gcols * r : 0)) * static_cast<int64_t>(sizeof(acc_t));
  int64_t S = std::min(nchunks, kMaxSlots);
  if (slot_bytes > 0) S = std::max<int64_t>(1, std::min(S, kSlotBytes / slot_bytes));
  // One slot: the partial is dA itself.
  Tensor dA_parts = w.dA ? (S == 1 ? at::empty({R, in}, acc_opts) : at::empty({S, R, in}, acc_opts))
                         : Tensor();
  acc_t* dAp = w.dA ? dA_parts.data_ptr<acc_t>() : nullptr;
  // dB is accumulated transposed, (r, size) per group: s_cᵀ·g_c has
  // row-major operands; it is transposed back once at the end.
  const auto dBt_parts = scratch<acc_t>(w.dB ? S * ng * r * size : 0);

  // Row-major operands of mm_rm_ptr (common.h), scaling folded into B once.
  const auto B_sc = scratch<acc_t>(B_l.numel());  // (len(groups)·size, r)
  {
    const acc_t* b = B_l.const_data_ptr<acc_t>();  // contiguous
    for (int64_t e = 0; e < B_l.numel(); ++e) B_sc[e] = b[e] * static_cast<acc_t>(scaling);
  }
  const Tensor s = w.dB ? s_in.contiguous() : s_in;
  const acc_t* sp = w.dB ? s.const_data_ptr<acc_t>() : nullptr;
  const acc_t* ap = A_l.const_data_ptr<acc_t>();  // (R, in), contiguous
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const int64_t gs0 = g.stride(0), gs1 = g.stride(1);
  const bool g_in_place = kSame && rows_in_place(g);
  const scalar_t* xp = w.dA ? x.const_data_ptr<scalar_t>() : nullptr;
  const int64_t xs0 = w.dA ? x.stride(0) : 0, xs1 = w.dA ? x.stride(1) : 0;
  const bool x_in_place = w.dA && kSame && !mask.active && rows_in_place(x);
  const bool need_xbuf = (w.dA && !x_in_place) || (w.dx && !kSame);
  scalar_t* dxp = w.dx ? dx.data_ptr<scalar_t>() : nullptr;  // (T, in), contiguous

  auto run = [&](int64_t s0, int64_t s1) {
    const int64_t rows = std::min(kRowBlock, T);  // rows of a chunk, at most
    const auto gbuf = scratch<acc_t>(g_in_place ? 0 : rows * gcols);
    const auto dS = scratch<acc_t>(need_dS ? rows * R : 0);  // (n, R)
    const auto tb = scratch<acc_t>(R * rows);                // a transposed (R × n) block
    const auto xbuf = scratch<acc_t>(need_xbuf ? rows * in : 0);
    const auto lanes = scratch<uint16_t>(need_lanes ? rows * lane_ld : 0);
    std::vector<const acc_t*> g_i(static_cast<size_t>(ng));
    for (int64_t slot = s0; slot < s1; ++slot) {
      const int64_t c_begin = slot * nchunks / S;
      const int64_t c_end = (slot + 1) * nchunks / S;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const bool add = c != c_begin;  // accumulate into the slot's partials
        const int64_t r0 = c * kRowBlock;
        const int64_t n = std::min(kRowBlock, T - r0);
        const bool full = n == kRowBlock;  // a stable shape for mm_rm_ptr
        // Group columns of g_c, in the low-rank dtype.
        int64_t ld_g = gcols;
        if (g_in_place) {
          ld_g = row_ld(g);
          for (int64_t i = 0; i < ng; ++i)
            g_i[i] = reinterpret_cast<const acc_t*>(gp + r0 * gs0 + L.col0(i) * gs1);
        } else {
          for (int64_t t = 0; t < n; ++t)
            for (int64_t i = 0; i < ng; ++i)
              for (int64_t k = 0; k < size; ++k)
                gbuf[t * gcols + i * size + k] =
                    static_cast<acc_t>(gp[(r0 + t) * gs0 + (L.col0(i) + k) * gs1]);
          for (int64_t i = 0; i < ng; ++i) g_i[i] = gbuf.get() + i * size;
        }
        if (w.dB) {
          // dBᵀ_i += (scaling · s_c,i)ᵀ · g_c,i
          transpose_scaled<acc_t>(tb.get(), sp + r0 * R, n, R, R, static_cast<acc_t>(scaling));
          for (int64_t i = 0; i < ng; ++i)
            mm_rm_ptr<acc_t>(r, size, n, tb.get() + i * r * n, n, g_i[i], ld_g,
                             dBt_parts.get() + (slot * ng + i) * r * size, size, add,
                             vary_k(full));
        }
        if (!need_dS) continue;
        for (int64_t i = 0; i < ng; ++i)
          mm_rm_ptr<acc_t>(n, r, size, g_i[i], ld_g, B_sc.get() + i * size * r, r,
                           dS.get() + i * r, R, false, vary_m(full));
        if (need_lanes) mask_lanes(mask, r0, n, in, lanes.get());
        const uint16_t* lp = need_lanes ? lanes.get() : nullptr;
        if (w.dA) {
          // dA += dS_cᵀ · dropout(x_c)
          transpose_scaled<acc_t>(tb.get(), dS.get(), n, R, R, acc_t(1));
          const acc_t* xsrc = reinterpret_cast<const acc_t*>(xp + r0 * xs0);
          int64_t ld_x = x_in_place ? row_ld(x) : in;
          if (!x_in_place) {
            load_rows<scalar_t, acc_t>(xp, xs0, xs1, r0, n, in, xbuf.get(), lp, lane_ld,
                                       lane_mask);
            xsrc = xbuf.get();
          }
          mm_rm_ptr<acc_t>(R, in, n, tb.get(), n, xsrc, ld_x, dAp + slot * R * in, in, add,
                           vary_k(full));
        }
        if (w.dx) {
          // dx_c = mask ⊙ (dS_c·A) · keep_scale; the frozen g·W is added later.
          acc_t* dst = kSame ? reinterpret_cast<acc_t*>(dxp + r0 * in) : xbuf.get();
          mm_rm_ptr<acc_t>(n, in, R, dS.get(), R, ap, in, dst, in, false, vary_m(full));
          if (lp)
            for (int64_t t = 0; t < n; ++t)
              mask_mul(dst + t * in, dst + t * in, lp + t * lane_ld, in, lane_mask.thr,
                       lane_mask.scale);
          if constexpr (!kSame)  // one rounding to the half dtype
            for (int64_t e = 0; e < n * in; ++e) dxp[r0 * in + e] = static_cast<scalar_t>(dst[e]);
        }
      }
    }
  };
  if (S == 1)
    run(0, 1);  // no parallel region for one slot
  else
    at::parallel_for(0, S, 1, run);
  if (w.dA) dA_acc = S == 1 ? dA_parts : sum_slots<acc_t>(dA_parts);
  if (w.dB) {  // dB[i·size + c, k] = Σ_slot dBt_parts[slot, i, k, c], slots in order
    dB_acc = at::empty({gcols, r}, acc_opts);
    const acc_t* p = dBt_parts.get();
    acc_t* o = dB_acc.data_ptr<acc_t>();
    const int64_t per_slot = ng * r * size;
    for (int64_t i = 0; i < ng; ++i)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t c = 0; c < size; ++c) {
          const int64_t e = (i * r + k) * size + c;
          acc_t v = S ? p[e] : acc_t(0);
          for (int64_t q = 1; q < S; ++q) v += p[q * per_slot + e];
          o[(i * size + c) * r + k] = v;
        }
  }
}

// The branch's gradients as the backward ops return them. dx holds the
// branch's dx term when `lowrank_dx` (asked for, with low-rank work to do);
// otherwise it is empty and the caller completes it. dA and dB are computed
// where asked for, zeros when there is no low-rank work, empty when not
// asked for; in the parameters' dtypes.
struct BranchGrads {
  Tensor dx, dA, dB;
  bool lowrank_dx = false;
};

inline BranchGrads branch_grads(const char* op, const LinearBwdWants& want, const Tensor& grad,
                                const Tensor& x, const Tensor& lora_A, const Tensor& lora_B,
                                const Tensor& s, const Tensor& seed, double scaling,
                                double dropout_p, const LinearShapes& d) {
  const int64_t T = d.T, in = d.in, out = d.out, R = lora_A.size(0);
  const bool lowrank = R > 0 && T > 0 && in > 0 && out > 0;
  const Wants w{want.dx && lowrank, want.dA && lowrank, want.dB && lowrank};
  const MaskParams mask =
      (w.dx || w.dA) ? make_mask_params(op, seed, dropout_p) : MaskParams{};
  BranchGrads out_grads;
  out_grads.lowrank_dx = w.dx;
  out_grads.dx = w.dx ? at::empty({T, in}, grad.options()) : grad.new_empty({0});
  out_grads.dA = w.dA ? Tensor() : zero_grad_or_empty(want.dA, lora_A);
  out_grads.dB = w.dB ? Tensor() : zero_grad_or_empty(want.dB, lora_B);
  if (w.dx || w.dA || w.dB) {
    const auto lt = lowrank_dtype(grad.scalar_type());
    const Tensor A_l = lora_A.to(lt).contiguous();
    const Tensor B_l = lora_B.to(lt).contiguous();
    Tensor dA_acc, dB_acc;
    const auto st = grad.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "lowrank_backward", [&] {
      lowrank_backward<scalar_t>(grad, x, A_l, B_l, s, d.L, scaling, mask, w, out_grads.dx,
                                 dA_acc, dB_acc);
    });
    if (w.dA) out_grads.dA = dA_acc.to(lora_A.scalar_type()).contiguous();
    if (w.dB) out_grads.dB = dB_acc.to(lora_B.scalar_type()).contiguous();
  }
  return out_grads;
}

}  // namespace cpu
}  // namespace lora_kernels
