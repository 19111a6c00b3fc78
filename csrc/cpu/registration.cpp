// The lora_kernels_cpu library: the operator schemas (../op_schemas.h, one
// per op; each op's CPU kernel is registered in its own file with
// TORCH_LIBRARY_IMPL), a CPU-only test hook and a status query, and the empty
// Python module
// `lora_kernels._C`, whose import loads this library and so runs the
// registrations. No pybind11: the library is built against the limited
// Python API (abi3) and the ops are reached as torch.ops.lora_kernels_cpu.*.
#include <Python.h>
#include <torch/library.h>

#include "../op_schemas.h"

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
  lora_kernels::define_backend_ops(m);
  // Test hook (not part of the op contract): raw Philox words, see dropout.cpp.
  m.def("_philox_words(int seed, int n0, int count, int isa) -> Tensor");
  // Status of the row kernels (AVX-512 or AVX2; lowrank_rows.h), for lora_kernels.info.
  m.def("_row_kernels() -> str");
  // The SIMD level of the CPU kernels (cpu_isa.cpp), for lora_kernels.info.
  m.def("_cpu_isa() -> str");
}
