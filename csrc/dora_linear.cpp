// dora_linear: DoRA (Liu et al. 2024, arXiv 2402.09353; PEFT's use_dora=True)
// on the LoRA kernels. With x̂ = dropout(x), s the LoRA scaling and
// m = magnitude / ‖W + s·B·A‖ per output row (the norm detached, paper §4.3):
//
//   y = x·Wᵀ + bias + (m − 1) ⊙ (x̂·Wᵀ) + m ⊙ s·(x̂·Aᵀ)·Bᵀ
//
// Device-independent: every kernel it runs is another lora_kernels op
// (lora_linear_fwd, lora_delta_fwd/bwd, dropout; their CPU and CUDA kernels,
// or the Python backends on other devices) or an ATen op, reached through
// the dispatcher. lora_kernels/dora.py is the same in Python (the route of a
// backend asked for by name, and torch.compile's Triton decomposition);
// it has the derivation.
//
// What one training step runs, all in C++ below the module's forward:
//   dora_linear (CompositeImplicitAutograd): argument checks, the row norms
//     (from ‖W_i‖², which the caller caches on W, and one pass over W for
//     W·Aᵀ: no out×in temporary), m, the dropout seed, x as (tokens, in),
//   dora_linear_fwd's Autograd kernel (DoraFunction), whose node's backward
//     is one dora_linear_bwd call;
//   dora_linear_fwd / dora_linear_bwd (CompositeExplicitAutograd): the
//     forward and backward composed from the kernels.
//
// With dropout on, x̂·Wᵀ besides x·Wᵀ would be a second frozen GEMM each way.
// Where the dropped-entries kernel runs (sparse_dropped: the CPU, float32 and
// float64, dropout ≤ 0.1, large enough layers) it is not: with k dropout's
// keep scale and D its mask, x̂·Wᵀ = k·(x·Wᵀ − ((1 − D) ⊙ x)·Wᵀ), and the
// backward's g·W + k·D ⊙ (h·W) = (g + k·h)·W − k·(1 − D) ⊙ (h·W); the
// products over the dropped entries (dropped_linear, dropped_linear_bwd_)
// cost the fraction p of a GEMM's arithmetic. Elsewhere, two GEMMs.
//
// Held for backward: x only when dA or dW needs it (x̂ is regenerated from
// the seed); s = x̂·Aᵀ (tokens × r); z = x̂·Wᵀ + s·x̂·Aᵀ·Bᵀ (tokens × out)
// only for m's gradient (recomputing it would cost a frozen GEMM); m, W, A,
// B and the 8-byte seed. No mask, no x̂, no x̂·Wᵀ of its own.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "arg_errors.h"
#include "op_autograd.h"
#include "philox.h"

namespace lora_kernels {
namespace {

using LinearFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                 const std::optional<Tensor>&, const Tensor&,
                                                 const Tensor&, const Tensor&, double, double,
                                                 bool, int64_t, at::IntArrayRef);
using LinearBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, double, double, bool, int64_t, at::IntArrayRef, c10::List<bool>);
using DeltaFwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&, double, double,
                                                int64_t, at::IntArrayRef);
using DeltaBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&,
                                                       const Tensor&, const Tensor&, double,
                                                       double, int64_t, at::IntArrayRef,
                                                       c10::List<bool>);
using DropoutSig = Tensor(const Tensor&, const Tensor&, double);
using DroppedLinearSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                double, double, double);
using DroppedLinearBwdSig = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 double, double);
using DoraFwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                      const std::optional<Tensor>&,
                                                      const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, double,
                                                      double, bool);
using Grads6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using DoraBwdSig = Grads6(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, double, double, bool, c10::List<bool>);

auto& linear_fwd_op() {
  static auto op = typed_op<LinearFwdSig>("lora_kernels::lora_linear_fwd");
  return op;
}
auto& linear_bwd_op() {
  static auto op = typed_op<LinearBwdSig>("lora_kernels::lora_linear_bwd");
  return op;
}
auto& delta_fwd_op() {
  static auto op = typed_op<DeltaFwdSig>("lora_kernels::lora_delta_fwd");
  return op;
}
auto& delta_bwd_op() {
  static auto op = typed_op<DeltaBwdSig>("lora_kernels::lora_delta_bwd");
  return op;
}
auto& dropout_op() {
  static auto op = typed_op<DropoutSig>("lora_kernels::dropout");
  return op;
}
auto& dropped_linear_op() {
  static auto op = typed_op<DroppedLinearSig>("lora_kernels::dropped_linear");
  return op;
}
auto& dropped_linear_bwd_op() {
  static auto op = typed_op<DroppedLinearBwdSig>("lora_kernels::dropped_linear_bwd_");
  return op;
}
auto& fwd_op() {
  static auto op = typed_op<DoraFwdSig>("lora_kernels::dora_linear_fwd");
  return op;
}
auto& bwd_op() {
  static auto op = typed_op<DoraBwdSig>("lora_kernels::dora_linear_bwd");
  return op;
}

