// lora_embedding_fwd on CUDA: y = W[idx] + scaling · Aᵀ[idx]·Bᵀ
// (A: r × num, B: dim × r), and s = Aᵀ[idx] for backward.
//
// Memory plan
//   * s = Aᵀ[idx] (tokens × r, float32 for half weights) is gathered from A
//     (ATen index_select: it checks the indices on the device) and returned;
//     the caller keeps it for dB, and the indices for dA and dweight.
//   * y (tokens × dim) is written once (kernels/rank_update.cuh): each tile
//     gathers its rows of W and adds scaling · s·Bᵀ, accumulated in fp32
//     (fp64 for fp64) and rounded once. No tokens × dim intermediate, no ΔW.
#include <ATen/ops/index_select.h>
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "lora_embedding_fwd";

std::tuple<Tensor, Tensor> lora_embedding_fwd_impl(const Tensor& indices, const Tensor& weight,
                                                   const Tensor& lora_A, const Tensor& lora_B,
                                                   double scaling) {
  check_embedding_operands<DeviceChecks>(kOp, indices, weight, lora_A, lora_B);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto lt = lowrank_dtype(weight.scalar_type());
  const int64_t T = indices.size(0), num = weight.size(0), dim = weight.size(1),
                r = lora_A.size(0);
  Tensor s = at::empty({T, r}, weight.options().dtype(lt));
  if (T && r) s.copy_(at::index_select(lora_A, 1, indices).t());
  if (T == 0 || r == 0 || dim == 0) return {at::index_select(weight, 0, indices).contiguous(), s};

  const Tensor idx = indices.to(at::kLong).contiguous();
  const Tensor w = rows_layout(weight);
  const Tensor B_l = lora_B.to(lt).contiguous();  // (dim, r)
  check_contiguous(kOp, "indices (int64)", idx);
  check_contiguous(kOp, "lora_B (low-rank dtype)", B_l);
  Tensor y = at::empty({T, dim}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), kOp, [&] {
    using acc_t = acc_type<scalar_t>;
    RankUpdateArgs<scalar_t, acc_t> up;
    up.set_L(s.data_ptr<acc_t>(), r, 1);
    up.set_Rm(B_l.data_ptr<acc_t>(), r, 1);
    up.set_out(y.data_ptr<scalar_t>(), dim, 1);
    up.rows = w.data_ptr<scalar_t>();
    up.rows_ld = row_stride(w);
    up.num_rows = num;
    up.idx = idx.data_ptr<int64_t>();
    up.T = T;
    up.N = dim;
    up.R = r;
    up.alpha = static_cast<acc_t>(scaling);
    launch_rank_update<scalar_t, acc_t>(up, current_stream());
  });
  return {y, s};
}

// lora_kernels::lora_embedding_fwd also takes the padding index, which only
// its backward uses.
std::tuple<Tensor, Tensor> lora_embedding_fwd_op(const Tensor& indices, const Tensor& weight,
                                                 const Tensor& lora_A, const Tensor& lora_B,
                                                 double scaling, int64_t /*padding_idx*/) {
  return lora_embedding_fwd_impl(indices, weight, lora_A, lora_B, scaling);
}

}  // namespace

// The dispatcher's CUDA kernel of lora_kernels::lora_embedding_fwd, and the
// cuda backend's handle on it (lora_kernels_cuda, for use_backend("cuda") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("lora_embedding_fwd", below_autograd<&lora_embedding_fwd_op>);
}

TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("lora_embedding_fwd", below_autograd<&lora_embedding_fwd_impl>);
}

}  // namespace cuda
}  // namespace lora_kernels
