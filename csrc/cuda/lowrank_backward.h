// The backward low-rank pass of the CUDA kernels, shared by lora_linear_bwd
// (which adds the frozen layer's gradients) and lora_delta_bwd (the branch
// alone): dS and dB from one read of g, dA = dSᵀ·(x ⊙ m), and the branch's
// dx term m ⊙ (dS·A). The memory plan is lora_linear_bwd.cpp's.
#pragma once

#include "../frozen_layer.h"
#include "common.h"

namespace lora_kernels {
namespace cuda {

struct Wants {
  bool dx, dA, dB;
};

template <typename scalar_t>
void lowrank_backward(const Tensor& g, const Tensor& x, const Tensor& A_l, const Tensor& B_l,
                      const Tensor& s, const GroupLayout& L, double scaling,
                      const MaskArgs& mask, Wants w, Tensor& dx, Tensor& dA, Tensor& dB) {
  using acc_t = acc_type<scalar_t>;
  const Stream stream = current_stream();
  const int64_t T = g.size(0), out = g.size(1), in = A_l.size(1), R = A_l.size(0);
  const auto acc_opts = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  // dS and dB_full from one read of g.
  Tensor dS = (w.dx || w.dA) ? at::empty({T, R}, acc_opts) : Tensor();
  Tensor dB_full = w.dB ? at::empty({out, R}, acc_opts) : Tensor();
  rank_r_grads_into<scalar_t, acc_t>(g, B_l, s, scaling, dS, dB_full);
  if (w.dB) dB = ungroup_b(dB_full, L);

  if (w.dA) {  // dA = dSᵀ·(x ⊙ m)
    LowrankDaArgs<scalar_t> a;
    const Tensor xr =
        bind_rows(x, da_tile<acc_t>() * da_tile<acc_t>() / kDaThreads, a.x, a.ldx, a.x_vec);
    a.dS = dS.data_ptr<acc_t>();
    a.T = T;
    a.K = in;
    a.R = R;
    a.mask = mask;
    plan_lowrank_da(T, in, R, da_tile<acc_t>(), target_blocks(2), &a.splits, &a.rows_per_split);
    Tensor parts = parts_buffer<acc_t>(x, a.splits, R, in);
    a.parts = parts.data_ptr<acc_t>();
    launch_lowrank_da<scalar_t>(a, stream);
    dA = at::empty({R, in}, acc_opts);
    sum_parts_into<acc_t, acc_t>(parts, 1.0, dA);
  }

  if (w.dx) {  // dx = m ⊙ (dS·A) · keep_scale; the frozen g·W is added by the caller
    dx = at::empty({T, in}, g.options());
    RankUpdateArgs<scalar_t, acc_t> up;
    up.set_L(dS.data_ptr<acc_t>(), R, 1);
    up.set_Rm(A_l.data_ptr<acc_t>(), 1, in);  // A (R × in) read as an in × R matrix
    up.set_out(dx.data_ptr<scalar_t>(), in, 1);
    up.T = T;
    up.N = in;
    up.R = R;
    up.alpha = acc_t(1);
    up.mask = mask;
    launch_rank_update<scalar_t, acc_t>(up, stream);
  }
}

// The branch's gradients as the backward ops return them. dx holds the
// branch's dx term when `lowrank_dx` (asked for, with low-rank work to do);
// otherwise it is empty and the caller completes it. dA and dB are computed
// where asked for, zeros when there is no low-rank work, empty when not
// asked for; in the parameters' dtypes. The caller holds the device guard.
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
  const MaskArgs mask = (w.dx || w.dA) ? make_mask(op, seed, dropout_p, grad) : MaskArgs{};
  BranchGrads b;
  b.lowrank_dx = w.dx;
  b.dx = grad.new_empty({0});
  b.dA = w.dA ? Tensor() : zero_grad_or_empty(want.dA, lora_A);
  b.dB = w.dB ? Tensor() : zero_grad_or_empty(want.dB, lora_B);
  if (w.dx || w.dA || w.dB) {
    const auto lt = lowrank_dtype(grad.scalar_type());
    const Tensor A_l = lora_A.to(lt).contiguous();  // (R, in)
    const Tensor B_l = b_full(lora_B, d.L, lt);     // (out, R)
    const Tensor s_c = w.dB ? s.contiguous() : s;
    check_contiguous(op, "lora_A (low-rank dtype)", A_l);
    check_contiguous(op, "B_full", B_l);
    Tensor dA_acc, dB_acc;
    const auto st = grad.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "lowrank_backward", [&] {
      lowrank_backward<scalar_t>(grad, x, A_l, B_l, s_c, d.L, scaling, mask, w, b.dx, dA_acc,
                                 dB_acc);
    });
    if (w.dA) b.dA = dA_acc.to(lora_A.scalar_type()).contiguous();
    if (w.dB) b.dB = dB_acc.to(lora_B.scalar_type()).contiguous();
  }
  return b;
}

}  // namespace cuda
}  // namespace lora_kernels