// The accumulation dtype of the norms and of m's gradient.
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Tensor empty_like0(const Tensor& t) { return at::empty({0}, t.options()); }

// Whether dropout's second frozen GEMM (on x̂ forward, on h backward) runs as
// the first one plus the product over the dropped entries (dropped_linear.h):
// where that product has a sparse kernel (the CPU's, float32 and float64),
// the dropped fraction is small enough for it to beat a GEMM, and there are
// enough tokens for the kernel's fixed cost (W's transposed blocks, one pass
// over W; the mask's compressed rows) to pay off, in a layer large enough for
// the extra op calls not to matter. On a 2-core AMD EPYC (fp32, 2 threads)
// the forward / backward kernel takes, of the GEMM it replaces:
//   p = 0.05, 4096²: 1.56 / 1.41× at 16 tokens, 0.59 / 0.65× at 64,
//     0.43 / 0.54× at 128, 0.26–0.29 / 0.33–0.36× at 256–2048;
//   p = 0.05, 1024² and 512 → 1365: 0.36–0.41 / 0.48× at 128 tokens;
//   p = 0.1, 516 tokens, 512 ↔ 1365: 0.37–0.63 / 0.65–0.75×;
//   p = 0.2: 0.64–1.04 / 0.9–1.25×.
constexpr double kSparseDroppedMaxP = 0.1;
constexpr int64_t kSparseDroppedMinTokens = 128;
constexpr double kSparseDroppedMinMacs = 1 << 24;  // tokens · in · out
bool sparse_dropped(const Tensor& x, const Tensor& weight, double dropout_p) {
  const auto st = x.scalar_type();
  return x.device().is_cpu() && (st == at::kFloat || st == at::kDouble) &&
         dropout_p <= kSparseDroppedMaxP && x.size(0) >= kSparseDroppedMinTokens &&
         static_cast<double>(x.size(0)) * static_cast<double>(weight.numel()) >=
             kSparseDroppedMinMacs;
}

// The factor dropout multiplies kept entries by (philox.h).
double keep_scale(double p) { return philox::dropout_keep_scale(philox::dropout_threshold(p)); }

// ---------------------------------------------------------------------------
// The row norms
// ---------------------------------------------------------------------------

// W·Aᵀ (out × r, in acc) with W as (out, in). A contiguous W takes the
// low-rank pass of the LoRA kernels, s = x·Aᵀ with W as x (lora_delta_fwd
// around a one-column zero base): one pass over W, about twice as fast as
// BLAS's r-column GEMM on the CPU. A transposed one (fan_in_fan_out, W
// stored (in, out)) is (A·Wᵀ)ᵀ, BLAS with r rows of output.
Tensor weight_times_At(const Tensor& w, const Tensor& lora_A, at::ScalarType acc) {
  const Tensor a = lora_A.to(w.scalar_type());
  if (!w.is_contiguous() || w.size(0) == 0) return at::mm(a, w.t()).t().to(acc);
  const int64_t r = a.size(0);
  const Tensor base = at::zeros({w.size(0), 1}, w.options());
  const Tensor b = at::zeros({1, r}, w.options());
  return std::get<1>(delta_fwd_op().call(w, base, a, b, no_seed(w), 1.0, 0.0, 1, {0})).to(acc);
}

