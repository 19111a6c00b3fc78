// lora_delta_fwd: y = base + scaling · dropout(x)·Aᵀ·Bᵀ, group by group, and
// s = dropout(x)·Aᵀ for backward: the LoRA branch around a base layer that is
// computed elsewhere (a bitsandbytes 4-bit layer, say), whose output is
// `base`.
//
// Memory plan: as lora_linear_fwd's low-rank pass (lowrank_forward.h), with
// base in place of the frozen GEMM. y (tokens × out) is written once: each
// row block starts from base's rows and the rank update accumulates onto
// them (for half dtypes in float32, rounded once). s (tokens × r, float32
// for half inputs) is returned for backward; the dropout mask is never
// stored; x is read in place when it can be.
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"
#include "lowrank_forward.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "lora_delta_fwd";

std::tuple<Tensor, Tensor> lora_delta_fwd_impl(const Tensor& x, const Tensor& base,
                                               const Tensor& lora_A, const Tensor& lora_B,
                                               const Tensor& seed, double scaling,
                                               double dropout_p, int64_t num_groups,
                                               at::IntArrayRef groups) {
  const LinearShapes d =
      check_delta_fwd<DeviceChecks>(kOp, x, base, lora_A, lora_B, num_groups, groups);
  const MaskParams mask = make_mask_params(kOp, seed, dropout_p);
  const int64_t T = d.T, in = d.in, out = d.out, R = lora_A.size(0);
  const auto lt = lowrank_dtype(x.scalar_type());
  if (T == 0 || R == 0 || in == 0 || out == 0)
    return {base.clone(at::MemoryFormat::Contiguous), at::zeros({T, R}, x.options().dtype(lt))};
  Tensor s = at::empty({T, R}, x.options().dtype(lt));
  const Tensor A_l = lora_A.to(lt).contiguous();
  const Tensor B_l = lora_B.to(lt).contiguous();
  Tensor y = at::empty({T, out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    lowrank_forward<scalar_t>(x, Tensor(), base, y, s, A_l, B_l, d.L, scaling, mask);
  });
  return {y, s};
}

}  // namespace

// The dispatcher's CPU kernel of lora_kernels::lora_delta_fwd, and the cpu
// backend's handle on it (lora_kernels_cpu::lora_delta_fwd).
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("lora_delta_fwd", below_autograd_this_thread<&lora_delta_fwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("lora_delta_fwd", below_autograd_this_thread<&lora_delta_fwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
