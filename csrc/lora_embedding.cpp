// lora_embedding: the Embedding op the layers call, and the autograd of its
// kernel lora_embedding_fwd. Device-independent: the kernels are
// csrc/cpu/lora_embedding.cpp and csrc/cuda/lora_embedding_{fwd,bwd}.cpp (or,
// for devices without a C++ kernel, the Python backends).
//
//   lora_embedding (CompositeImplicitAutograd): argument checks (on the CPU,
//     indices out of range are a ValueError here, before any kernel runs),
//     the indices flattened, then
//   lora_embedding_fwd's Autograd kernel (EmbeddingFunction): the device
//     kernel and a node whose backward is one lora_embedding_bwd call.
//
// Held for backward: the indices, s = Aᵀ[indices] (tokens × r) and the
// parameters.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "arg_errors.h"
#include "op_autograd.h"

namespace lora_kernels {
namespace {

using FwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, double, int64_t);
using BwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                  const Tensor&, const Tensor&, const Tensor&,
                                                  double, int64_t, c10::List<bool>);

auto& fwd_op() {
  static auto op = typed_op<FwdSig>("lora_kernels::lora_embedding_fwd");
  return op;
}

auto& bwd_op() {
  static auto op = typed_op<BwdSig>("lora_kernels::lora_embedding_bwd");
  return op;
}

class EmbeddingFunction : public torch::autograd::Function<EmbeddingFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& indices, const Tensor& weight,
                               const Tensor& lora_A, const Tensor& lora_B, double scaling,
                               int64_t padding_idx) {
    Tensor y, s;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, s) = fwd_op().call(indices, weight, lora_A, lora_B, scaling, padding_idx);
    }
    ctx->mark_non_differentiable({s});
    ctx->set_materialize_grads(false);
    ctx->saved_data["mask"] = c10::List<bool>(
        {ctx->needs_input_grad(1), ctx->needs_input_grad(2), ctx->needs_input_grad(3)});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["padding_idx"] = padding_idx;
    ctx->save_for_backward({indices, weight, lora_A, lora_B, s});
    return {y, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    const Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const c10::List<bool> mask = ctx->saved_data["mask"].toBoolList();
    Tensor dw, da, dB;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dw, da, dB) = bwd_op().call(grad, saved[0], saved[1], saved[2], saved[3],
                                           saved[4], ctx->saved_data["scaling"].toDouble(),
                                           ctx->saved_data["padding_idx"].toInt(), mask);
    }
    out[1] = mask.get(0) ? dw : Tensor();
    out[2] = mask.get(1) ? da : Tensor();
    out[3] = mask.get(2) ? dB : Tensor();
    return out;
  }
};

std::tuple<Tensor, Tensor> lora_embedding_fwd_autograd(const Tensor& indices,
                                                       const Tensor& weight,
                                                       const Tensor& lora_A,
                                                       const Tensor& lora_B, double scaling,
                                                       int64_t padding_idx) {
  if (!at::GradMode::is_enabled() ||
      !(weight.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below;  // nothing to record
    return fwd_op().call(indices, weight, lora_A, lora_B, scaling, padding_idx);
  }
  auto out = EmbeddingFunction::apply(indices, weight, lora_A, lora_B, scaling, padding_idx);
  return {out[0], out[1]};
}

// Whether t's values can be read here (not a FakeTensor or another Python
// tensor subclass, whose data torch.compile does not have).
bool readable(const Tensor& t) {
  return !t.key_set().has(c10::DispatchKey::Python) && t.device().is_cpu();
}

Tensor lora_embedding(const Tensor& indices, const Tensor& weight, const Tensor& lora_A,
                      const Tensor& lora_B, double scaling, std::optional<int64_t> padding_idx) {
  const auto it = indices.scalar_type();
  if (it != at::kLong && it != at::kInt)
    fail_arg("indices.dtype", py_dtype(it), "torch.int64 or torch.int32");
  if (weight.dim() != 2) fail_arg("weight.dim()", weight.dim(), 2);
  const int64_t num = weight.size(0), dim = weight.size(1);
  const int64_t r = lora_A.dim() == 2 ? lora_A.size(0) : 0;
  if (lora_A.dim() != 2 || r == 0 || lora_A.size(1) != num)
    fail_arg("lora_A.shape", py_shape(lora_A), "(r, " + std::to_string(num) + ")");
  if (lora_B.sizes() != at::IntArrayRef({dim, r}))
    fail_arg("lora_B.shape", py_shape(lora_B), py_tuple(std::vector<int64_t>{dim, r}));
  check_same_as("lora_A", lora_A, "weight", weight);
  check_same_as("lora_B", lora_B, "weight", weight);
  if (indices.device() != weight.device())
    TORCH_CHECK_VALUE(false, "indices.device: got ", indices.device().str(),
                      ", expected weight's device ", weight.device().str());
  const Tensor flat = indices.reshape({-1}).to(at::kLong);
  if (readable(flat) && flat.numel() > 0) {
    const auto [lo_t, hi_t] = at::aminmax(flat);
    const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
    if (lo < 0 || hi >= num)
      TORCH_CHECK_VALUE(false, "indices: got values in [", lo, ", ", hi,
                        "], expected values in [0, ", num - 1, "]");
  }
  const int64_t pad = padding_idx.has_value() ? ((*padding_idx % num) + num) % num : -1;
  Tensor y = std::get<0>(fwd_op().call(flat, weight, lora_A, lora_B, scaling, pad));
  return with_leading_dims(y, indices.sym_sizes(), dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels, Autograd, m) {
  m.impl("lora_embedding_fwd", &lora_embedding_fwd_autograd);
}

TORCH_LIBRARY_IMPL(lora_kernels, CompositeImplicitAutograd, m) {
  m.impl("lora_embedding", &lora_embedding);
}

}  // namespace lora_kernels
