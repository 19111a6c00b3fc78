// out = x · mask (the dropout op): one thread per Philox counter, i.e. per 8
// consecutive elements of a row, grid-stride. The multiply is done as the
// reference does it, in x's dtype (the keep scale rounded to x's dtype, the
// product through the op-math type and rounded once), so results are
// bitwise those of lora_kernels.reference.dropout and of the CPU backend.
#pragma once

#include "common.cuh"

namespace lora_kernels {
namespace cuda {

template <typename scalar_t>
__global__ void __launch_bounds__(kDropThreads) dropout_kernel(const DropoutArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t words = philox::words_per_row(a.cols);
  const int64_t total = a.rows * words;
  const uint64_t seed = mask_seed(a.mask);
  const acc_t keep = static_cast<acc_t>(a.keep);
  const acc_t zero = acc_t(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < total;
       n += stride) {
    const int64_t i = n / words;
    const int64_t j0 = (n - i * words) * 8;
    const int64_t valid = lk_min<int64_t>(8, a.cols - j0);
    const int64_t offset = i * a.cols + j0;
    const uint32_t bits = keep_bits8(seed, i, j0, words, a.mask.threshold);
    scalar_t v[8];
    const bool whole = a.vec && valid == 8;
    if (whole) {
      constexpr int kPacks = 8 * static_cast<int>(sizeof(scalar_t)) / 16;
      Pack16 packs[kPacks];
      const Pack16* src = reinterpret_cast<const Pack16*>(a.x + offset);
#pragma unroll
      for (int p = 0; p < kPacks; ++p) packs[p] = src[p];
      memcpy(v, packs, sizeof(v));
    } else {
#pragma unroll
      for (int l = 0; l < 8; ++l) v[l] = l < valid ? a.x[offset + l] : scalar_t(0);
    }
#pragma unroll
    for (int l = 0; l < 8; ++l)
      v[l] = static_cast<scalar_t>(static_cast<acc_t>(v[l]) * (((bits >> l) & 1u) ? keep : zero));
    if (whole) {
      constexpr int kPacks = 8 * static_cast<int>(sizeof(scalar_t)) / 16;
      Pack16 packs[kPacks];
      memcpy(packs, v, sizeof(v));
      Pack16* dst = reinterpret_cast<Pack16*>(a.out + offset);
#pragma unroll
      for (int p = 0; p < kPacks; ++p) dst[p] = packs[p];
    } else {
      for (int l = 0; l < valid; ++l) a.out[offset + l] = v[l];
    }
  }
}

}  // namespace cuda
}  // namespace lora_kernels
