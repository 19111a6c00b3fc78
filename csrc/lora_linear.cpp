// lora_linear: the Linear / MergedLinear op the layers call, and the autograd
// of its kernel lora_linear_fwd. Device-independent: the kernels themselves
// are csrc/cpu/lora_linear_{fwd,bwd}.cpp and csrc/cuda/lora_linear_{fwd,bwd}.cpp
// (or, for devices without a C++ kernel, the Python backends).
//
// What one training step runs, all in C++ below the module's forward:
//   lora_linear (CompositeImplicitAutograd): argument checks, the dropout seed
//     (drawn from the default generator of x's device, so torch.manual_seed
//     and checkpointing's RNG restore give the same mask), x viewed as
//     (tokens, in), then
//   lora_linear_fwd's Autograd kernel (LinearFunction below): runs the
//     device kernel and records a node whose backward is one lora_linear_bwd
//     call.
// Under torch.autocast the operands are first cast to the autocast dtype
// (the Autocast kernel of lora_linear), as F.linear's autocast rule does.
//
// Held for backward (what LinearFunction saves): x only when dA or dweight is
// needed; s = dropout(x)·Aᵀ (tokens × r) when the low-rank branch is; the
// 8-byte seed, from which the mask is regenerated (never stored); W, A and B,
// which are parameters.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "arg_errors.h"
#include "op_autograd.h"

namespace lora_kernels {
namespace {

using FwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                           const std::optional<Tensor>&, const Tensor&,
                                           const Tensor&, const Tensor&, double, double, bool,
                                           int64_t, at::IntArrayRef);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, double, double, bool, int64_t, at::IntArrayRef, c10::List<bool>);

auto& fwd_op() {
  static auto op = typed_op<FwdSig>("lora_kernels::lora_linear_fwd");
  return op;
}

auto& bwd_op() {
  static auto op = typed_op<BwdSig>("lora_kernels::lora_linear_bwd");
  return op;
}

// ---------------------------------------------------------------------------
// Autograd of lora_linear_fwd
// ---------------------------------------------------------------------------

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const std::optional<Tensor>& bias, const Tensor& lora_A,
                               const Tensor& lora_B, const Tensor& seed, double scaling,
                               double dropout_p, bool fan_in_fan_out, int64_t num_groups,
                               std::vector<int64_t> groups) {
    Tensor y, s;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, s) = fwd_op().call(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p,
                                     fan_in_fan_out, num_groups, groups);
    }
    ctx->mark_non_differentiable({s});
    ctx->set_materialize_grads(false);  // s gets no gradient: no zeros made for it
    // Graph edges are the defined tensors: x, weight, [bias,] lora_A, lora_B, seed.
    const bool has_bias = bias.has_value() && bias->defined();
    const size_t a = has_bias ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = has_bias && ctx->needs_input_grad(2),
               need_a = ctx->needs_input_grad(a), need_bb = ctx->needs_input_grad(a + 1);
    ctx->saved_data["mask"] = c10::List<bool>({need_x, need_w, need_b, need_a, need_bb});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["fan_in_fan_out"] = fan_in_fan_out;
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["groups"] = groups;
    ctx->save_for_backward({(need_a || need_w) ? x : Tensor(), weight, lora_A, lora_B, s, seed});
    return {y, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(11);  // one per forward argument; non-tensors get none
    const Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor x = saved[0].defined() ? saved[0] : at::empty({0}, grad.options());
    const c10::List<bool> mask = ctx->saved_data["mask"].toBoolList();
    Tensor dx, dw, db, da, dB;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dx, dw, db, da, dB) =
          bwd_op().call(grad, x, saved[1], saved[2], saved[3], saved[4], saved[5],
                        ctx->saved_data["scaling"].toDouble(),
                        ctx->saved_data["dropout_p"].toDouble(),
                        ctx->saved_data["fan_in_fan_out"].toBool(),
                        ctx->saved_data["num_groups"].toInt(),
                        ctx->saved_data["groups"].toIntVector(), mask);
    }
    const Tensor* grads_in[5] = {&dx, &dw, &db, &da, &dB};
    for (size_t i = 0; i < 5; ++i) out[i] = mask.get(i) ? *grads_in[i] : Tensor();
    return out;
  }
};

