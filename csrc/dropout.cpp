// The autograd of dropout (the lora_kernels dropout op: x times the Philox mask
// of lora_kernels/reference.py). The mask is a function of (seed, position)
// only, so the gradient is the same map applied to the incoming gradient:
// nothing but the 8-byte seed is held for backward. The kernels are
// csrc/cpu/dropout.cpp and csrc/cuda/dropout.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_autograd.h"

namespace lora_kernels {
namespace {

auto& dropout_op() {
  static auto op =
      typed_op<Tensor(const Tensor&, const Tensor&, double)>("lora_kernels::dropout");
  return op;
}

class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& seed,
                               double p) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({seed});
    return {dropout_op().call(x, seed, p)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor seed = ctx->get_saved_variables()[0];
    // Differentiable itself (the map is linear), so double backward works.
    return {dropout_op().call(grads[0].contiguous(), seed, ctx->saved_data["p"].toDouble()),
            Tensor(), Tensor()};
  }
};

Tensor dropout_autograd(const Tensor& x, const Tensor& seed, double p) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView below;  // nothing to record
    return dropout_op().call(x, seed, p);
  }
  return DropoutFunction::apply(x, seed, p)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, Autograd, m) { m.impl("dropout", &dropout_autograd); }

}  // namespace lora_kernels
