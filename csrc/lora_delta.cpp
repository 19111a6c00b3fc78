// lora_delta: the LoRA branch added to the output of a base layer that is
// computed elsewhere (a bitsandbytes 4-bit or 8-bit layer, torchao, GPTQ, a
// module with hooks): y = base + scaling · dropout(x)·Aᵀ·Bᵀ. The base runs as
// its own module; this op is the branch, and the autograd of its kernel
// lora_delta_fwd. Device-independent: the kernels are
// csrc/cpu/lora_delta_{fwd,bwd}.cpp and csrc/cuda/lora_delta_{fwd,bwd}.cpp
// (or, for devices without a C++ kernel, the Python backends).
//
//   lora_delta (CompositeImplicitAutograd): argument checks, the dropout
//     seed, any leading batch dimensions, then
//   lora_delta_fwd's Autograd kernel (DeltaFunction): the device kernel and
//     a node whose backward is one lora_delta_bwd call; base's gradient is
//     the incoming gradient itself.
//
// Held for backward: x only when dA is needed, s = dropout(x)·Aᵀ
// (tokens × r), the 8-byte seed (the mask is regenerated, never stored), A
// and B. Not the base layer's output, and no copy of x in another dtype:
// the branch runs in x's dtype with A and B cast to it (s and the products
// in float32 for half dtypes).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "arg_errors.h"
#include "op_autograd.h"

namespace lora_kernels {
namespace {

using FwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const Tensor&, double, double, int64_t,
                                           at::IntArrayRef);
using BwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const Tensor&, const Tensor&,
                                                  double, double, int64_t, at::IntArrayRef,
                                                  c10::List<bool>);

auto& fwd_op() {
  static auto op = typed_op<FwdSig>("lora_kernels::lora_delta_fwd");
  return op;
}

auto& bwd_op() {
  static auto op = typed_op<BwdSig>("lora_kernels::lora_delta_bwd");
  return op;
}

// ---------------------------------------------------------------------------
// Autograd of lora_delta_fwd
// ---------------------------------------------------------------------------

class DeltaFunction : public torch::autograd::Function<DeltaFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& base,
                               const Tensor& lora_A, const Tensor& lora_B, const Tensor& seed,
                               double scaling, double dropout_p, int64_t num_groups,
                               std::vector<int64_t> groups) {
    Tensor y, s;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, s) = fwd_op().call(x, base, lora_A, lora_B, seed, scaling, dropout_p,
                                     num_groups, groups);
    }
    ctx->mark_non_differentiable({s});
    ctx->set_materialize_grads(false);  // s gets no gradient: no zeros made for it
    // Graph edges: x, base, lora_A, lora_B, seed.
    const bool need_x = ctx->needs_input_grad(0), need_base = ctx->needs_input_grad(1),
               need_a = ctx->needs_input_grad(2), need_b = ctx->needs_input_grad(3);
    ctx->saved_data["mask"] = c10::List<bool>({need_x, need_a, need_b});
    ctx->saved_data["need_base"] = need_base;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["groups"] = groups;
    ctx->save_for_backward({need_a ? x : Tensor(), lora_A, lora_B, s, seed});
    return {y, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);  // one per forward argument; non-tensors get none
    const Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor x = saved[0].defined() ? saved[0] : at::empty({0}, grad.options());
    const c10::List<bool> mask = ctx->saved_data["mask"].toBoolList();
    if (ctx->saved_data["need_base"].toBool()) out[1] = grad;  // y = base + branch
    if (!(mask.get(0) || mask.get(1) || mask.get(2))) return out;
    Tensor dx, dA, dB;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dA, dB) = bwd_op().call(
          grad, x, saved[1], saved[2], saved[3], saved[4], ctx->saved_data["scaling"].toDouble(),
          ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["num_groups"].toInt(),
          ctx->saved_data["groups"].toIntVector(), mask);
    }
    if (mask.get(0)) out[0] = dx;
    if (mask.get(1)) out[2] = dA;
    if (mask.get(2)) out[3] = dB;
    return out;
  }
};

