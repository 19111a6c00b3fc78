// The launcher of dropout.cuh's kernel (declared in launch.h), instantiated for the
// dtypes the ops use; each launch is checked.
#include "dropout.cuh"
#include "launch_checked.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t>
void launch_dropout(const DropoutArgs<scalar_t>& a, Stream stream) {
  launch_checked(&dropout_kernel<scalar_t>, dropout_shape(a), a, stream);
}

template void launch_dropout<c10::Half>(const DropoutArgs<c10::Half>&, Stream);
template void launch_dropout<c10::BFloat16>(const DropoutArgs<c10::BFloat16>&, Stream);
template void launch_dropout<float>(const DropoutArgs<float>&, Stream);
template void launch_dropout<double>(const DropoutArgs<double>&, Stream);

}  // namespace cuda
}  // namespace lora_kernels
