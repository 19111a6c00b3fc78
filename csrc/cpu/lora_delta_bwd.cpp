// lora_delta_bwd: the gradients of lora_delta_fwd's branch,
//
//   dS = scaling · g_i · B_i      dB_i = scaling · g_iᵀ · s_i
//   dA = dSᵀ · dropout(x)         dx   = mask ⊙ (dS · A) · keep_scale
//
// (base's gradient is g itself, passed on by the autograd, not computed
// here). Memory plan: lora_linear_bwd's low-rank pass (lowrank_backward.h):
// s, x only when dA is asked for, and the 8-byte seed are what the forward
// kept; the mask is regenerated; dx is written once; dA and dB come from
// fixed slot partials summed in a fixed order (bitwise the same for any
// thread count).
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"
#include "lowrank_backward.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "lora_delta_bwd";

std::tuple<Tensor, Tensor, Tensor> lora_delta_bwd_impl(
    const Tensor& grad, const Tensor& x, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& s, const Tensor& seed, double scaling, double dropout_p, int64_t num_groups,
    at::IntArrayRef groups, c10::List<bool> output_mask) {
  const LinearBwdWants want = delta_bwd_wants(kOp, output_mask);
  const LinearShapes d = check_delta_bwd<DeviceChecks>(kOp, want, grad, x, lora_A, lora_B, s,
                                                       dropout_p, num_groups, groups);
  BranchGrads b = branch_grads(kOp, want, grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, d);
  if (want.dx && !b.lowrank_dx) b.dx = at::zeros({d.T, d.in}, grad.options());
  return {b.dx, b.dA, b.dB};
}

}  // namespace

// The dispatcher's CPU kernel of lora_kernels::lora_delta_bwd, and the cpu
// backend's handle on it (lora_kernels_cpu::lora_delta_bwd).
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("lora_delta_bwd", below_autograd_this_thread<&lora_delta_bwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("lora_delta_bwd", below_autograd_this_thread<&lora_delta_bwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
