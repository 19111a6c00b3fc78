// The cuda backend's library lora_kernels_cuda (../op_schemas.h:
// define_backend_ops) and the empty Python module `lora_kernels._C_cuda`,
// whose import loads this library and so runs the registrations. Each op's
// CUDA kernel is registered in its own file, both as the dispatcher's CUDA
// kernel of the lora_kernels op (defined by lora_kernels._C) and as the
// lora_kernels_cuda op the Python backend registry calls when the cuda
// backend is asked for by name. As lora_kernels._C: no pybind11, built
// against the limited Python API (abi3).
//
// Module attributes: `arch_list`, the TORCH_CUDA_ARCH_LIST this was built
// for (setup.py passes it as LK_CUDA_ARCH_LIST, comma-separated), and
// `cuda_version`, the toolkit's CUDA runtime version (e.g. "13.0").
#include <Python.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../op_schemas.h"

#define LK_STRINGIFY2(...) #__VA_ARGS__
#define LK_STRINGIFY(...) LK_STRINGIFY2(__VA_ARGS__)
#ifdef LK_CUDA_ARCH_LIST
#define LK_ARCH_LIST_STR LK_STRINGIFY(LK_CUDA_ARCH_LIST)
#else
#define LK_ARCH_LIST_STR ""
#endif

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C_cuda",  // name
      nullptr,    // documentation
      -1,         // per-interpreter state: none
      nullptr,    // methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  char version[16];
  PyOS_snprintf(version, sizeof(version), "%d.%d", CUDART_VERSION / 1000,
                CUDART_VERSION % 1000 / 10);
  if (PyModule_AddStringConstant(module, "arch_list", LK_ARCH_LIST_STR) < 0 ||
      PyModule_AddStringConstant(module, "cuda_version", version) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(lora_kernels_cuda, m) {
  lora_kernels::define_backend_ops(m);
}