std::tuple<Tensor, Tensor> lora_linear_fwd_autograd(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& lora_A, const Tensor& lora_B, const Tensor& seed, double scaling,
    double dropout_p, bool fan_in_fan_out, int64_t num_groups, at::IntArrayRef groups) {
  const bool graph =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || lora_A.requires_grad() ||
       lora_B.requires_grad() || (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!graph) {  // nothing to record
    at::AutoDispatchBelowADInplaceOrView below;
    return fwd_op().call(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p,
                         fan_in_fan_out, num_groups, groups);
  }
  auto out = LinearFunction::apply(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p,
                                   fan_in_fan_out, num_groups, groups.vec());
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------
// lora_linear: the op the layers call
// ---------------------------------------------------------------------------

Tensor lora_linear(const Tensor& x, const Tensor& weight_in, const std::optional<Tensor>& bias,
                   const Tensor& lora_A, const Tensor& lora_B, double scaling,
                   double dropout_p, bool training, bool fan_in_fan_out, int64_t num_groups,
                   at::IntArrayRef groups) {
  check_lora_dropout(dropout_p);
  const auto [out_f, in_f] = check_linear_x(x, weight_in, fan_in_fan_out);
  if (num_groups < 1 || out_f % num_groups)
    fail_arg("len(enable_lora)", num_groups,
             "a divisor of out_features=" + std::to_string(out_f));
  const int64_t E = static_cast<int64_t>(groups.size());
  TORCH_CHECK_VALUE(E > 0, "enable_lora: no group is enabled; call F.linear instead");
  const int64_t r = lora_A.dim() == 2 ? lora_A.size(0) / E : 0;
  if (lora_A.dim() != 2 || r == 0 || lora_A.size(0) != r * E || lora_A.size(1) != in_f)
    fail_arg("lora_A.shape", py_shape(lora_A),
             "(r*" + std::to_string(E) + ", " + std::to_string(in_f) + ")");
  const std::vector<int64_t> b_shape = {out_f / num_groups * E, r};
  if (lora_B.sizes() != at::IntArrayRef(b_shape))
    fail_arg("lora_B.shape", py_shape(lora_B), py_tuple(b_shape));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias && (bias->dim() != 1 || bias->size(0) != out_f))
    fail_arg("bias.shape", py_shape(*bias), py_tuple(std::vector<int64_t>{out_f}));
  check_same_as("weight", weight_in, "x", x);
  if (has_bias) check_same_as("bias", *bias, "x", x);
  check_same_as("lora_A", lora_A, "x", x);
  check_same_as("lora_B", lora_B, "x", x);

  const double p = training ? dropout_p : 0.0;
  const Tensor seed = p > 0.0 ? draw_seed(x) : no_seed(x);
  const auto [weight, standard_fifo] = standard_layout(weight_in, fan_in_fan_out);
  const Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, in_f});
  Tensor y = std::get<0>(fwd_op().call(x2, weight, bias, lora_A, lora_B, seed, scaling, p,
                                       standard_fifo, num_groups, groups));
  if (x.dim() == 2) return y;
  return with_leading_dims(y, x.sym_sizes().slice(0, x.dim() - 1), out_f);
}

// Under torch.autocast: the floating operands in the autocast dtype, then
// lora_linear as usual (F.linear's autocast rule; the op is on no autocast list).
template <c10::DeviceType device, c10::DispatchKey key>
Tensor lora_linear_autocast(const Tensor& x, const Tensor& weight,
                            const std::optional<Tensor>& bias, const Tensor& lora_A,
                            const Tensor& lora_B, double scaling, double dropout_p,
                            bool training, bool fan_in_fan_out, int64_t num_groups,
                            at::IntArrayRef groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const Tensor& t) { return t.is_floating_point() ? t.to(dtype) : t; };
  std::optional<Tensor> b = bias;
  if (b.has_value() && b->defined()) b = cast(*b);
  return lora_linear(cast(x), cast(weight), b, cast(lora_A), cast(lora_B), scaling, dropout_p,
                     training, fan_in_fan_out, num_groups, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, Autograd, m) {
  m.impl("lora_linear_fwd", &lora_linear_fwd_autograd);
}

TORCH_LIBRARY_IMPL(lora_kernels, CompositeImplicitAutograd, m) {
  m.impl("lora_linear", &lora_linear);
}

TORCH_LIBRARY_IMPL(lora_kernels, AutocastCPU, m) {
  m.impl("lora_linear",
         &lora_linear_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(lora_kernels, AutocastCUDA, m) {
  m.impl("lora_linear",
         &lora_linear_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace lora_kernels
