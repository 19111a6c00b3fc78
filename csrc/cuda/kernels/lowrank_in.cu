// The launcher of lowrank_in.cuh's kernel (declared in launch.h), instantiated for the
// dtypes the ops use; each launch is checked.
#include <c10/cuda/CUDAException.h>

#include "lowrank_in.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t>
void launch_lowrank_in(const LowrankInArgs<scalar_t>& a, Stream stream) {
  const LaunchShape s = lowrank_in_shape(a);
  lowrank_in_kernel_for<scalar_t>(a.R)<<<dim3(s.gx, s.gy, s.gz), s.block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_lowrank_in<c10::Half>(const LowrankInArgs<c10::Half>&, Stream);
template void launch_lowrank_in<c10::BFloat16>(const LowrankInArgs<c10::BFloat16>&, Stream);
template void launch_lowrank_in<float>(const LowrankInArgs<float>&, Stream);
template void launch_lowrank_in<double>(const LowrankInArgs<double>&, Stream);

}  // namespace cuda
}  // namespace lora_kernels
