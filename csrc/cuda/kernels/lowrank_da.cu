// The launcher of lowrank_da.cuh's kernel (declared in launch.h), instantiated for the
// dtypes the ops use; each launch is checked.
#include "launch_checked.cuh"
#include "lowrank_da.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t>
void launch_lowrank_da(const LowrankDaArgs<scalar_t>& a, Stream stream) {
  launch_checked(lowrank_da_kernel_for<scalar_t>(a.R), lowrank_da_shape(a), a, stream);
}

template void launch_lowrank_da<c10::Half>(const LowrankDaArgs<c10::Half>&, Stream);
template void launch_lowrank_da<c10::BFloat16>(const LowrankDaArgs<c10::BFloat16>&, Stream);
template void launch_lowrank_da<float>(const LowrankDaArgs<float>&, Stream);
template void launch_lowrank_da<double>(const LowrankDaArgs<double>&, Stream);

}  // namespace cuda
}  // namespace lora_kernels
