// The forward low-rank pass of the CUDA kernels, shared by lora_linear_fwd
// (y = bias + update, then cuBLAS adds x·Wᵀ) and lora_delta_fwd (y holds
// base's values and the update accumulates onto them). The memory plan is
// lora_linear_fwd.cpp's.
#pragma once

#include "common.h"

namespace lora_kernels {
namespace cuda {

// s = dropout(x)·Aᵀ (one pass over x, the mask regenerated as x loads), then
// y = [bias +] scaling · s·B_fullᵀ, or y += scaling · s·B_fullᵀ with
// `accumulate`. A_l (R × in) and B_l (out × R, B_full) in the low-rank dtype,
// contiguous; s (T × R) and y (T × out) contiguous.
template <typename scalar_t>
void lowrank_forward(const Tensor& x, const Tensor& A_l, const Tensor& B_l, const MaskArgs& mask,
                     double scaling, const Tensor& bias, bool accumulate, Tensor& s, Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const Stream stream = current_stream();
  const int64_t T = x.size(0), in = x.size(1), R = A_l.size(0), out = y.size(1);
  // s = dropout(x)·Aᵀ, in `splits` partials over the in features.
  LowrankInArgs<scalar_t> in_args;
  const Tensor xr = bind_rows(x, kInGroup, in_args.x, in_args.ldx, in_args.x_vec);
  in_args.A = A_l.data_ptr<acc_t>();
  in_args.T = T;
  in_args.K = in;
  in_args.R = R;
  in_args.mask = mask;
  plan_lowrank_in(T, in, R, target_blocks(4), &in_args.splits, &in_args.tiles_per_split);
  Tensor parts = in_args.splits > 1 ? parts_buffer<acc_t>(x, in_args.splits, T, R) : s;
  in_args.out = parts.data_ptr<acc_t>();
  launch_lowrank_in<scalar_t>(in_args, stream);
  if (in_args.splits > 1) sum_parts_into<acc_t, acc_t>(parts, 1.0, s);

  // y = [bias +] scaling · s·B_fullᵀ, or y += it
  RankUpdateArgs<scalar_t, acc_t> up;
  up.set_L(s.data_ptr<acc_t>(), R, 1);
  up.set_Rm(B_l.data_ptr<acc_t>(), R, 1);
  up.set_out(y.data_ptr<scalar_t>(), out, 1);
  up.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  up.accumulate = accumulate;
  up.T = T;
  up.N = out;
  up.R = R;
  up.alpha = static_cast<acc_t>(scaling);
  launch_rank_update<scalar_t, acc_t>(up, stream);
}

}  // namespace cuda
}  // namespace lora_kernels
