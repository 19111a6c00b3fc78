// dropout on CUDA: x times the mask of x's shape (lora_kernels/reference.py),
// as a new contiguous tensor. Bitwise equal to the reference and to the CPU
// backend: the kept value is built as the reference builds it (the keep
// scale rounded through the op-math type to x's dtype) and multiplied in
// x's dtype (kernels/dropout.cuh).
//
// Memory plan: only the output. One thread per Philox call (8 elements);
// the mask exists only in registers. The seed is read on the device.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "dropout";

Tensor dropout_impl(const Tensor& x, const Tensor& seed, double p) {
  check_is_cuda(kOp, "x", x);
  check_arch(kOp, x);
  check_floating(kOp, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const MaskArgs mask = make_mask(kOp, seed, p, x);
  const Tensor xc = x.contiguous();
  if (!(p > 0.0)) return xc.clone();
  Tensor out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t cols = x.dim() ? x.size(-1) : 1;
  const int64_t rows = cols ? x.numel() / cols : 0;
  if (rows == 0 || cols == 0) return out;
  check_contiguous(kOp, "x (contiguous copy)", xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using acc_t = acc_type<scalar_t>;
    DropoutArgs<scalar_t> a;
    a.x = xc.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.rows = rows;
    a.cols = cols;
    a.vec = cols % 8 == 0 && rows_aligned(a.x, cols, 8) && rows_aligned(a.out, cols, 8);
    a.mask = mask;
    a.keep = static_cast<scalar_t>(static_cast<acc_t>(mask.scale));
    launch_dropout<scalar_t>(a, current_stream());
  });
  return out;
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::dropout, and the cuda backend's
// handle on it (lora_kernels_cuda::dropout, for use_backend("cuda") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("dropout", below_autograd<&dropout_impl>);
}
TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("dropout", below_autograd<&dropout_impl>);
}

}  // namespace cuda
}  // namespace lora_kernels
