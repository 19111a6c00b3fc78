// lora_delta_bwd on CUDA: the gradients of lora_delta_fwd's branch (base's
// gradient is g itself, passed on by the autograd):
//
//   dS = scaling · g·B_full,  dB = scaling · gᵀ·s,  dA = dSᵀ·(x ⊙ m),
//   dx = m ⊙ (dS·A) · keep_scale.
//
// Memory plan: lora_linear_bwd's low-rank pass (lowrank_backward.h) without
// its cuBLAS GEMMs: dS and dB from one read of g, dA from one pass over x
// (the mask applied as x loads), dx written once; fixed-order partial sums,
// no atomics.
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"
#include "lowrank_backward.h"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "lora_delta_bwd";

std::tuple<Tensor, Tensor, Tensor> lora_delta_bwd_impl(
    const Tensor& grad, const Tensor& x, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& s, const Tensor& seed, double scaling, double dropout_p, int64_t num_groups,
    at::IntArrayRef groups, c10::List<bool> output_mask) {
  const LinearBwdWants want = delta_bwd_wants(kOp, output_mask);
  const LinearShapes d = check_delta_bwd<DeviceChecks>(kOp, want, grad, x, lora_A, lora_B, s,
                                                       dropout_p, num_groups, groups);
  const c10::cuda::CUDAGuard guard(grad.device());
  BranchGrads b = branch_grads(kOp, want, grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, d);
  if (want.dx && !b.lowrank_dx) b.dx = at::zeros({d.T, d.in}, grad.options());
  return {b.dx, b.dA, b.dB};
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::lora_delta_bwd, and the cuda
// backend's handle on it (lora_kernels_cuda::lora_delta_bwd).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("lora_delta_bwd", below_autograd<&lora_delta_bwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("lora_delta_bwd", below_autograd<&lora_delta_bwd_impl>);
}

}  // namespace cuda
}  // namespace lora_kernels
