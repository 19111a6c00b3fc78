// The lora_kernels_cpu operator schemas (one per op; each op's CPU kernel is
// registered in its own file with TORCH_LIBRARY_IMPL) and the empty Python
// module `lora_kernels._C`, whose import loads this library and so runs the
// registrations. No pybind11: the library is built against the limited
// Python API (abi3) and the ops are reached as torch.ops.lora_kernels_cpu.*.
// The argument lists follow the op contract in lora_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // documentation
      -1,       // per-interpreter state: none
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lora_kernels_cpu, m) {
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
  // Test hook (not part of the op contract): raw Philox words, see dropout.cpp.
  m.def("_philox_words(int seed, int n0, int count, int isa) -> Tensor");
}
