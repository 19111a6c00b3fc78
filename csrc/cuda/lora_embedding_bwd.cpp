// lora_embedding_bwd on CUDA: gradients of y = W[idx] + scaling · Aᵀ[idx]·Bᵀ.
//
//   dS = scaling · g·B (tokens × r),  dB = scaling · gᵀ·s,
//   dA[:, idx[t]] += dS[t] (skipping padding_idx),  dW[idx[t]] += g[t]
//
// Memory plan
//   * Inputs kept by the forward: the indices and s = Aᵀ[idx] (tokens × r).
//   * dS and dB come from ONE read of g (kernels/rank_r_grads.cuh, the
//     kernel the linear backward uses, with B for B_full): partials per
//     column chunk (dS) and row slot (dB), summed in a fixed order with the
//     scaling; dB is written straight in lora_B's dtype.
//   * dA is the scatter of the small dS over the indices: ATen's dense
//     embedding backward (sorts the indices, sums each row's tokens in a
//     fixed order: deterministic, no atomics), skipping padding_idx; an
//     r × num result, transposed once.
//   * dweight, when asked for, is ATen's dense embedding backward of g (a
//     num × dim tensor).
#include <ATen/ops/embedding_dense_backward.h>
#include <torch/library.h>

#include "../below_autograd.h"
#include "../frozen_layer.h"
#include "common.h"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "lora_embedding_bwd";

std::tuple<Tensor, Tensor, Tensor> lora_embedding_bwd_impl(
    const Tensor& grad, const Tensor& indices, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& s, double scaling, int64_t padding_idx,
    c10::List<bool> output_mask) {
  const EmbeddingBwdWants want = embedding_bwd_wants(kOp, output_mask);
  check_embedding_operands<DeviceChecks>(kOp, indices, weight, lora_A, lora_B);
  check_embedding_bwd<DeviceChecks>(kOp, want, grad, indices, weight, lora_A, s, padding_idx);
  const int64_t T = indices.size(0), num = weight.size(0), dim = weight.size(1),
                r = lora_A.size(0);
  const auto lt = lowrank_dtype(weight.scalar_type());
  const c10::cuda::CUDAGuard guard(weight.device());

  const Tensor dw = embedding_dweight(want.dw, grad, indices, weight, padding_idx);
  if ((!want.dA && !want.dB) || T == 0 || r == 0 || dim == 0)
    return {dw, zero_grad_or_empty(want.dA, lora_A), zero_grad_or_empty(want.dB, lora_B)};
  const Tensor B_l = lora_B.to(lt).contiguous();  // (dim, r)
  const Tensor s_c = want.dB ? s.contiguous() : s;
  check_contiguous(kOp, "lora_B (low-rank dtype)", B_l);
  const Tensor dS = want.dA ? at::empty({T, r}, B_l.options()) : Tensor();
  // dB straight in lora_B's dtype.
  const Tensor dB = want.dB ? at::empty({dim, r}, lora_B.options()) : lora_B.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), kOp, [&] {
    rank_r_grads_into<scalar_t, scalar_t>(grad, B_l, s_c, scaling, dS, want.dB ? dB : Tensor());
  });
  Tensor dA = lora_A.new_empty({0});
  if (want.dA) {
    // dA[k, idx[t]] += dS[t, k] over the tokens (padding_idx skipped).
    const Tensor dA_t = at::embedding_dense_backward(dS, indices, num, padding_idx, false);
    dA = dA_t.t().to(lora_A.scalar_type()).contiguous();
  }
  return {dw, dA, dB};
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::lora_embedding_bwd, and the cuda backend's
// handle on it (lora_kernels_cuda::lora_embedding_bwd, for use_backend("cuda") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("lora_embedding_bwd", below_autograd<&lora_embedding_bwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("lora_embedding_bwd", below_autograd<&lora_embedding_bwd_impl>);
}

}  // namespace cuda
}  // namespace lora_kernels
