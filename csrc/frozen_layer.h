// The frozen layer's share of the linear and embedding ops, plain ATen and
// the same on both backends: the frozen GEMM of the forward, the frozen
// layer's gradients (dweight, the g·W part of dx), and the outputs of a call
// with no low-rank work. ATen only (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/embedding_dense_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "op_checks.h"

namespace lora_kernels {

// lora_linear_fwd of a call with no low-rank work (no tokens, rank 0 or no
// in features): the plain layer y = x·Wᵀ + bias, and s = 0 (tokens × R, in
// the low-rank dtype).
inline std::tuple<at::Tensor, at::Tensor> linear_fwd_without_lowrank(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t R, bool fan_in_fan_out) {
  const at::Tensor w_t = fan_in_fan_out ? weight : weight.t();  // (in, out)
  const at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, w_t)
                                                             : at::mm(x, w_t);
  return {y.contiguous(),
          at::zeros({x.size(0), R}, x.options().dtype(lowrank_dtype(x.scalar_type())))};
}

// The frozen GEMM of lora_linear_fwd, y += x·Wᵀ: one GEMM (BLAS or cuBLAS)
// that accumulates into y (beta = 1), which holds bias + the low-rank update.
// It is the same work as the plain layer's addmm(bias, x, Wᵀ), so the update
// costs no extra pass over y.
inline void add_frozen_linear(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                              bool fan_in_fan_out) {
  const at::Tensor w_t = fan_in_fan_out ? weight : weight.t();  // (in, out)
  y.addmm_(x, w_t, /*beta=*/1.0, /*alpha=*/1.0);
}

// A LoRA gradient (dA or dB) where there is no low-rank work: zeros of the
// parameter's shape when asked for, empty otherwise.
inline at::Tensor zero_grad_or_empty(bool want, const at::Tensor& param) {
  return want ? at::zeros_like(param, at::MemoryFormat::Contiguous) : param.new_empty({0});
}

// A linear layer's dweight: gᵀ·x, or xᵀ·g with fan_in_fan_out (W's own
// layout); empty when not asked for.
inline at::Tensor linear_dweight(bool want, const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& weight, bool fan_in_fan_out) {
  if (!want) return weight.new_empty({0});
  return fan_in_fan_out ? at::mm(x.t(), grad) : at::mm(grad.t(), x);
}

// The frozen part of a linear layer's dx, g·W: one GEMM (BLAS or cuBLAS)
// that accumulates into dx (beta = 1) when dx already holds the low-rank
// part, so that part costs no extra pass over dx; otherwise dx = g·W when
// asked for.
inline void add_frozen_dx(at::Tensor& dx, bool has_lowrank_part, bool want,
                          const at::Tensor& grad, const at::Tensor& weight, bool fan_in_fan_out) {
  const at::Tensor w_oi = fan_in_fan_out ? weight.t() : weight;  // (out, in)
  if (has_lowrank_part)
    dx.addmm_(grad, w_oi, /*beta=*/1.0, /*alpha=*/1.0);
  else if (want)
    dx = at::mm(grad, w_oi).contiguous();
}

// An embedding's dweight: ATen's dense embedding backward of g (a
// num_embeddings × dim tensor, padding_idx skipped); empty when not asked for.
inline at::Tensor embedding_dweight(bool want, const at::Tensor& grad, const at::Tensor& indices,
                                    const at::Tensor& weight, int64_t padding_idx) {
  if (!want) return weight.new_empty({0});
  return at::embedding_dense_backward(grad, indices, weight.size(0), padding_idx, false);
}

}  // namespace lora_kernels