// ‖W_i + s·(B_i·A + b_B,i)‖ per output row, in acc, by expansion:
// ‖W_i‖² + 2s·(W·Aᵀ)_i·B_iᵀ + s²·B_i·(A·Aᵀ)·B_iᵀ. PEFT's lora_bias b_B is
// ΔW's column of ones: A gains a row of ones, B the column b_B, W·Aᵀ the
// column of W's row sums.
Tensor weight_norm(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
                   const Tensor& weight_sq, double scaling, bool fan_in_fan_out,
                   const std::optional<Tensor>& lora_bias) {
  at::NoGradGuard no_grad;
  const auto acc = acc_dtype(weight.scalar_type());
  const Tensor w = fan_in_fan_out ? weight.detach().t() : weight.detach();  // (out, in)
  Tensor a = lora_A.detach().to(acc), b = lora_B.detach().to(acc);
  Tensor wa = weight_times_At(w, lora_A.detach(), acc);
  if (lora_bias.has_value() && lora_bias->defined()) {
    a = at::cat({a, at::ones({1, a.size(1)}, a.options())});
    b = at::cat({b, lora_bias->detach().to(acc).unsqueeze(1)}, 1);
    wa = at::cat({wa, w.sum(1, false, acc).unsqueeze(1)}, 1);
  }
  // B_i·(2s·(W·Aᵀ)_i + s²·(A·Aᵀ)·B_iᵀ), B_i's product in one vecdot
  const Tensor p = at::addmm(wa, b, at::mm(a, a.t()), 2.0 * scaling, scaling * scaling);
  return at::linalg_vecdot(p, b).add_(weight_sq).clamp_min_(0).sqrt_();
}

// ---------------------------------------------------------------------------
// dora_linear_fwd / dora_linear_bwd: composed from the kernels
// ---------------------------------------------------------------------------

// (y, s, z); mag is m (out,) in x's dtype.
std::tuple<Tensor, Tensor, Tensor> dora_linear_fwd(const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias,
                                                   const Tensor& lora_A, const Tensor& lora_B,
                                                   const Tensor& mag, const Tensor& seed,
                                                   double scaling, double dropout_p,
                                                   bool fan_in_fan_out) {
  const std::optional<Tensor> none;
  const bool has_bias = bias.has_value() && bias->defined();
  if (dropout_p == 0.0) {
    // x̂ = x: y = m ⊙ z + bias with z the LoRA layer's output (one frozen GEMM).
    auto [z, s] = linear_fwd_op().call(x, weight, none, lora_A, lora_B, seed, scaling, 0.0,
                                       fan_in_fan_out, 1, {0});
    Tensor y = has_bias ? at::addcmul(*bias, z, mag) : z * mag;
    return {y, s, z};
  }
  // y = x·Wᵀ + bias + (m − 1) ⊙ z + s·(x̂·Aᵀ)·Bᵀ with z the LoRA layer's output
  // on x̂.
  const Tensor w = fan_in_fan_out ? weight.t() : weight;  // (out, in)
  if (sparse_dropped(x, weight, dropout_p)) {
    // x̂·Wᵀ = k·(x·Wᵀ − ((1 − D) ⊙ x)·Wᵀ): one frozen GEMM, and the dropped
    // fraction p of another (dropped_linear.h).
    const double k = keep_scale(dropout_p);
    Tensor y = at::mm(x, w.t());
    const Tensor xw = dropped_linear_op().call(y, x, w, seed, dropout_p, k, -k);
    auto [z, s] = delta_fwd_op().call(x, xw, lora_A, lora_B, seed, scaling, dropout_p, 1, {0});
    if (has_bias) y.add_(*bias);
    y.addcmul_(z, mag - 1);
    y.addmm_(s.to(x.scalar_type()), lora_B.t(), 1.0, scaling);
    return {y, s, z};
  }
  // Otherwise two frozen GEMMs (x and x̂ differ); x̂ is a temporary.
  Tensor z, s;
  {
    const Tensor xd = dropout_op().call(x.contiguous(), seed, dropout_p);
    std::tie(z, s) = linear_fwd_op().call(xd, weight, none, lora_A, lora_B, seed, scaling, 0.0,
                                          fan_in_fan_out, 1, {0});
  }
  Tensor y = at::linear(x, w, bias);
  y.addcmul_(z, mag - 1);
  y.addmm_(s.to(x.scalar_type()), lora_B.t(), 1.0, scaling);
  return {y, s, z};
}

