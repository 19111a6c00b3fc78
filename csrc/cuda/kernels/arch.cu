// Whether this build's kernels run on the current GPU: the CUDA runtime
// reports a kernel's attributes only where the binary holds code for the
// GPU's architecture (a cubin it can run, or PTX the driver compiles).
#include <cuda_runtime_api.h>

#include "launch.h"

namespace lora_kernels {
namespace cuda {
namespace {

__global__ void probe_kernel() {}

}  // namespace

bool kernels_run_on_current_device() {
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, probe_kernel) == cudaSuccess) return true;
  (void)cudaGetLastError();  // clear the (non-sticky) error the probe left
  return false;
}

}  // namespace cuda
}  // namespace lora_kernels
