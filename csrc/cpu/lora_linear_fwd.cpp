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
//          calls on cache-sized blocks (mm_rm in common.h).
//       2. y += x·Wᵀ: one multithreaded BLAS GEMM with beta = 1. This is the
//          same work as the plain layer's addmm(bias, x, Wᵀ) (which also
//          writes the broadcast bias into y and accumulates with beta = 1),
//          so the low-rank update costs no extra pass over y.
//   * s (tokens × r·len(groups)) is returned and kept by the caller for
//     backward (dB needs it; it is tiny next to x). It is float32 for half
//     inputs, x's dtype otherwise.
//   * The dropout mask is never stored: it is a pure function of
//     (seed, p, element position) and backward regenerates it. Dropped x
//     exists only one row block at a time per thread; with p == 0 and no
//     dtype conversion x is read in place.
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

// Phase 1: s and y = bias + low-rank update, row block by row block.
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
  const bool need_buf = mask.active || !kSame;
  const int64_t lane_ld = lane_stride(in);
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const LaneMask<acc_t> lane_mask(mask);
  // Which group each out column block belongs to: -1 when it has no update.
  std::vector<int64_t> slot_of(static_cast<size_t>(L.num_groups), -1);
  for (int64_t i = 0; i < ng; ++i) slot_of[L.groups[i]] = i;
  const bool has_bias = bias.defined();

  // Row-major operands for mm_rm (common.h): Aᵀ (in × R), and per group
  // Bext_i = [scaling·B_iᵀ ; bias_i] ((r + 1) × size, the bias row only with
  // a bias): y_g = [s_i | 1]·Bext_i writes bias + update in one pass, with no
  // separate scaling or bias pass.
  // Both are filled by plain loops (A_l and B_l are contiguous): ATen's
  // strided transpose copies cost more than the low-rank GEMMs at small
  // token counts.
  const int64_t R = A_l.size(0);
  Tensor At = at::empty({in, R}, acc_opts);
  {
    const acc_t* a = A_l.data_ptr<acc_t>();
    acc_t* o = At.data_ptr<acc_t>();
    for (int64_t k = 0; k < R; ++k)
      for (int64_t j = 0; j < in; ++j) o[j * R + k] = a[k * in + j];
  }
  const int64_t rk = has_bias ? r + 1 : r;  // inner dimension of the update
  Tensor Bext = at::empty({ng, rk, L.size}, acc_opts);
  {
    const acc_t* b = B_l.data_ptr<acc_t>();  // (ng·size, r)
    acc_t* o = Bext.data_ptr<acc_t>();
    const Tensor bias_c = has_bias ? bias.contiguous() : Tensor();
    const scalar_t* bp = has_bias ? bias_c.data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < ng; ++i) {
      acc_t* oi = o + i * rk * L.size;
      for (int64_t c = 0; c < L.size; ++c)
        for (int64_t k = 0; k < r; ++k)
          oi[k * L.size + c] = static_cast<acc_t>(scaling) * b[(i * L.size + c) * r + k];
      if (has_bias)
        for (int64_t c = 0; c < L.size; ++c)
          oi[r * L.size + c] = static_cast<acc_t>(bp[L.col0(i) + c]);
    }
  }

  at::parallel_for(0, num_row_blocks(T), 1, [&](int64_t b0, int64_t b1) {
    Tensor xbuf = need_buf ? at::empty({kRowBlock, in}, acc_opts) : Tensor();
    Tensor tmp = kSame ? Tensor() : at::empty({kRowBlock, L.size}, acc_opts);
    Tensor sext = at::empty({kRowBlock, rk}, acc_opts);  // [s_i | 1]
    if (has_bias) sext.narrow(1, r, 1).fill_(1);
    std::vector<uint16_t> lanes(mask.active ? static_cast<size_t>(kRowBlock * lane_ld) : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock;
      const int64_t n = std::min(kRowBlock, T - r0);
      const bool full = n == kRowBlock;  // a stable shape for mm_rm
      const Tensor x_blk = x.narrow(0, r0, n);
      Tensor s_blk = s.narrow(0, r0, n);  // (n, R), acc dtype
      if (need_buf) {
        Tensor xb = xbuf.narrow(0, 0, n);
        if (mask.active) mask_lanes(mask, r0, n, in, lanes.data());
        load_masked<scalar_t, acc_t>(x_blk, xb, mask.active ? lanes.data() : nullptr, lane_ld,
                                     lane_mask);
        mm_rm(s_blk, xb, At, /*add=*/false, vary_m(full));
      } else {
        mm_rm(s_blk, x_blk, At, /*add=*/false, vary_m(full));
      }
      Tensor y_blk = y.narrow(0, r0, n);
      for (int64_t grp = 0; grp < L.num_groups; ++grp) {
        const int64_t i = slot_of[grp];
        const int64_t c0 = grp * L.size;
        Tensor y_g = y_blk.narrow(1, c0, L.size);
        if (i < 0) {  // no low-rank update on this group: bias or zero
          if (has_bias)
            y_g.copy_(bias.narrow(0, c0, L.size).expand({n, L.size}));
          else
            y_g.zero_();
          continue;
        }
        Tensor lhs = s_blk.narrow(1, i * r, r);  // (n, r)
        if (has_bias) {
          Tensor se = sext.narrow(0, 0, n);
          se.narrow(1, 0, r).copy_(lhs);
          lhs = se;                                // (n, r + 1)
        }
        if constexpr (kSame) {
          mm_rm(y_g, lhs, Bext[i], /*add=*/false, vary_m(full));
        } else {
          // y_g = half(bias + scaling · s_i·B_iᵀ), accumulated in float32.
          Tensor t = tmp.narrow(0, 0, n);
          mm_rm(t, lhs, Bext[i], /*add=*/false, vary_m(full));
          y_g.copy_(t);
        }
      }
    }
  });
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

TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) {
  m.impl("lora_linear_fwd", below_autograd<&lora_linear_fwd_impl>);
}

}  // namespace cpu
}  // namespace lora_kernels