// (dx, dweight, dbias, dA, dB, dmag): an empty tensor for each output not
// asked for (six flags in that order). With g the output gradient:
//   dm = Σ_tokens g ⊙ z, dbias = Σ_tokens g;
//   dropout off: y is m ⊙ a LoRA layer, so the rest is lora_linear_bwd(m ⊙ g);
//   dropout on, with D the mask and h = (m − 1) ⊙ g (the gradient of x̂·Wᵀ):
//     dx = g·W + D ⊙ (h·W) + D ⊙ (s·(m ⊙ g)·B·A), dA = s·((m ⊙ g)·B)ᵀ·x̂,
//     dB = m ⊙ s·gᵀ·S, dW = gᵀ·x + hᵀ·x̂.
//   m is folded into B ((m ⊙ g)·B = g·(m ⊙ B)), so m ⊙ g is never formed; the
//   rank-r products and their D ⊙ run in the fused lora_delta_bwd, which
//   regenerates the mask itself, and D ⊙ (h·W) is the dropout kernel on h·W:
//   no mask or x̂ is materialized (x̂ only for dW).
Grads6 dora_linear_bwd(const Tensor& grad, const Tensor& x, const Tensor& weight,
                       const Tensor& lora_A, const Tensor& lora_B, const Tensor& mag,
                       const Tensor& s, const Tensor& z, const Tensor& seed, double scaling,
                       double dropout_p, bool fan_in_fan_out, c10::List<bool> output_mask) {
  TORCH_CHECK(output_mask.size() == 6, "dora_linear_bwd: output_mask must have 6 flags, got ",
              output_mask.size());
  const bool want_x = output_mask.get(0), want_w = output_mask.get(1),
             want_b = output_mask.get(2), want_a = output_mask.get(3),
             want_bb = output_mask.get(4), want_m = output_mask.get(5);
  Tensor tmp;  // tokens × out: g ⊙ z, then reused
  Tensor dmag = empty_like0(mag);
  if (want_m) {
    tmp = grad * z;
    dmag = tmp.sum(0, false, acc_dtype(grad.scalar_type())).to(mag.scalar_type());
  }
  const Tensor dbias = want_b ? grad.sum(0) : empty_like0(grad);
  if (!(want_x || want_w || want_a || want_bb))
    return {empty_like0(grad), empty_like0(weight), dbias, empty_like0(lora_A),
            empty_like0(lora_B), dmag};
  if (dropout_p == 0.0) {
    const Tensor gm = tmp.defined() ? at::mul_out(tmp, grad, mag) : grad * mag;
    auto [dx, dw, unused, da, db] = linear_bwd_op().call(
        gm, x, weight, lora_A, lora_B, s, seed, scaling, 0.0, fan_in_fan_out, 1, {0},
        c10::List<bool>({want_x, want_w, false, want_a, want_bb}));
    return {dx, dw, dbias, da, db, dmag};
  }
  const Tensor mag_1 = mag - 1;
  const Tensor h = tmp.defined() ? at::mul_out(tmp, grad, mag_1) : grad * mag_1;
  Tensor dx_low, da = empty_like0(lora_A), db = empty_like0(lora_B);
  if (want_x || want_a || want_bb) {
    const Tensor mb = lora_B * mag.unsqueeze(1).to(lora_B.scalar_type());
    std::tie(dx_low, da, db) = delta_bwd_op().call(
        grad, want_a ? x : empty_like0(x), lora_A, mb, s, seed, scaling, dropout_p, 1, {0},
        c10::List<bool>({want_x, want_a, want_bb}));
    if (want_bb) db.mul_(mag.unsqueeze(1).to(db.scalar_type()));
  }
  const Tensor w = fan_in_fan_out ? weight.t() : weight;  // (out, in)
  Tensor dx = empty_like0(grad), dw = empty_like0(weight);
  if (want_x && sparse_dropped(grad, weight, dropout_p)) {
    // g·W + k·D ⊙ (h·W) = (g + k·h)·W − k·(1 − D) ⊙ (h·W): one frozen GEMM and
    // the dropped fraction p of another (dropped_linear.h).
    const double k = keep_scale(dropout_p);
    dx = at::mm(at::add(grad, h, k), w);
    dropped_linear_bwd_op().call(dx, h, w, seed, dropout_p, -k);
    dx.add_(dx_low);
  } else if (want_x) {
    dx = dropout_op().call(at::mm(h, w), seed, dropout_p);
    dx.add_(dx_low).addmm_(grad, w);
  }
  if (want_w) {
    const Tensor xd = dropout_op().call(x.contiguous(), seed, dropout_p);
    dw = at::mm(grad.t(), x).addmm_(h.t(), xd);
    if (fan_in_fan_out) dw = dw.t();
  }
  return {dx, dw, dbias, da, db, dmag};
}

// ---------------------------------------------------------------------------
// Autograd of dora_linear_fwd
// ---------------------------------------------------------------------------

