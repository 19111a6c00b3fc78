// The forward low-rank pass of the CPU kernels, shared by lora_linear_fwd
// (y = bias + update, then its frozen GEMM adds x·Wᵀ) and lora_delta_fwd
// (y = base + update, the base computed by someone else). The memory plan is
// lora_linear_fwd.cpp's.
#pragma once

#include <algorithm>
#include <vector>

#include "common.h"

namespace lora_kernels {
namespace cpu {

// s = dropout(x)·Aᵀ and y = bias + scaling·s·Bᵀ (lora_linear_fwd, before its
// frozen GEMM adds x·Wᵀ), or y = base + scaling·s·Bᵀ (lora_delta_fwd: `base`
// defined, (T, out), any strides; `bias` undefined), group by group, row
// block by row block. Raw pointers and plain buffers throughout (no ATen
// calls, views or tensor temporaries in the loop): a small call costs its
// arithmetic, not its setup.
template <typename scalar_t>
void lowrank_forward(const Tensor& x, const Tensor& bias, const Tensor& base, Tensor& y, Tensor& s,
                     const Tensor& A_l, const Tensor& B_l, const GroupLayout& L, double scaling,
                     const MaskParams& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t T = x.size(0);
  const int64_t in = x.size(1);
  const int64_t r = L.r;
  const int64_t ng = L.enabled();
  const int64_t size = L.size;
  const int64_t out = L.num_groups * size;
  const int64_t R = A_l.size(0);
  const int64_t lane_ld = lane_stride(in);
  const LaneMask<acc_t> lane_mask(mask);
  const bool has_bias = bias.defined();
  const int64_t rk = has_bias ? r + 1 : r;  // inner dimension of the update
  // Which group each out column block belongs to: -1 when it has no update.
  std::vector<int64_t> slot_of(static_cast<size_t>(L.num_groups), -1);
  for (int64_t i = 0; i < ng; ++i) slot_of[L.groups[i]] = i;

  // Row-major operands of the small GEMMs (mm_rm_ptr, common.h), filled by
  // plain loops: Aᵀ (in × R), and per group Bext_i = [scaling·B_iᵀ ; bias_i]
  // (rk × size, the bias row only with a bias), so that
  // y_g = [s_i | 1]·Bext_i writes bias + update in one pass.
  const auto packed = scratch<acc_t>(in * R + ng * rk * size);
  acc_t* At = packed.get();
  acc_t* Bext = At + in * R;
  transpose_scaled<acc_t>(At, A_l.const_data_ptr<acc_t>(), R, in, in, acc_t(1));
  const acc_t* b = B_l.const_data_ptr<acc_t>();  // (ng·size, r)
  for (int64_t i = 0; i < ng; ++i)
    transpose_scaled<acc_t>(Bext + i * rk * size, b + i * size * r, size, r, r,
                            static_cast<acc_t>(scaling));
  const Tensor bias_c = has_bias ? bias.contiguous() : Tensor();
  const scalar_t* bp = has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
  if (has_bias)
    for (int64_t i = 0; i < ng; ++i)
      for (int64_t c = 0; c < size; ++c)
        Bext[(i * rk + r) * size + c] = static_cast<acc_t>(bp[L.col0(i) + c]);

  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const bool x_rows = rows_in_place(x);
  // x is read in place when it is already dropout(x) in the low-rank dtype.
  const bool need_buf = mask.active || !kSame || !x_rows;
  scalar_t* yp = y.data_ptr<scalar_t>();  // (T, out), contiguous
  const bool has_base = base.defined();
  const scalar_t* basep = has_base ? base.const_data_ptr<scalar_t>() : nullptr;
  const int64_t bs0 = has_base ? base.stride(0) : 0, bs1 = has_base ? base.stride(1) : 0;
  acc_t* sp = s.data_ptr<acc_t>();        // (T, R), contiguous

  auto run = [&](int64_t b0, int64_t b1) {
    const int64_t rows = std::min(kRowBlock, T);  // rows of a block, at most
    const auto xbuf = scratch<acc_t>(need_buf ? rows * in : 0);
    const auto sext = scratch<acc_t>(has_bias ? rows * rk : 0);  // [s_i | 1]
    const auto tmp = scratch<acc_t>(kSame ? 0 : rows * size);
    const auto lanes = scratch<uint16_t>(mask.active ? rows * lane_ld : 0);
    for (int64_t i = 0; has_bias && i < rows; ++i) sext[i * rk + r] = acc_t(1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock;
      const int64_t n = std::min(kRowBlock, T - r0);
      const Vary vary = vary_m(n == kRowBlock);  // a stable shape for mm_rm_ptr
      const acc_t* src = reinterpret_cast<const acc_t*>(xp + r0 * xs0);
      int64_t ld = row_ld(x);
      if (need_buf) {  // dropout(x_blk) in the low-rank dtype
        if (mask.active) mask_lanes(mask, r0, n, in, lanes.get());
        load_rows<scalar_t, acc_t>(xp, xs0, xs1, r0, n, in, xbuf.get(),
                                   mask.active ? lanes.get() : nullptr, lane_ld, lane_mask);
        src = xbuf.get();
        ld = in;
      }
      acc_t* s_blk = sp + r0 * R;
      mm_rm_ptr<acc_t>(n, R, in, src, ld, At, R, s_blk, R, false, vary);
      for (int64_t grp = 0; grp < L.num_groups; ++grp) {
        const int64_t i = slot_of[grp];
        scalar_t* y_g = yp + r0 * out + grp * size;
        const scalar_t* base_g = has_base ? basep + r0 * bs0 + grp * size * bs1 : nullptr;
        if (i < 0 || has_base) {  // the group's starting value: base, bias or zero
          for (int64_t t = 0; t < n; ++t)
            for (int64_t c = 0; c < size; ++c)
              y_g[t * out + c] = has_base   ? base_g[t * bs0 + c * bs1]
                                 : has_bias ? bp[grp * size + c]
                                            : scalar_t(0);
          if (i < 0) continue;
        }
        const acc_t* lhs = s_blk + i * r;  // (n, r), row stride R
        int64_t ld_l = R;
        if (has_bias) {
          for (int64_t t = 0; t < n; ++t)
            for (int64_t k = 0; k < r; ++k) sext[t * rk + k] = lhs[t * R + k];
          lhs = sext.get();
          ld_l = rk;
        }
        const acc_t* rhs = Bext + i * rk * size;
        if constexpr (kSame) {  // with a base, the update accumulates onto it
          mm_rm_ptr<acc_t>(n, size, rk, lhs, ld_l, rhs, size, y_g, out, has_base, vary);
        } else {
          // y_g = half([base or bias +] scaling · s_i·B_iᵀ), accumulated in
          // float32 and rounded once.
          mm_rm_ptr<acc_t>(n, size, rk, lhs, ld_l, rhs, size, tmp.get(), size, false, vary);
          for (int64_t t = 0; t < n; ++t)
            for (int64_t c = 0; c < size; ++c) {
              const acc_t start = has_base ? static_cast<acc_t>(y_g[t * out + c]) : acc_t(0);
              y_g[t * out + c] = static_cast<scalar_t>(start + tmp[t * size + c]);
            }
        }
      }
    }
  };
  const int64_t blocks = num_row_blocks(T);
  if (blocks == 1)
    run(0, 1);  // no parallel region for one block
  else
    at::parallel_for(0, blocks, 1, run);
}

}  // namespace cpu
}  // namespace lora_kernels
