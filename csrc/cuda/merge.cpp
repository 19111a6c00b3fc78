// merge_ on CUDA: W += scaling · ΔW in place, in W's own layout, group by
// group (ΔW = B_full·A; with fan_in_fan_out W is (in, out) and ΔWᵀ is added).
// Unmerge passes -scaling.
//
// Memory plan: no W-sized temporary, one read and one write of W
// (kernels/rank_update.cuh in accumulate mode): each 64 × 64 tile of W gets
// scaling · B_full·A computed in registers, in fp32 (fp64 when W or A is
// fp64), added to W's own values and rounded once to W's dtype. B_full
// (out × R) and A in the compute dtype are the only copies (tiny). Any W
// strides work; the tile loop runs along W's unit-stride dimension when it
// has one. Each element is updated by exactly one thread.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"

namespace lora_kernels {
namespace cuda {
namespace {

constexpr const char* kOp = "merge_";

template <typename scalar_t, typename acc_t>
void merge_kernel_call(const Tensor& weight, const Tensor& A_c, const Tensor& B_c, double scaling,
                       bool fan_in_fan_out) {
  const int64_t R = A_c.size(0), in = A_c.size(1), out = B_c.size(0);
  // W as an (out, in) matrix: the strides of its two logical dimensions.
  const int64_t s_out = fan_in_fan_out ? weight.stride(1) : weight.stride(0);
  const int64_t s_in = fan_in_fan_out ? weight.stride(0) : weight.stride(1);
  scalar_t* const w = weight.data_ptr<scalar_t>();
  RankUpdateArgs<scalar_t, acc_t> up;
  up.accumulate = true;
  up.R = R;
  up.alpha = static_cast<acc_t>(scaling);
  if (s_in == 1 || s_out != 1) {
    // Rows of the update are out features, columns in features:
    // W[o, i] += Σ_k B_full[o, k]·A[k, i].
    up.set_L(B_c.data_ptr<acc_t>(), R, 1);
    up.set_Rm(A_c.data_ptr<acc_t>(), 1, in);  // A (R × in) read as in × R
    up.set_out(w, s_out, s_in);
    up.T = out;
    up.N = in;
  } else {
    // W's unit stride runs along the out features (e.g. fan_in_fan_out):
    // rows are in features, W[o, i] += Σ_k A[k, i]·B_full[o, k].
    up.set_L(A_c.data_ptr<acc_t>(), 1, in);  // A (R × in) read as in × R
    up.set_Rm(B_c.data_ptr<acc_t>(), R, 1);
    up.set_out(w, s_in, s_out);
    up.T = in;
    up.N = out;
  }
  launch_rank_update<scalar_t, acc_t>(up, current_stream());
}

void merge_impl(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scaling,
                bool fan_in_fan_out, int64_t num_groups, at::IntArrayRef groups) {
  const GroupLayout L = check_merge<DeviceChecks>(kOp, weight, lora_A, lora_B, fan_in_fan_out,
                                                  num_groups, groups)
                            .L;
  if (L.enabled() == 0 || weight.numel() == 0) return;
  at::assert_no_internal_overlap(weight);  // each element is written by one thread
  const c10::cuda::CUDAGuard guard(weight.device());

  const bool wide = weight.scalar_type() == at::kDouble || lora_A.scalar_type() == at::kDouble;
  const auto ct = wide ? at::kDouble : at::kFloat;
  const Tensor A_c = lora_A.to(ct).contiguous();  // (R, in)
  const Tensor B_c = b_full(lora_B, L, ct);       // (out, R)
  check_contiguous(kOp, "lora_A (compute dtype)", A_c);
  check_contiguous(kOp, "B_full", B_c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), kOp, [&] {
    if (wide)
      merge_kernel_call<scalar_t, double>(weight, A_c, B_c, scaling, fan_in_fan_out);
    else if constexpr (!std::is_same_v<scalar_t, double>)
      merge_kernel_call<scalar_t, float>(weight, A_c, B_c, scaling, fan_in_fan_out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels_cuda, CUDA, m) {
  m.impl("merge_", below_autograd<&merge_impl>);
}

}  // namespace cuda
}  // namespace lora_kernels