class DoraFunction : public torch::autograd::Function<DoraFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const std::optional<Tensor>& bias, const Tensor& lora_A,
                               const Tensor& lora_B, const Tensor& mag, const Tensor& seed,
                               double scaling, double dropout_p, bool fan_in_fan_out) {
    Tensor y, s, z;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, s, z) = fwd_op().call(x, weight, bias, lora_A, lora_B, mag, seed, scaling,
                                        dropout_p, fan_in_fan_out);
    }
    ctx->mark_non_differentiable({s, z});
    ctx->set_materialize_grads(false);  // s and z get no gradient: no zeros made for them
    // Graph edges are the defined tensors: x, weight, [bias,] lora_A, lora_B, mag, seed.
    const bool has_bias = bias.has_value() && bias->defined();
    const size_t a = has_bias ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = has_bias && ctx->needs_input_grad(2),
               need_a = ctx->needs_input_grad(a), need_bb = ctx->needs_input_grad(a + 1),
               need_m = ctx->needs_input_grad(a + 2);
    ctx->saved_data["mask"] =
        c10::List<bool>({need_x, need_w, need_b, need_a, need_bb, need_m});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["fan_in_fan_out"] = fan_in_fan_out;
    ctx->save_for_backward({(need_a || need_w) ? x : Tensor(), weight, lora_A, lora_B, mag, s,
                            need_m ? z : Tensor(), seed});
    return {y, s, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);  // one per forward argument; non-tensors get none
    const Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor x = saved[0].defined() ? saved[0] : empty_like0(grad);
    const Tensor z = saved[6].defined() ? saved[6] : empty_like0(grad);
    const c10::List<bool> mask = ctx->saved_data["mask"].toBoolList();
    Grads6 g;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      g = bwd_op().call(grad, x, saved[1], saved[2], saved[3], saved[4], saved[5], z, saved[7],
                        ctx->saved_data["scaling"].toDouble(),
                        ctx->saved_data["dropout_p"].toDouble(),
                        ctx->saved_data["fan_in_fan_out"].toBool(), mask);
    }
    const Tensor* grads_in[6] = {&std::get<0>(g), &std::get<1>(g), &std::get<2>(g),
                                 &std::get<3>(g), &std::get<4>(g), &std::get<5>(g)};
    for (size_t i = 0; i < 6; ++i) out[i] = mask.get(i) ? *grads_in[i] : Tensor();
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> dora_linear_fwd_autograd(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& lora_A, const Tensor& lora_B, const Tensor& mag, const Tensor& seed,
    double scaling, double dropout_p, bool fan_in_fan_out) {
  const bool graph =
      at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || lora_A.requires_grad() ||
       lora_B.requires_grad() || mag.requires_grad() ||
       (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!graph) {  // nothing to record
    at::AutoDispatchBelowADInplaceOrView below;
    return fwd_op().call(x, weight, bias, lora_A, lora_B, mag, seed, scaling, dropout_p,
                         fan_in_fan_out);
  }
  auto out = DoraFunction::apply(x, weight, bias, lora_A, lora_B, mag, seed, scaling, dropout_p,
                                 fan_in_fan_out);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------
// dora_linear: the op the layers call
// ---------------------------------------------------------------------------

void check_out_vector(const char* name, const std::optional<Tensor>& t, int64_t out_f) {
  if (!t.has_value() || !t->defined()) return;
  if (t->dim() != 1 || t->size(0) != out_f)
    fail_arg(name, py_shape(*t), py_tuple(std::vector<int64_t>{out_f}));
}

Tensor dora_linear(const Tensor& x, const Tensor& weight_in, const std::optional<Tensor>& bias,
                   const Tensor& lora_A, const Tensor& lora_B, const Tensor& magnitude,
                   const Tensor& weight_sq, double scaling, double dropout_p, bool training,
                   bool fan_in_fan_out, const std::optional<Tensor>& lora_bias) {
  check_lora_dropout(dropout_p);
  const auto [out_f, in_f] = check_linear_x(x, weight_in, fan_in_fan_out);
  const int64_t r = lora_A.dim() == 2 ? lora_A.size(0) : 0;
  if (lora_A.dim() != 2 || r == 0 || lora_A.size(1) != in_f)
    fail_arg("lora_A.shape", py_shape(lora_A), "(r, " + std::to_string(in_f) + ")");
  const std::vector<int64_t> b_shape = {out_f, r};
  if (lora_B.sizes() != at::IntArrayRef(b_shape))
    fail_arg("lora_B.shape", py_shape(lora_B), py_tuple(b_shape));
  check_out_vector("bias.shape", bias, out_f);
  check_out_vector("magnitude.shape", magnitude, out_f);
  check_out_vector("lora_bias.shape", lora_bias, out_f);
  check_out_vector("weight_sq.shape", weight_sq, out_f);
  check_same_as("weight", weight_in, "x", x);
  if (bias.has_value() && bias->defined()) check_same_as("bias", *bias, "x", x);
  check_same_as("lora_A", lora_A, "x", x);
  check_same_as("lora_B", lora_B, "x", x);
  check_same_as("magnitude", magnitude, "x", x);
  if (lora_bias.has_value() && lora_bias->defined())
    check_same_as("lora_bias", *lora_bias, "x", x);
  const auto acc = acc_dtype(weight_in.scalar_type());
  if (weight_sq.device() != x.device() || weight_sq.scalar_type() != acc)
    TORCH_CHECK_VALUE(false, "weight_sq: got ", py_dtype(weight_sq.scalar_type()), " on ",
                      weight_sq.device().str(), ", expected ", py_dtype(acc), " on ",
                      x.device().str(), " (‖W_i‖², functional.weight_row_sq)");

  const Tensor norm = weight_norm(weight_in, lora_A, lora_B, weight_sq, scaling,
                                  fan_in_fan_out, lora_bias);
  // m in x's dtype, the norm rounded to it first, as PEFT does.
  const Tensor mag = magnitude / norm.to(x.scalar_type());
  const double p = training ? dropout_p : 0.0;
  const Tensor seed = p > 0.0 ? draw_seed(x) : no_seed(x);
  const auto [weight, standard_fifo] = standard_layout(weight_in, fan_in_fan_out);
  const Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, in_f});
  Tensor y = std::get<0>(fwd_op().call(x2, weight, bias, lora_A, lora_B, mag, seed, scaling, p,
                                       standard_fifo));
  if (lora_bias.has_value() && lora_bias->defined()) y = y + (mag * scaling) * *lora_bias;
  if (x.dim() == 2) return y;
  return with_leading_dims(y, x.sym_sizes().slice(0, x.dim() - 1), out_f);
}

