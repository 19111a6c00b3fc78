// The launcher of rank_r_grads.cuh's kernel (declared in launch.h), instantiated for the
// dtypes the ops use; each launch is checked.
#include "launch_checked.cuh"
#include "rank_r_grads.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t>
void launch_rank_r_grads(const RankGradsArgs<scalar_t>& a, Stream stream) {
  launch_checked(rank_r_grads_kernel_for<scalar_t>(a.R), rank_r_grads_shape(a), a, stream);
}

template void launch_rank_r_grads<c10::Half>(const RankGradsArgs<c10::Half>&, Stream);
template void launch_rank_r_grads<c10::BFloat16>(const RankGradsArgs<c10::BFloat16>&, Stream);
template void launch_rank_r_grads<float>(const RankGradsArgs<float>&, Stream);
template void launch_rank_r_grads<double>(const RankGradsArgs<double>&, Stream);

}  // namespace cuda
}  // namespace lora_kernels