std::tuple<Tensor, Tensor> lora_delta_fwd_autograd(const Tensor& x, const Tensor& base,
                                                   const Tensor& lora_A, const Tensor& lora_B,
                                                   const Tensor& seed, double scaling,
                                                   double dropout_p, int64_t num_groups,
                                                   at::IntArrayRef groups) {
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || base.requires_grad() ||
                                       lora_A.requires_grad() || lora_B.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below;  // nothing to record
    return fwd_op().call(x, base, lora_A, lora_B, seed, scaling, dropout_p, num_groups, groups);
  }
  auto out = DeltaFunction::apply(x, base, lora_A, lora_B, seed, scaling, dropout_p, num_groups,
                                  groups.vec());
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------
// lora_delta: the op the patched layers call
// ---------------------------------------------------------------------------

Tensor lora_delta(const Tensor& x, const Tensor& base, const Tensor& lora_A, const Tensor& lora_B,
                  double scaling, double dropout_p, bool training, int64_t num_groups,
                  at::IntArrayRef groups) {
  check_lora_dropout(dropout_p);
  if (x.dim() == 0) fail_arg("x.dim()", x.dim(), "at least 1");
  const int64_t in_f = x.size(-1);
  if (base.dim() != x.dim() || base.sym_sizes().slice(0, x.dim() - 1) !=
                                   x.sym_sizes().slice(0, x.dim() - 1))
    TORCH_CHECK_VALUE(false, "base.shape: got ", py_shape(base), ", expected x's leading ",
                      "dimensions ", py_shape(x), " with the out features last");
  const int64_t out_f = base.size(-1);
  if (num_groups < 1 || out_f % num_groups)
    fail_arg("len(enable_lora)", num_groups,
             "a divisor of out_features=" + std::to_string(out_f));
  const int64_t E = static_cast<int64_t>(groups.size());
  TORCH_CHECK_VALUE(E > 0, "enable_lora: no group is enabled");
  const int64_t r = lora_A.dim() == 2 ? lora_A.size(0) / E : 0;
  if (lora_A.dim() != 2 || r == 0 || lora_A.size(0) != r * E || lora_A.size(1) != in_f)
    fail_arg("lora_A.shape", py_shape(lora_A),
             "(r*" + std::to_string(E) + ", " + std::to_string(in_f) + ")");
  const std::vector<int64_t> b_shape = {out_f / num_groups * E, r};
  if (lora_B.sizes() != at::IntArrayRef(b_shape))
    fail_arg("lora_B.shape", py_shape(lora_B), py_tuple(b_shape));
  check_same_as("base", base, "x", x);
  check_same_as("lora_A", lora_A, "x", x);
  check_same_as("lora_B", lora_B, "x", x);

  const double p = training ? dropout_p : 0.0;
  const Tensor seed = p > 0.0 ? draw_seed(x) : no_seed(x);
  const Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, in_f});
  const Tensor b2 = base.dim() == 2 ? base : base.reshape({-1, out_f});
  Tensor y = std::get<0>(fwd_op().call(x2, b2, lora_A, lora_B, seed, scaling, p, num_groups,
                                       groups));
  if (base.dim() == 2) return y;
  return at::_unsafe_view_symint(y, base.sym_sizes());  // a tensor of its own, not a view
}

// Under torch.autocast: x, base, A and B in the autocast dtype, then lora_delta.
template <c10::DeviceType device, c10::DispatchKey key>
Tensor lora_delta_autocast(const Tensor& x, const Tensor& base, const Tensor& lora_A,
                           const Tensor& lora_B, double scaling, double dropout_p, bool training,
                           int64_t num_groups, at::IntArrayRef groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const Tensor& t) { return t.is_floating_point() ? t.to(dtype) : t; };
  return lora_delta(cast(x), cast(base), cast(lora_A), cast(lora_B), scaling, dropout_p,
                    training, num_groups, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, Autograd, m) {
  m.impl("lora_delta_fwd", &lora_delta_fwd_autograd);
}

TORCH_LIBRARY_IMPL(lora_kernels, CompositeImplicitAutograd, m) {
  m.impl("lora_delta", &lora_delta);
}

TORCH_LIBRARY_IMPL(lora_kernels, AutocastCPU, m) {
  m.impl("lora_delta",
         &lora_delta_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(lora_kernels, AutocastCUDA, m) {
  m.impl("lora_delta",
         &lora_delta_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace lora_kernels
