// The launcher of lowrank_in.cuh's kernel (declared in launch.h), instantiated for the
// dtypes the ops use; each launch is checked.
#include "launch_checked.cuh"
#include "lowrank_in.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t>
void launch_lowrank_in(const LowrankInArgs<scalar_t>& a, Stream stream) {
  launch_checked(lowrank_in_kernel_for<scalar_t>(a.R), lowrank_in_shape(a), a, stream);
}

template void launch_lowrank_in<c10::Half>(const LowrankInArgs<c10::Half>&, Stream);
template void launch_lowrank_in<c10::BFloat16>(const LowrankInArgs<c10::BFloat16>&, Stream);
template void launch_lowrank_in<float>(const LowrankInArgs<float>&, Stream);
template void launch_lowrank_in<double>(const LowrankInArgs<double>&, Stream);

}  // namespace cuda
}  // namespace lora_kernels
