// lora_linear_bwd on CUDA: gradients of y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·Bᵀ.
//
//   dS   = scaling · g·B_full                   (tokens × R)
//   dB   = scaling · gᵀ·s  (B_full's layout, ungrouped to lora_B's rows)
//   dA   = dSᵀ · dropout(x)
//   dx   = g·W  +  mask ⊙ (dS·A) · keep_scale
//   dW   = gᵀ·x  (xᵀ·g with fan_in_fan_out),   dbias = Σ_tokens g
//
// Memory plan
//   * Inputs kept by the forward: s (tokens × R, for dB), x only when dA or
//     dW is asked for (else it may be empty), and the 8-byte seed; the mask
//     is regenerated here, never stored or loaded.
//   * dS and dB come from ONE read of g (kernels/rank_r_grads.cuh): each
//     block reduces its g tiles into a dS partial per column chunk and a dB
//     partial per row slot; the partials (chunks·tokens·R + slots·out·R, a
//     few MB) are summed in a fixed order, with the scaling, into dS
//     (tokens × R) and dB. Nothing tokens × out is made.
//   * dA = dSᵀ·(x ⊙ m) is one pass over x with the mask applied as x loads
//     (kernels/lowrank_da.cuh), partials per split of the tokens (R × in
//     each), summed in a fixed order.
//   * dx (tokens × in) is the only tokens × in tensor written: first
//     dx = m ⊙ (dS·A) · keep_scale (kernels/rank_update.cuh, one write, the
//     mask regenerated per tile), then ONE cuBLAS GEMM dx += g·W through
//     ATen (addmm_ with beta = 1). dW = gᵀ·x is one cuBLAS GEMM, dbias an
//     ATen column sum, each only when asked for.
//   * Only what output_mask asks for is computed; the others are empty.
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "../below_autograd.h"
#include "../frozen_layer.h"
#include "common.h"
#include "lowrank_backward.h"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "lora_linear_bwd";

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_impl(
    const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& s, const Tensor& seed, double scaling, double dropout_p,
    bool fan_in_fan_out, int64_t num_groups, at::IntArrayRef groups,
    c10::List<bool> output_mask) {
  const LinearBwdWants want = linear_bwd_wants(kOp, output_mask);
  const LinearShapes d =
      check_linear_bwd<DeviceChecks>(kOp, want, grad, x, weight, lora_A, lora_B, s, dropout_p,
                                     fan_in_fan_out, num_groups, groups);
  const c10::cuda::CUDAGuard guard(grad.device());
  Tensor dw = linear_dweight(want.dw, grad, x, weight, fan_in_fan_out);
  Tensor db = want.db ? at::sum(grad, {0}) : grad.new_empty({0});
  BranchGrads b = branch_grads(kOp, want, grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, d);
  add_frozen_dx(b.dx, b.lowrank_dx, want.dx, grad, weight, fan_in_fan_out);
  return {b.dx, dw, db, b.dA, b.dB};
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::lora_linear_bwd, and the cuda backend's
// handle on it (lora_kernels_cuda::lora_linear_bwd, for use_backend("cuda") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("lora_linear_bwd", below_autograd<&lora_linear_bwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("lora_linear_bwd", below_autograd<&lora_linear_bwd_impl>);
}

}  // namespace cuda
}  // namespace lora_kernels
