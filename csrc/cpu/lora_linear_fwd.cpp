// lora_linear_fwd: y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·Bᵀ, group by group,
// and s = dropout(x)·Aᵀ for backward.
//
// Memory plan
//   * y (tokens×out) is the only tokens×out tensor, and it is written once
//     by the low-rank pass and then completed by the frozen GEMM:
//       1. one parallel loop over FIXED row blocks of x (kRowBlock rows,
//          independent of the thread count): the block's mask is
//          regenerated, dropout(x_blk) goes into a per-thread buffer
//          (kRowBlock × in), s_blk = buffer·Aᵀ, and
//          y_blk = [s_blk,i | 1]·[scaling·B_iᵀ ; bias_i] per group (one
//          GEMM writes bias + update; bias only on groups without one).
//          The GEMMs inside the loop are single-threaded micro-kernel/BLAS
//          calls on cache-sized blocks (mm_rm_ptr in common.h), on raw
//          pointers and plain buffers: a small call (one block, no parallel
//          region) pays for its arithmetic, not for tensor setup.
//       2. y += x·Wᵀ: one multithreaded BLAS GEMM with beta = 1. This is the
//          same work as the plain layer's addmm(bias, x, Wᵀ) (which also
//          writes the broadcast bias into y and accumulates with beta = 1),
//          so the low-rank update costs no extra pass over y.
//   * s (tokens × r·len(groups)) is returned and kept by the caller for
//     backward (dB needs it; it is tiny next to x). It is float32 for half
//     inputs, x's dtype otherwise.
//   * The dropout mask is never stored: it is a pure function of
//     (seed, p, element position) and backward regenerates it. Dropped x
//     exists only one row block at a time per thread; with p == 0, no
//     dtype conversion and contiguous rows, x is read in place.
//   * Every row block is computed the same way whatever thread runs it, so
//     the result is bitwise independent of the thread count.
//   * Half inputs: A, B and the bias are widened to float32 once (r×in,
//     out×r, out), the low-rank products are float32, y_blk is rounded once
//     before the frozen GEMM accumulates into it.
#include <torch/library.h>

#include "../below_autograd.h"
#include "../frozen_layer.h"
#include "common.h"
#include "lowrank_forward.h"

namespace lora_kernels {
namespace cpu {
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
  const MaskParams mask = make_mask_params(kOp, seed, dropout_p);

  const int64_t R = lora_A.size(0);
  if (T == 0 || R == 0 || in == 0)
    return linear_fwd_without_lowrank(x, weight, bias, R, fan_in_fan_out);
  const auto lt = lowrank_dtype(x.scalar_type());
  Tensor s = at::empty({T, R}, x.options().dtype(lt));
  const Tensor A_l = lora_A.to(lt).contiguous();
  const Tensor B_l = lora_B.to(lt).contiguous();
  Tensor y = at::empty({T, out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    lowrank_forward<scalar_t>(x, has_bias ? *bias : Tensor(), Tensor(), y, s, A_l, B_l, L,
                              scaling, mask);
  });
  // Phase 2: the frozen GEMM accumulates into y (multithreaded BLAS).
  add_frozen_linear(y, x, weight, fan_in_fan_out);
  return {y, s};
}

}  // namespace

// The dispatcher's CPU kernel of lora_kernels::lora_linear_fwd, and the cpu backend's
// handle on it (lora_kernels_cpu::lora_linear_fwd, for use_backend("cpu") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("lora_linear_fwd", below_autograd_this_thread<&lora_linear_fwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("lora_linear_fwd", below_autograd_this_thread<&lora_linear_fwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
