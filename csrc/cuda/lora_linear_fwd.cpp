// lora_linear_fwd on CUDA: y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·Bᵀ,
// group by group, and s = dropout(x)·Aᵀ for backward.
//
// Memory plan
//   * s (tokens × r·len(groups)) is computed first, by one pass over x
//     (kernels/lowrank_in.cuh): the dropout mask is regenerated from Philox
//     as x is loaded and applied in registers; it is never stored, and no
//     dropped copy of x exists. s is returned and kept by the caller for
//     backward (dB needs it; it is tiny next to x): float32 for half
//     inputs, x's dtype otherwise. When the token rows alone cannot fill the
//     GPU, the in features are split and the splits' partials (splits ×
//     tokens × R) are summed in a fixed order.
//   * y (tokens × out) is the only tokens × out tensor, written once and
//     then completed in place:
//       1. y = bias + scaling · s·B_fullᵀ (kernels/rank_update.cuh): one
//          write of y, the bias in this epilogue, the rank-R product
//          accumulated in fp32 (fp64 for fp64) and rounded once;
//       2. y += x·Wᵀ: ONE cuBLAS GEMM through ATen (addmm_ with beta = 1),
//          which reads y as its C operand. This is the same GEMM as the
//          plain layer's, so the low-rank branch costs no extra tokens × out
//          pass and no temporary.
//     B_full is lora_B spread over all out features (out × R, zeros where a
//     group has no update; MergedLinear only): the one padded tensor, tiny.
//   * Inputs are read in place when their rows have unit stride (any row
//     stride); other layouts are copied once. A and B are converted to the
//     accumulation dtype once (R × in, out × R).
#include <torch/library.h>

#include "../below_autograd.h"
#include "../frozen_layer.h"
#include "common.h"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "lora_linear_fwd";

std::tuple<Tensor, Tensor> lora_linear_fwd_impl(const Tensor& x, const Tensor& weight,
                                                const std::optional<Tensor>& bias,
                                                const Tensor& lora_A, const Tensor& lora_B,
                                                const Tensor& seed, double scaling,
                                                double dropout_p, bool fan_in_fan_out,
                                                int64_t num_groups, at::IntArrayRef groups) {
  const LinearShapes d = check_linear_fwd<DeviceChecks>(kOp, x, weight, bias, lora_A, lora_B,
                                                        fan_in_fan_out, num_groups, groups);
  const int64_t T = d.T, in = d.in, out = d.out;
  const GroupLayout& L = d.L;
  const bool has_bias = bias.has_value() && bias->defined();
  const c10::cuda::CUDAGuard guard(x.device());
  const MaskArgs mask = make_mask(kOp, seed, dropout_p, x);

  const int64_t R = lora_A.size(0);
  if (T == 0 || R == 0 || in == 0)
    return linear_fwd_without_lowrank(x, weight, bias, R, fan_in_fan_out);
  const auto lt = lowrank_dtype(x.scalar_type());
  Tensor s = at::empty({T, R}, x.options().dtype(lt));
  const Tensor A_l = lora_A.to(lt).contiguous();              // (R, in)
  const Tensor B_l = b_full(lora_B, L, lt);                   // (out, R)
  const Tensor bias_c = has_bias ? bias->contiguous() : Tensor();
  check_contiguous(kOp, "lora_A (low-rank dtype)", A_l);
  check_contiguous(kOp, "B_full", B_l);
  Tensor y = at::empty({T, out}, x.options());
  const Stream stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using acc_t = acc_type<scalar_t>;
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

    // y = bias + scaling · s·B_fullᵀ
    RankUpdateArgs<scalar_t, acc_t> up;
    up.set_L(s.data_ptr<acc_t>(), R, 1);
    up.set_Rm(B_l.data_ptr<acc_t>(), R, 1);
    up.set_out(y.data_ptr<scalar_t>(), out, 1);
    up.bias = has_bias ? bias_c.data_ptr<scalar_t>() : nullptr;
    up.T = T;
    up.N = out;
    up.R = R;
    up.alpha = static_cast<acc_t>(scaling);
    launch_rank_update<scalar_t, acc_t>(up, stream);
  });
  // y += x·Wᵀ: cuBLAS, accumulating into y (beta = 1).
  add_frozen_linear(y, x, weight, fan_in_fan_out);
  return {y, s};
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::lora_linear_fwd, and the cuda backend's
// handle on it (lora_kernels_cuda::lora_linear_fwd, for use_backend("cuda") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("lora_linear_fwd", below_autograd<&lora_linear_fwd_impl>); }
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) { m.impl("lora_linear_fwd", below_autograd<&lora_linear_fwd_impl>); }

}  // namespace cuda
}  // namespace lora_kernels
