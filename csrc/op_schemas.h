// The schemas of the ops (the op contract: lora_kernels/ops.py).
//
// define_ops: the lora_kernels library (csrc/library.cpp), the ops users and
// layers call. Each op's kernels are registered in the files named after it:
// the CPU kernel in csrc/cpu/<op>.cpp, the CUDA kernel in csrc/cuda/<op>.cpp,
// the autograd (and the user-facing composites) in csrc/<op>.cpp; the
// dispatcher picks the kernel from the tensors' device. DoRA's ops
// (csrc/dora_linear.cpp) are composed from those kernels, on every device.
// merge_, unmerge_ and merged_weight, which run once per train()/eval()
// switch rather than per step, are defined in Python (lora_kernels/ops.py).
//
// define_backend_ops: the same kernels as one backend's library
// (lora_kernels_cpu, lora_kernels_cuda), which the Python backend registry
// calls when a backend is asked for by name (use_backend, tests).
#pragma once

#include <torch/library.h>

namespace lora_kernels {

// The kernels a backend implements (shared by both libraries).
constexpr const char* kLinearFwd =
    "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "Tensor seed, float scaling, float dropout_p, bool fan_in_fan_out, int num_groups, "
    "int[] groups) -> (Tensor, Tensor)";
constexpr const char* kLinearBwd =
    "lora_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
    "Tensor s, Tensor seed, float scaling, float dropout_p, bool fan_in_fan_out, "
    "int num_groups, int[] groups, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, "
    "Tensor)";
constexpr const char* kEmbeddingBwd =
    "lora_embedding_bwd(Tensor grad, Tensor indices, Tensor weight, Tensor lora_A, "
    "Tensor lora_B, Tensor s, float scaling, int padding_idx, bool[] output_mask) -> "
    "(Tensor, Tensor, Tensor)";
constexpr const char* kDropout = "dropout(Tensor x, Tensor seed, float p) -> Tensor";
constexpr const char* kDeltaFwd =
    "lora_delta_fwd(Tensor x, Tensor base, Tensor lora_A, Tensor lora_B, Tensor seed, "
    "float scaling, float dropout_p, int num_groups, int[] groups) -> (Tensor, Tensor)";
constexpr const char* kDeltaBwd =
    "lora_delta_bwd(Tensor grad, Tensor x, Tensor lora_A, Tensor lora_B, Tensor s, Tensor seed, "
    "float scaling, float dropout_p, int num_groups, int[] groups, bool[] output_mask) -> "
    "(Tensor, Tensor, Tensor)";

inline void define_ops(torch::Library& m) {
  m.def(kLinearFwd);
  m.def(kLinearBwd);
  // (padding_idx is for the backward; the forward ignores it)
  m.def(
      "lora_embedding_fwd(Tensor indices, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scaling, int padding_idx) -> (Tensor, Tensor)");
  m.def(kEmbeddingBwd);
  m.def(kDropout);
  // The LoRA branch around a base layer computed elsewhere (quantized, say).
  m.def(kDeltaFwd);
  m.def(kDeltaBwd);
  // The user-facing composites the layers call (csrc/lora_linear.cpp,
  // csrc/lora_embedding.cpp, csrc/lora_delta.cpp): argument checks, the
  // dropout seed, any leading batch dimensions; then the kernels above.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, bool training, bool fan_in_fan_out, int num_groups, "
      "int[] groups) -> Tensor");
  m.def(
      "lora_embedding(Tensor indices, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scaling, int? padding_idx) -> Tensor");
  m.def(
      "lora_delta(Tensor x, Tensor base, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, bool training, int num_groups, int[] groups) -> Tensor");
  // The frozen GEMM over dropout's dropped entries only (csrc/dropped_linear.h):
  // how DoRA gets x̂·Wᵀ from x·Wᵀ. Internal, no autograd.
  m.def(
      "dropped_linear(Tensor input, Tensor x, Tensor weight, Tensor seed, float p, "
      "float beta, float alpha) -> Tensor");
  m.def(
      "dropped_linear_bwd_(Tensor(a!) dx, Tensor grad, Tensor weight, Tensor seed, float p, "
      "float alpha) -> ()");
  // DoRA (csrc/dora_linear.cpp): composed from the kernels above, for every
  // device (no kernel of its own), with its autograd and the user-facing op.
  m.def(
      "dora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor mag, Tensor seed, float scaling, float dropout_p, bool fan_in_fan_out) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "dora_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor mag, Tensor s, Tensor z, Tensor seed, float scaling, float dropout_p, "
      "bool fan_in_fan_out, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor weight_sq, float scaling, float dropout_p, bool training, "
      "bool fan_in_fan_out, Tensor? lora_bias) -> Tensor");
}

inline void define_backend_ops(torch::Library& m) {
  m.def(kLinearFwd);
  m.def(kLinearBwd);
  m.def(
      "lora_embedding_fwd(Tensor indices, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scaling) -> (Tensor, Tensor)");
  m.def(kEmbeddingBwd);
  m.def(
      "merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling, "
      "bool fan_in_fan_out, int num_groups, int[] groups) -> ()");
  m.def(kDropout);
  m.def(kDeltaFwd);
  m.def(kDeltaBwd);
}

}  // namespace lora_kernels
