// The launcher of rank_update.cuh's kernel (declared in launch.h), instantiated for the
// dtypes the ops use; each launch is checked.
#include "launch_checked.cuh"
#include "rank_update.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t, typename acc_t>
void launch_rank_update(const RankUpdateArgs<scalar_t, acc_t>& a, Stream stream) {
  launch_checked(&rank_update_kernel<scalar_t, acc_t>, rank_update_shape(a), a, stream);
}

// (output dtype, accumulation dtype): the ops' own pairs, and for merge_ the
// pairs of a W with fp64 factors (or an fp64 W with fp32 factors).
#define LK_INSTANTIATE(S, A) \
  template void launch_rank_update<S, A>(const RankUpdateArgs<S, A>&, Stream);
LK_INSTANTIATE(c10::Half, float)
LK_INSTANTIATE(c10::BFloat16, float)
LK_INSTANTIATE(float, float)
LK_INSTANTIATE(double, double)
LK_INSTANTIATE(c10::Half, double)
LK_INSTANTIATE(c10::BFloat16, double)
LK_INSTANTIATE(float, double)
#undef LK_INSTANTIATE

}  // namespace cuda
}  // namespace lora_kernels
