// The launcher of dropout.cuh's kernel (declared in launch.h), instantiated for the
// dtypes the ops use; each launch is checked.
#include <c10/cuda/CUDAException.h>

#include "dropout.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t>
void launch_dropout(const DropoutArgs<scalar_t>& a, Stream stream) {
  const LaunchShape s = dropout_shape(a);
  dropout_kernel<scalar_t><<<dim3(s.gx, s.gy, s.gz), s.block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_dropout<c10::Half>(const DropoutArgs<c10::Half>&, Stream);
template void launch_dropout<c10::BFloat16>(const DropoutArgs<c10::BFloat16>&, Stream);
template void launch_dropout<float>(const DropoutArgs<float>&, Stream);
template void launch_dropout<double>(const DropoutArgs<double>&, Stream);

}  // namespace cuda
}  // namespace lora_kernels
