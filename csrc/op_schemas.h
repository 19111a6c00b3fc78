// The schemas of the lora_kernels ops (the op contract in lora_kernels/ops.py),
// defined alike by both backends' libraries: lora_kernels_cpu
// (csrc/cpu/registration.cpp) and lora_kernels_cuda
// (csrc/cuda/registration.cpp). Each op's kernel is registered in its own
// file with TORCH_LIBRARY_IMPL.
#pragma once

#include <torch/library.h>

namespace lora_kernels {

inline void define_ops(torch::Library& m) {
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor seed, float scaling, float dropout_p, bool fan_in_fan_out, int num_groups, "
      "int[] groups) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor s, Tensor seed, float scaling, float dropout_p, bool fan_in_fan_out, "
      "int num_groups, int[] groups, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "lora_embedding_fwd(Tensor indices, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "float scaling) -> (Tensor, Tensor)");
  m.def(
      "lora_embedding_bwd(Tensor grad, Tensor indices, Tensor weight, Tensor lora_A, "
      "Tensor lora_B, Tensor s, float scaling, int padding_idx, bool[] output_mask) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling, "
      "bool fan_in_fan_out, int num_groups, int[] groups) -> ()");
  m.def("dropout(Tensor x, Tensor seed, float p) -> Tensor");
}

}  // namespace lora_kernels
