// lora_delta_fwd on CUDA: y = base + scaling · dropout(x)·Aᵀ·Bᵀ, group by
// group, and s = dropout(x)·Aᵀ for backward: the LoRA branch around a base
// layer computed elsewhere, whose output is `base`.
//
// Memory plan: lora_linear_fwd's low-rank pass (lowrank_forward.h) with
// base in place of the frozen GEMM: s (tokens × R, fp32 for half inputs) by
// one pass over x, the mask regenerated as x loads and never stored; y
// starts as a copy of base and the rank update accumulates onto it
// (kernels/rank_update.cuh with `accumulate`, fp32 accumulation, one
// rounding). No tokens × in or tokens × out temporary besides y.
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"
#include "lowrank_forward.h"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "lora_delta_fwd";

std::tuple<Tensor, Tensor> lora_delta_fwd_impl(const Tensor& x, const Tensor& base,
                                               const Tensor& lora_A, const Tensor& lora_B,
                                               const Tensor& seed, double scaling,
                                               double dropout_p, int64_t num_groups,
                                               at::IntArrayRef groups) {
  const LinearShapes d =
      check_delta_fwd<DeviceChecks>(kOp, x, base, lora_A, lora_B, num_groups, groups);
  const c10::cuda::CUDAGuard guard(x.device());
  const MaskArgs mask = make_mask(kOp, seed, dropout_p, x);
  const int64_t T = d.T, in = d.in, out = d.out, R = lora_A.size(0);
  const auto lt = lowrank_dtype(x.scalar_type());
  Tensor y = base.clone(at::MemoryFormat::Contiguous);
  if (T == 0 || R == 0 || in == 0 || out == 0)
    return {y, at::zeros({T, R}, x.options().dtype(lt))};
  Tensor s = at::empty({T, R}, x.options().dtype(lt));
  const Tensor A_l = lora_A.to(lt).contiguous();  // (R, in)
  const Tensor B_l = b_full(lora_B, d.L, lt);     // (out, R)
  check_contiguous(kOp, "lora_A (low-rank dtype)", A_l);
  check_contiguous(kOp, "B_full", B_l);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    lowrank_forward<scalar_t>(x, A_l, B_l, mask, scaling, Tensor(), true, s, y);
  });
  return {y, s};
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::lora_delta_fwd, and the cuda
// backend's handle on it (lora_kernels_cuda::lora_delta_fwd).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("lora_delta_fwd", below_autograd<&lora_delta_fwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("lora_delta_fwd", below_autograd<&lora_delta_fwd_impl>);
}

}  // namespace cuda
}  // namespace lora_kernels
