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

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "lora_linear_bwd";

struct Wants {
  bool dx, dA, dB;
};

template <typename scalar_t>
void lowrank_backward(const Tensor& g, const Tensor& x, const Tensor& A_l, const Tensor& B_l,
                      const Tensor& s, const GroupLayout& L, double scaling,
                      const MaskArgs& mask, Wants w, Tensor& dx, Tensor& dA, Tensor& dB) {
  using acc_t = acc_type<scalar_t>;
  const Stream stream = current_stream();
  const int64_t T = g.size(0), out = g.size(1), in = A_l.size(1), R = A_l.size(0);
  const auto acc_opts = g.options().dtype(c10::CppTypeToScalarType<acc_t>::value);

  // dS and dB_full from one read of g.
  Tensor dS = (w.dx || w.dA) ? at::empty({T, R}, acc_opts) : Tensor();
  Tensor dB_full = w.dB ? at::empty({out, R}, acc_opts) : Tensor();
  rank_r_grads_into<scalar_t, acc_t>(g, B_l, s, scaling, dS, dB_full);
  if (w.dB) dB = ungroup_b(dB_full, L);

  if (w.dA) {  // dA = dSᵀ·(x ⊙ m)
    LowrankDaArgs<scalar_t> a;
    const Tensor xr =
        bind_rows(x, da_tile<acc_t>() * da_tile<acc_t>() / kDaThreads, a.x, a.ldx, a.x_vec);
    a.dS = dS.data_ptr<acc_t>();
    a.T = T;
    a.K = in;
    a.R = R;
    a.mask = mask;
    plan_lowrank_da(T, in, R, da_tile<acc_t>(), target_blocks(2), &a.splits, &a.rows_per_split);
    Tensor parts = parts_buffer<acc_t>(x, a.splits, R, in);
    a.parts = parts.data_ptr<acc_t>();
    launch_lowrank_da<scalar_t>(a, stream);
    dA = at::empty({R, in}, acc_opts);
    sum_parts_into<acc_t, acc_t>(parts, 1.0, dA);
  }

  if (w.dx) {  // dx = m ⊙ (dS·A) · keep_scale; the frozen g·W is added by the caller
    dx = at::empty({T, in}, g.options());
    RankUpdateArgs<scalar_t, acc_t> up;
    up.set_L(dS.data_ptr<acc_t>(), R, 1);
    up.set_Rm(A_l.data_ptr<acc_t>(), 1, in);  // A (R × in) read as an in × R matrix
    up.set_out(dx.data_ptr<scalar_t>(), in, 1);
    up.T = T;
    up.N = in;
    up.R = R;
    up.alpha = acc_t(1);
    up.mask = mask;
    launch_rank_update<scalar_t, acc_t>(up, stream);
  }
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
  const int64_t T = d.T, in = d.in, out = d.out, R = lora_A.size(0);
  const GroupLayout& L = d.L;
  const auto lt = lowrank_dtype(grad.scalar_type());
  const c10::cuda::CUDAGuard guard(grad.device());
  const bool lora_needs_mask = (want.dx || want.dA) && R > 0 && T > 0 && in > 0;
  const MaskArgs mask = lora_needs_mask ? make_mask(kOp, seed, dropout_p, grad) : MaskArgs{};

  const bool lowrank = R > 0 && T > 0 && in > 0 && out > 0;
  const Wants w{want.dx && lowrank, want.dA && lowrank, want.dB && lowrank};
  Tensor dw = linear_dweight(want.dw, grad, x, weight, fan_in_fan_out);
  Tensor db = want.db ? at::sum(grad, {0}) : grad.new_empty({0});
  Tensor dx = grad.new_empty({0});
  Tensor dA = w.dA ? Tensor() : zero_grad_or_empty(want.dA, lora_A);
  Tensor dB = w.dB ? Tensor() : zero_grad_or_empty(want.dB, lora_B);
  if (w.dx || w.dA || w.dB) {
    const Tensor A_l = lora_A.to(lt).contiguous();  // (R, in)
    const Tensor B_l = b_full(lora_B, L, lt);       // (out, R)
    const Tensor s_c = w.dB ? s.contiguous() : s;
    check_contiguous(kOp, "lora_A (low-rank dtype)", A_l);
    check_contiguous(kOp, "B_full", B_l);
    Tensor dA_acc, dB_acc;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), kOp, [&] {
      lowrank_backward<scalar_t>(grad, x, A_l, B_l, s_c, L, scaling, mask, w, dx, dA_acc,
                                 dB_acc);
    });
    if (w.dA) dA = dA_acc.to(lora_A.scalar_type()).contiguous();
    if (w.dB) dB = dB_acc.to(lora_B.scalar_type()).contiguous();
  }
  add_frozen_dx(dx, w.dx, want.dx, grad, weight, fan_in_fan_out);
  return {dx, dw, db, dA, dB};
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::lora_linear_bwd, and the cuda backend's
// handle on it (lora_kernels_cuda::lora_linear_bwd, for use_backend("cuda") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("lora_linear_bwd", below_autograd<&lora_linear_bwd_impl>); }
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) { m.impl("lora_linear_bwd", below_autograd<&lora_linear_bwd_impl>); }

}  // namespace cuda
}  // namespace lora_kernels
