// out = alpha · Σ_p parts[p] (in p order, element by element: deterministic),
// converted to the output dtype: the last step of every split reduction.
#pragma once

#include "common.cuh"

namespace lora_kernels {
namespace cuda {

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kSumThreads)
    sum_parts_kernel(const SumPartsArgs<acc_t, out_t> a) {
  const int64_t numel = a.rows * a.cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += stride) {
    acc_t s = a.parts[e];
    for (int64_t p = 1; p < a.n; ++p) s += a.parts[p * numel + e];
    const int64_t r = e / a.cols, c = e - r * a.cols;
    a.out[r * a.out_ld + c] = static_cast<out_t>(a.alpha * s);
  }
}

}  // namespace cuda
}  // namespace lora_kernels
