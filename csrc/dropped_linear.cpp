// dropped_linear / dropped_linear_bwd_ (contract and math: dropped_linear.h):
// the dense form as the kernel of every device and dtype without one of its
// own. The CPU kernel is csrc/cpu/dropped_linear.cpp.
#include <torch/library.h>

#include "dropped_linear.h"

namespace lora_kernels {
namespace {

Tensor dropped_linear(const Tensor& input, const Tensor& x, const Tensor& weight,
                      const Tensor& seed, double p, double beta, double alpha) {
  check_dropped_linear("dropped_linear", input, x, weight, beta);
  check_dropout_p("dropped_linear", p);
  return dropped_linear_dense(input, x, weight, seed, p, beta, alpha);
}

void dropped_linear_bwd_(const Tensor& dx, const Tensor& grad, const Tensor& weight,
                         const Tensor& seed, double p, double alpha) {
  check_dropped_linear_bwd("dropped_linear_bwd_", dx, grad, weight);
  check_dropout_p("dropped_linear_bwd_", p);
  if (p > 0.0 && dx.numel() > 0) dropped_linear_bwd_dense(dx, grad, weight, seed, p, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, CompositeExplicitAutograd, m) {
  m.impl("dropped_linear", &dropped_linear);
  m.impl("dropped_linear_bwd_", &dropped_linear_bwd_);
}

}  // namespace lora_kernels
