// dropout: x times the mask of x's shape (lora_kernels/reference.py), as a
// new contiguous tensor. Bitwise equal to the reference: the mask value is
// built like the reference builds it (keep · keep_scale in x's dtype, the
// scale passing through the op-math type as a Python scalar does) and
// multiplied in x's dtype.
//
// Memory plan: only the output; the 16-bit lanes of one row block live in a
// per-thread buffer.
#include <torch/library.h>

#include "../below_autograd.h"
#include "common.h"

namespace lora_kernels {
namespace cpu {
namespace {

constexpr const char* kOp = "dropout";

// out[j] = x[j] * (lane >= thr ? keep : 0), in x's dtype (SIMD for float/double).
template <typename T>
void multiply_row(T* out, const T* x, const uint16_t* lanes, int64_t n, uint16_t thr, T keep) {
  const T zero = static_cast<T>(0);
  for (int64_t j = 0; j < n; ++j) out[j] = x[j] * (lanes[j] >= thr ? keep : zero);
}
void multiply_row(float* out, const float* x, const uint16_t* lanes, int64_t n, uint16_t thr,
                  float keep) {
  mask_mul(out, x, lanes, n, thr, keep);
}
void multiply_row(double* out, const double* x, const uint16_t* lanes, int64_t n, uint16_t thr,
                  double keep) {
  mask_mul(out, x, lanes, n, thr, keep);
}

Tensor dropout_impl(const Tensor& x, const Tensor& seed, double p) {
  check_cpu(kOp, "x", x);
  check_floating(kOp, "x", x);
  const MaskParams mask = make_mask_params(kOp, seed, p);
  const Tensor xc = x.contiguous();
  if (!mask.active) return xc.clone();
  Tensor out = at::empty_like(xc);
  const int64_t cols = x.dim() ? x.size(-1) : 1;
  const int64_t rows = cols ? x.numel() / cols : 0;
  if (rows == 0 || cols == 0) return out;
  const int64_t lane_ld = lane_stride(cols);
  // Rows per step: about 32K elements, whole rows.
  const int64_t rows_per_step = std::max<int64_t>(1, 32768 / cols);
  const int64_t steps = (rows + rows_per_step - 1) / rows_per_step;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t keep_val = static_cast<scalar_t>(static_cast<acc_t>(mask.scale));
    const scalar_t zero = static_cast<scalar_t>(0);
    const uint16_t thr = static_cast<uint16_t>(std::min<uint32_t>(mask.threshold, 0xFFFFu));
    const bool all_dropped = mask.threshold > 0xFFFFu;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, steps, 1, [&](int64_t q0, int64_t q1) {
      std::vector<uint16_t> lanes(static_cast<size_t>(rows_per_step * lane_ld));
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t r0 = q * rows_per_step;
        const int64_t n = std::min(rows_per_step, rows - r0);
        mask_lanes(mask, r0, n, cols, lanes.data());
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* xr = xp + (r0 + i) * cols;
          scalar_t* orow = op + (r0 + i) * cols;
          const uint16_t* lr = lanes.data() + i * lane_ld;
          multiply_row(orow, xr, lr, cols, thr, all_dropped ? zero : keep_val);
        }
      }
    });
  });
  return out;
}

// Test hook: the Philox words of counters n0 .. n0+count-1 (4 per counter,
// as int64 values in [0, 2^32)) from the chosen implementation
// (isa: 0 best available, 1 scalar, 2 AVX2), to check them against
// lora_kernels.reference.philox4x32 and against each other.
Tensor philox_words(int64_t seed, int64_t n0, int64_t count, int64_t isa) {
  TORCH_CHECK(count >= 0, "_philox_words: count must be >= 0, got ", count);
  TORCH_CHECK(isa >= 0 && isa <= 2, "_philox_words: isa must be 0, 1 or 2, got ", isa);
  std::vector<uint32_t> words(static_cast<size_t>(4 * count));
  mask_words(static_cast<uint64_t>(seed), static_cast<uint64_t>(n0), count, words.data(),
             static_cast<MaskIsa>(isa));
  Tensor out = at::empty({count, 4}, at::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < 4 * count; ++k) op[k] = static_cast<int64_t>(words[k]);
  return out;
}

}  // namespace

// The dispatcher's CPU kernel of lora_kernels::dropout, and the cpu backend's
// handle on it (lora_kernels_cpu::dropout, for use_backend("cpu") and tests).
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) { m.impl("dropout", below_autograd<&dropout_impl>); }
TORCH_LIBRARY_IMPL(lora_kernels_cpu, CPU, m) { m.impl("dropout", below_autograd<&dropout_impl>); }

TORCH_LIBRARY_IMPL(lora_kernels_cpu, CompositeImplicitAutograd, m) {
  m.impl("_philox_words", &philox_words);
}

}  // namespace cpu
}  // namespace lora_kernels
