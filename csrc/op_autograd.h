// What the autograd and composite kernels of the ops (csrc/<op>.cpp) share:
// the names they use, and typed handles of the ops they call through the
// dispatcher (below autograd, so the device kernel runs).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

namespace lora_kernels {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The op `name` ("lora_kernels::..."), with the C++ signature Sig.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace lora_kernels
