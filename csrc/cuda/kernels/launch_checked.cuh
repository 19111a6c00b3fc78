// The launch that every launcher in kernels/*.cu makes: a kernel on its
// LaunchShape (launch.h) and stream, the launch checked. nvcc only (the
// emulation launches the kernels its own way).
#pragma once

#include <c10/cuda/CUDAException.h>

#include "launch.h"

namespace lora_kernels {
namespace cuda {

template <typename Kernel, typename Args>
inline void launch_checked(Kernel kernel, const LaunchShape& s, const Args& a, Stream stream) {
  kernel<<<dim3(s.gx, s.gy, s.gz), s.block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lora_kernels
