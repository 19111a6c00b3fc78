// merge_: W += scaling · ΔW in place, in W's own layout, group by group
// (ΔW_i = B_i·A_i on the rows of group groups[i]; with fan_in_fan_out W is
// (in, out) and the transpose is added). Unmerge passes -scaling.
//
// Memory plan: no W-sized temporary. W is updated row block by row block
// (kRowBlock rows of W's own layout, blocks in parallel): when W already has
// the compute dtype (float32, or float64 when W or A is float64) the block
// is updated in place by one small GEMM with accumulation (mm_rm,
// common.h); otherwise (half W, or W and A of different precisions) the
// block is widened into a per-thread compute-dtype buffer, ΔW's block is
// accumulated into it, and it is rounded back once. Any W strides work (the
// copies and GEMMs are strided). Each element is updated by exactly one
// block, so the result does not depend on the thread count.
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "merge_";

void merge_impl(const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B, double scaling,
                bool fan_in_fan_out, int64_t num_groups, at::IntArrayRef groups) {
  const LinearShapes d = check_merge<DeviceChecks>(kOp, weight, lora_A, lora_B, fan_in_fan_out,
                                                   num_groups, groups);
  const int64_t in = d.in;
  const GroupLayout& L = d.L;
  const int64_t ng = L.enabled(), r = L.r;
  if (ng == 0 || weight.numel() == 0) return;

  const bool wide = weight.scalar_type() == at::kDouble || lora_A.scalar_type() == at::kDouble;
  const auto ct = wide ? at::kDouble : at::kFloat;
  // Row-major factors with the scaling folded in:
  //   W (out, in):  W[group rows] += (scaling·B_i) · A_i
  //   W (in, out):  W[:, group cols] += A_iᵀ · (scaling·B_i)ᵀ
  const Tensor A_c = fan_in_fan_out ? lora_A.to(ct).t().contiguous()   // (in, R)
                                    : lora_A.to(ct).contiguous();      // (R, in)
  const Tensor B_c = fan_in_fan_out ? (lora_B.to(ct).t() * scaling).contiguous()  // (r, ng·size)
                                    : (lora_B.to(ct) * scaling).contiguous();     // (ng·size, r)
  const bool in_place = weight.scalar_type() == ct;
  const int64_t rows = fan_in_fan_out ? in : L.size;   // rows of one group's slice of W
  const int64_t width = fan_in_fan_out ? L.size : in;  // its row length
  const int64_t nblk = num_row_blocks(rows);
  const auto opts = weight.options().dtype(ct);
  at::parallel_for(0, ng * nblk, 1, [&](int64_t k0, int64_t k1) {
    Tensor buf = in_place ? Tensor() : at::empty({kRowBlock, width}, opts);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = k / nblk;
      const int64_t r0 = (k % nblk) * kRowBlock;
      const int64_t n = std::min(kRowBlock, rows - r0);
      Tensor w_blk = fan_in_fan_out ? weight.narrow(0, r0, n).narrow(1, L.col0(i), L.size)
                                    : weight.narrow(0, L.col0(i) + r0, n);
      const Tensor lhs = fan_in_fan_out ? A_c.narrow(0, r0, n).narrow(1, i * r, r)      // (n, r)
                                        : B_c.narrow(0, i * L.size + r0, n);          // (n, r)
      const Tensor rhs = fan_in_fan_out ? B_c.narrow(1, i * L.size, L.size)           // (r, size)
                                        : A_c.narrow(0, i * r, r);                    // (r, in)
      if (in_place) {
        mm_rm(w_blk, lhs, rhs, /*add=*/true, vary_m(n == kRowBlock));
      } else {
        Tensor b = buf.narrow(0, 0, n);
        b.copy_(w_blk);
        mm_rm(b, lhs, rhs, /*add=*/true, vary_m(n == kRowBlock));
        w_blk.copy_(b);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("merge_", below_autograd<&merge_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
