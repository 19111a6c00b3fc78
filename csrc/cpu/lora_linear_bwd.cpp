// lora_linear_bwd: gradients of y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·Bᵀ.
//
//   dS   = scaling · g[:, cols_i] · B_i            (tokens × r per group i)
//   dB_i = scaling · g[:, cols_i]ᵀ · s_i
//   dA   = dSᵀ · dropout(x)
//   dx   = g · W  +  mask ⊙ (dS · A) · keep_scale
//   dW   = gᵀ · x  (xᵀ · g with fan_in_fan_out),   dbias = Σ_tokens g
//
// Memory plan
//   * Inputs kept by the forward: s (tokens×r, for dB), x only when dA or dW
//     is asked for (else it may be empty), and the 8-byte seed; the mask is
//     regenerated here, never stored.
//   * dx (tokens×in) is the only tokens×in tensor written. It is written once
//     by the low-rank pass below (dx_c = mask ⊙ (dS_c·A) · keep_scale) and
//     then completed by ONE multithreaded BLAS GEMM dx += g·W (beta = 1), so
//     the low-rank part costs no extra pass over dx. dW = gᵀ·x is a single
//     BLAS GEMM too, only when asked for.
//   * Everything low-rank runs in ONE parallel loop over fixed row chunks of
//     kRowBlock tokens: dS_c = g_c·(scaling·B) (a per-thread kRowBlock × r
//     buffer), the dB partial from g_c and s_c, the chunk's mask regenerated
//     once and used both for dA (dS_cᵀ · dropout(x_c)) and for dx_c. The only
//     chunk-sized temporaries are per-thread buffers: dropped x_c
//     (kRowBlock × in) and its 16-bit mask lanes. The GEMMs inside the loop
//     are single-threaded micro-kernel/BLAS calls (mm_rm in common.h).
//   * Determinism: chunks are grouped into a fixed number of slots (a
//     function of the shapes only, never of the thread count). Each slot
//     accumulates its dA/dB partial over its chunks in order, and the
//     partials are summed slot by slot in a fixed order, so dA and dB are
//     bitwise the same for any number of threads. Slot partials cost
//     slots × (|A| + |B|) elements, bounded by kSlotBytes.
//   * Only what output_mask asks for is computed; the others are empty.
#include <torch/library.h>

#include "../below_autograd.h"
#include "../frozen_layer.h"
#include "common.h"
#include "lowrank_backward.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "lora_linear_bwd";
// dbias = Σ_tokens grad, column block by column block: each block is one
// single-threaded ATen sum over all tokens, so the result does not depend on
// the thread count (a plain grad.sum(0) may split the tokens across threads).
Tensor column_sum(const Tensor& grad) {
  constexpr int64_t kCols = 256;
  const int64_t out = grad.size(1);
  Tensor db = at::empty({out}, grad.options());
  at::parallel_for(0, (out + kCols - 1) / kCols, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCols, n = std::min(kCols, out - c0);
      Tensor dst = db.narrow(0, c0, n);
      at::sum_out(dst, grad.narrow(1, c0, n), {0});
    }
  });
  return db;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_impl(
    const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
    const Tensor& lora_B, const Tensor& s, const Tensor& seed, double scaling, double dropout_p,
    bool fan_in_fan_out, int64_t num_groups, at::IntArrayRef groups,
    c10::List<bool> output_mask) {
  const LinearBwdWants want = linear_bwd_wants(kOp, output_mask);
  const LinearShapes d =
      check_linear_bwd<DeviceChecks>(kOp, want, grad, x, weight, lora_A, lora_B, s, dropout_p,
                                     fan_in_fan_out, num_groups, groups);
  Tensor dw = linear_dweight(want.dw, grad, x, weight, fan_in_fan_out);
  Tensor db = want.db ? column_sum(grad) : grad.new_empty({0});
  BranchGrads b = branch_grads(kOp, want, grad, x, lora_A, lora_B, s, seed, scaling, dropout_p, d);
  add_frozen_dx(b.dx, b.lowrank_dx, want.dx, grad, weight, fan_in_fan_out);
  return {b.dx, dw, db, b.dA, b.dB};
}

}  // namespace

// The dispatcher's CPU kernel of lora_kernels::lora_linear_bwd, and the cpu backend's
// handle on it (lora_kernels_cpu::lora_linear_bwd, for use_backend("cpu") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("lora_linear_bwd", below_autograd_this_thread<&lora_linear_bwd_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("lora_linear_bwd", below_autograd_this_thread<&lora_linear_bwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
