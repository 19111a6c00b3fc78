// What the autograd and composite kernels of the ops (csrc/<op>.cpp) share:
// the names they use, and typed handles of the ops they call through the
// dispatcher (below autograd, so the device kernel runs).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>

#include <limits>
#include <utility>
#include <vector>

namespace lora_kernels {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The op `name` ("lora_kernels::..."), with the C++ signature Sig.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// A fresh 64-bit dropout seed from the default generator of `like`'s device
// (the draw torch.randint(-2**63, 2**63 - 1, ()) makes, so torch.manual_seed
// and checkpointing's RNG restore give the same mask).
inline Tensor draw_seed(const Tensor& like) {
  return at::randint(std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(),
                     {}, like.options().dtype(at::kLong));
}

// The seed of a call without dropout (never read): for a plain CPU `like`
// one shared zero, made once; otherwise a zero on its device (a FakeTensor
// under torch.compile, functional tensors, other devices).
inline Tensor no_seed(const Tensor& like) {
  constexpr auto kTraced = c10::DispatchKeySet({c10::DispatchKey::Python,
                                                c10::DispatchKey::Functionalize});
  if (like.device().is_cpu() && !like.key_set().has_any(kTraced) &&
      c10::impl::TorchDispatchModeTLS::stack_len() == 0) {
    static const Tensor* zero = new Tensor(at::zeros({}, at::kLong));  // never freed
    return *zero;
  }
  return at::zeros({}, like.options().dtype(at::kLong));
}

// The (weight, fan_in_fan_out) a linear kernel gets: a fan_in_fan_out W that
// is the transpose of a contiguous (out, in) matrix (loralib stores it so)
// goes as that matrix.
inline std::pair<Tensor, bool> standard_layout(const Tensor& weight, bool fan_in_fan_out) {
  if (fan_in_fan_out && !weight.is_contiguous() && weight.t().is_contiguous())
    return {weight.t(), false};
  return {weight, fan_in_fan_out};
}

// y (tokens, features) with the caller's leading dimensions `lead` (x's, or
// the indices'), as a tensor of its own rather than a view (as F.linear
// returns): FSDP2 warns about modules that return views.
inline Tensor with_leading_dims(const Tensor& y, c10::SymIntArrayRef lead, int64_t features) {
  std::vector<c10::SymInt> shape(lead.begin(), lead.end());
  shape.emplace_back(features);
  return at::_unsafe_view_symint(y, shape);
}

}  // namespace lora_kernels
