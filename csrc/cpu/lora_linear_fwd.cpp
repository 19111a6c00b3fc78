// lora_linear_fwd: y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·Bᵀ, group by group,
// and s = dropout(x)·Aᵀ for backward.
//
// Memory plan
//   * y (tokens×out) is the only tokens×out tensor, and it is written once
//     by the low-rank pass and then completed by the frozen GEMM:
//       1. one parallel loop over FIXED row blocks of x (kRowBlock rows,
//          independent of the thread count): the block's mask is
//          regenerated, dropout(x_blk) goes into a per-thread buffer
//          (kRowBlock × in), s_blk = buffer·Aᵀ, and
//          y_blk = [s_blk,i | 1]·[scaling·B_iᵀ ; bias_i] per group (one
//          GEMM writes bias + update; bias only on groups without one).
//          The GEMMs inside the loop are single-threaded micro-kernel/BLAS
//          calls on cache-sized blocks (mm_rm_ptr in common.h), on raw
//          pointers and plain buffers: a small call (one block, no parallel
//          region) pays for its arithmetic, not for tensor setup.
//       2. y += x·Wᵀ: one multithreaded BLAS GEMM with beta = 1. This is the
//          same work as the plain layer's addmm(bias, x, Wᵀ) (which also
//          writes the broadcast bias into y and accumulates with beta = 1),
//          so the low-rank update costs no extra pass over y.
//   * s (tokens × r·len(groups)) is returned and kept by the caller for
//     backward (dB needs it; it is tiny next to x). It is float32 for half
//     inputs, x's dtype otherwise.
//   * The dropout mask is never stored: it is a pure function of
//     (seed, p, element position) and backward regenerates it. Dropped x
//     exists only one row block at a time per thread; with p == 0, no
//     dtype conversion and contiguous rows, x is read in place.
//   * Every row block is computed the same way whatever thread runs it, so
//     the result is bitwise independent of the thread count.
//   * Half inputs: A, B and the bias are widened to float32 once (r×in,
//     out×r, out), the low-rank products are float32, y_blk is rounded once
//     before the frozen GEMM accumulates into it.
#include <torch/library.h>

#include "../below_autograd.h"
#include "../frozen_layer.h"
#include "common.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "lora_linear_fwd";

// Phase 1: s and y = bias + low-rank update, row block by row block. Raw
// pointers and plain buffers throughout (no ATen calls, views or tensor
// temporaries in the loop): a small call costs its arithmetic, not its setup.
template <typename scalar_t>
void lowrank_forward(const Tensor& x, const Tensor& bias, Tensor& y, Tensor& s, const Tensor& A_l,
                     const Tensor& B_l, const GroupLayout& L, double scaling,
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
        if (i < 0) {  // no low-rank update on this group: bias or zero
          for (int64_t t = 0; t < n; ++t)
            for (int64_t c = 0; c < size; ++c)
              y_g[t * out + c] = has_bias ? bp[grp * size + c] : scalar_t(0);
          continue;
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
        if constexpr (kSame) {
          mm_rm_ptr<acc_t>(n, size, rk, lhs, ld_l, rhs, size, y_g, out, false, vary);
        } else {
          // y_g = half(bias + scaling · s_i·B_iᵀ), accumulated in float32.
          mm_rm_ptr<acc_t>(n, size, rk, lhs, ld_l, rhs, size, tmp.get(), size, false, vary);
          for (int64_t t = 0; t < n; ++t)
            for (int64_t c = 0; c < size; ++c)
              y_g[t * out + c] = static_cast<scalar_t>(tmp[t * size + c]);
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

std::tuple<Tensor, Tensor> lora_linear_fwd_impl(const Tensor& x, const Tensor& weight,
                                                const std::optional<Tensor>& bias,
                                                const Tensor& lora_A, const Tensor& lora_B,
                                                const Tensor& seed, double scaling,
                                                double dropout_p, bool fan_in_fan_out,
                                                int64_t num_groups, at::IntArrayRef groups) {
  const LinearShapes d = check_linear_fwd<DeviceChecks>(kOp, x, weight, bias, lora_A, lora_B,
                                                        fan_in_fan_out, num_groups, groups);
  const int64_t T = d.T, in = d.in, out = d.out;
  const GroupLayout& L = d.L;
  const bool has_bias = bias.has_value() && bias->defined();
  const MaskParams mask = make_mask_params(kOp, seed, dropout_p);

  const int64_t R = lora_A.size(0);
  if (T == 0 || R == 0 || in == 0)
    return linear_fwd_without_lowrank(x, weight, bias, R, fan_in_fan_out);
  const auto lt = lowrank_dtype(x.scalar_type());
  Tensor s = at::empty({T, R}, x.options().dtype(lt));
  const Tensor A_l = lora_A.to(lt).contiguous();
  const Tensor B_l = lora_B.to(lt).contiguous();
  Tensor y = at::empty({T, out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    lowrank_forward<scalar_t>(x, has_bias ? *bias : Tensor(), y, s, A_l, B_l, L, scaling, mask);
  });
  // Phase 2: the frozen GEMM accumulates into y (multithreaded BLAS).
  add_frozen_linear(y, x, weight, fan_in_fan_out);
  return {y, s};
}

}  // namespace

// The dispatcher's CPU kernel of lora_kernels::lora_linear_fwd, and the cpu backend's
// handle on it (lora_kernels_cpu::lora_linear_fwd, for use_backend("cpu") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) { m.impl("lora_linear_fwd", below_autograd_this_thread<&lora_linear_fwd_impl>); }
TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) { m.impl("lora_linear_fwd", below_autograd_this_thread<&lora_linear_fwd_impl>); }

}  // namespace cpu
}  // namespace lora_kernels
