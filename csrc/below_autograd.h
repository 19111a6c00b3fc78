// The function each op registers, CPU and CUDA alike: below_autograd<&impl>.
//
// The kernels are registered for one backend dispatch key (CPU or CUDA)
// only, so they are entered with autograd still on and with inputs that may
// require grad. below_autograd<&impl> opens AutoDispatchBelowAutograd (nested
// ATen calls on this thread skip autograd, as in ATen's own kernels) and
// passes `impl` detached aliases of the tensors that require grad:
// at::parallel_for's worker threads (CPU) do not inherit the dispatch guard,
// and plain tensors keep nested out= / in-place calls legal there too.
// Aliases share storage and version counter, so merge_ still updates the
// caller's weight in place. It has impl's signature, from which the
// dispatcher checks the schema.
//
// below_autograd_this_thread<&impl> opens the guard only, for kernels whose
// ATen calls on their inputs all run on the calling thread (their parallel
// loops read raw pointers): no alias is made per call.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>  // at::AutoDispatchBelowAutograd
#include <ATen/core/Tensor.h>

#include <optional>
#include <type_traits>

namespace lora_kernels {

// An op argument as impl gets it: a detached alias of a tensor, anything
// else as it is.
// (Only tensors that require grad are detached: the others are plain data
// already, and a detach costs a TensorImpl.)
template <typename T>
auto plain(const T& v) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return (v.defined() && v.requires_grad()) ? v.detach() : v;
  } else if constexpr (std::is_same_v<T, std::optional<at::Tensor>>) {
    return (v.has_value() && v->defined() && v->requires_grad())
               ? std::optional<at::Tensor>(v->detach())
               : v;
  } else {
    return v;
  }
}

template <auto Impl>
struct BelowAutograd;

template <typename R, typename... Args, R (*Impl)(Args...)>
struct BelowAutograd<Impl> {
  static R call(Args... args) {
    const at::AutoDispatchBelowAutograd below_autograd;
    return Impl(plain(args)...);
  }
};

template <auto Impl>
constexpr auto below_autograd = &BelowAutograd<Impl>::call;

template <auto Impl>
struct BelowAutogradThisThread;

template <typename R, typename... Args, R (*Impl)(Args...)>
struct BelowAutogradThisThread<Impl> {
  static R call(Args... args) {
    const at::AutoDispatchBelowAutograd below_autograd;
    return Impl(args...);
  }
};

template <auto Impl>
constexpr auto below_autograd_this_thread = &BelowAutogradThisThread<Impl>::call;

}  // namespace lora_kernels
