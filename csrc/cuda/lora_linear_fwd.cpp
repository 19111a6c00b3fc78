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
#include "lowrank_forward.h"

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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    lowrank_forward<scalar_t>(x, A_l, B_l, mask, scaling, has_bias ? bias_c : Tensor(), false,
                              s, y);
  });
  // y += x·Wᵀ: cuBLAS, accumulating into y (beta = 1).
  add_frozen_linear(y, x, weight, fan_in_fan_out);
  return {y, s};
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::lora_linear_fwd, and the cuda backend's
// handle on it (lora_kernels_cuda::lora_linear_fwd, for use_backend("cuda") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("lora_linear_fwd", below_autograd<&lora_linear_fwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("lora_linear_fwd", below_autograd<&lora_linear_fwd_impl>);
}

}  // namespace cuda
}  // namespace lora_kernels
