// dropped_linear / dropped_linear_bwd_: the frozen GEMM restricted to the
// entries dropout drops. With D the dropout mask of x's shape (1 kept, 0
// dropped; lora_kernels/reference.py, the mask the dropout op multiplies by)
// and W (out, in):
//
//   dropped_linear(input, x, W, seed, p, beta, alpha)
//       = beta·input + alpha·((1 − D) ⊙ x)·Wᵀ            (tokens × out)
//   dropped_linear_bwd_(dx, grad, W, seed, p, alpha):
//       dx += alpha·(1 − D) ⊙ (grad·W)                    (tokens × in)
//
// the second being the first's adjoint in x. Why: with k = the dropout's
// keep scale, x̂ = k·D ⊙ x, so
//
//   x̂·Wᵀ = k·(x·Wᵀ − ((1 − D) ⊙ x)·Wᵀ)
//   D ⊙ (h·W)·k + g·W = (g + k·h)·W − k·(1 − D) ⊙ (h·W),
//
// and a layer that needs both x·Wᵀ and x̂·Wᵀ (DoRA with dropout on) gets the
// second from the first at the cost of the dropped fraction p of a GEMM. The
// CPU kernel (csrc/cpu/dropped_linear.cpp) does exactly that; the dense form
// here, a full GEMM on the masked operand, is the kernel of every other
// device and dtype. beta = 0 ignores input, as addmm does. No autograd: the
// callers are the composites below DoRA's autograd (csrc/dora_linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include "op_autograd.h"
#include "op_checks.h"

namespace lora_kernels {

inline void check_dropped_linear(const char* op, const Tensor& input, const Tensor& x,
                                 const Tensor& weight, double beta) {
  check_dim(op, "x", x, 2);
  check_dim(op, "weight", weight, 2);
  check_floating(op, "x", x);
  check_same_dtype(op, "weight", weight, "x", x);
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must have shape [out, ", x.size(1),
              "] (x's features), got ", shape_str(weight));
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on x's device (", x.device(),
              "), got ", weight.device());
  if (beta != 0.0) {
    check_shape(op, "input", input, {x.size(0), weight.size(0)}, "tokens, out");
    check_same_dtype(op, "input", input, "x", x);
    TORCH_CHECK(input.device() == x.device(), op, ": input must be on x's device (",
                x.device(), "), got ", input.device());
  }
}

inline void check_dropped_linear_bwd(const char* op, const Tensor& dx, const Tensor& grad,
                                     const Tensor& weight) {
  check_dim(op, "dx", dx, 2);
  check_dim(op, "weight", weight, 2);
  check_floating(op, "dx", dx);
  check_same_dtype(op, "weight", weight, "dx", dx);
  check_same_dtype(op, "grad", grad, "dx", dx);
  TORCH_CHECK(weight.size(1) == dx.size(1), op, ": weight must have shape [out, ", dx.size(1),
              "] (dx's features), got ", shape_str(weight));
  check_shape(op, "grad", grad, {dx.size(0), weight.size(0)}, "tokens, out");
  TORCH_CHECK(weight.device() == dx.device() && grad.device() == dx.device(), op,
              ": grad and weight must be on dx's device (", dx.device(), "), got ",
              grad.device(), " and ", weight.device());
}

// 1 − D of x's shape, in x's dtype, from the dropout op on ones: D·k is what
// dropout multiplies by, so its zeros are the dropped entries.
inline Tensor dropped_entries(const Tensor& like, const Tensor& seed, double p) {
  static auto dropout =
      typed_op<Tensor(const Tensor&, const Tensor&, double)>("lora_kernels::dropout");
  return dropout.call(at::ones_like(like, at::MemoryFormat::Contiguous), seed, p).eq(0)
      .to(like.scalar_type());
}

inline Tensor dropped_linear_dense(const Tensor& input, const Tensor& x, const Tensor& weight,
                                   const Tensor& seed, double p, double beta, double alpha) {
  const Tensor prod = at::mm(x * dropped_entries(x, seed, p), weight.t());
  if (beta == 0.0) return prod.mul_(alpha);
  return at::add(input * beta, prod, alpha);
}

inline void dropped_linear_bwd_dense(const Tensor& dx, const Tensor& grad, const Tensor& weight,
                                     const Tensor& seed, double p, double alpha) {
  dx.add_(at::mm(grad, weight) * dropped_entries(dx, seed, p), alpha);
}

}  // namespace lora_kernels
