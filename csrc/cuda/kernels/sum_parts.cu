// The launcher of sum_parts.cuh's kernel (declared in launch.h), instantiated for the
// dtypes the ops use; each launch is checked.
#include "launch_checked.cuh"
#include "sum_parts.cuh"

namespace lora_kernels {
namespace cuda {

template <typename acc_t, typename out_t>
void launch_sum_parts(const SumPartsArgs<acc_t, out_t>& a, Stream stream) {
  if (a.rows * a.cols == 0) return;
  launch_checked(&sum_parts_kernel<acc_t, out_t>, sum_parts_shape(a), a, stream);
}

// (partials, output): the low-rank dtype, or the parameters' dtype.
#define LK_INSTANTIATE(A, O) \
  template void launch_sum_parts<A, O>(const SumPartsArgs<A, O>&, Stream);
LK_INSTANTIATE(float, float)
LK_INSTANTIATE(float, c10::Half)
LK_INSTANTIATE(float, c10::BFloat16)
LK_INSTANTIATE(double, double)
#undef LK_INSTANTIATE

}  // namespace cuda
}  // namespace lora_kernels