// Under torch.autocast: the floating operands in the autocast dtype (‖W_i‖²
// stays as the caller took it), then dora_linear.
template <c10::DeviceType device, c10::DispatchKey key>
Tensor dora_linear_autocast(const Tensor& x, const Tensor& weight,
                            const std::optional<Tensor>& bias, const Tensor& lora_A,
                            const Tensor& lora_B, const Tensor& magnitude,
                            const Tensor& weight_sq, double scaling, double dropout_p,
                            bool training, bool fan_in_fan_out,
                            const std::optional<Tensor>& lora_bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  auto cast = [&](const Tensor& t) { return t.is_floating_point() ? t.to(dtype) : t; };
  auto cast_opt = [&](const std::optional<Tensor>& t) {
    return (t.has_value() && t->defined()) ? std::optional<Tensor>(cast(*t)) : t;
  };
  const Tensor w = cast(weight);
  // ‖W_i‖² in the cast W's accumulation dtype (float32 for every autocast dtype).
  const Tensor sq = weight_sq.to(acc_dtype(w.scalar_type()));
  return dora_linear(cast(x), w, cast_opt(bias), cast(lora_A), cast(lora_B), cast(magnitude),
                     sq, scaling, dropout_p, training, fan_in_fan_out, cast_opt(lora_bias));
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, Autograd, m) {
  m.impl("dora_linear_fwd", &dora_linear_fwd_autograd);
}

TORCH_LIBRARY_IMPL(lora_kernels, CompositeExplicitAutograd, m) {
  m.impl("dora_linear_fwd", &dora_linear_fwd);
  m.impl("dora_linear_bwd", &dora_linear_bwd);
}

TORCH_LIBRARY_IMPL(lora_kernels, CompositeImplicitAutograd, m) {
  m.impl("dora_linear", &dora_linear);
}

TORCH_LIBRARY_IMPL(lora_kernels, AutocastCPU, m) {
  m.impl("dora_linear",
         &dora_linear_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(lora_kernels, AutocastCUDA, m) {
  m.impl("dora_linear",
         &dora_linear_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace lora_kernels
