// Host-side helpers of the CUDA ops: the CUDA device checks (the checks
// common to both backends are in ../op_checks.h), the dropout mask arguments
// (seed read in place on the device), the grouped B, and the plumbing to the
// kernel launchers (kernels/launch.h). ATen pieces only: no
// torch/extension.h.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

#include "../op_checks.h"
#include "kernels/launch.h"

namespace lora_kernels {
namespace cuda {

using at::Tensor;

// The CUDA side of the shared device checks (op_checks.h): the op's first
// tensor is a CUDA tensor, and the others are on its device.
inline void check_is_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

// `t` is a CUDA tensor on the device of `ref` (the op's first tensor).
inline void check_cuda(const char* op, const char* name, const Tensor& t, const char* ref_name,
                       const Tensor& ref) {
  check_is_cuda(op, name, t);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

// The kernels of this build run on t's GPU (they were built for its
// architecture): checked once per device, before anything is launched.
inline void check_arch(const char* op, const Tensor& t) {
  constexpr int kDevices = 64;
  static std::array<std::atomic<int>, kDevices> known{};  // 0 unknown, 1 runs, 2 does not
  const int index = t.device().index();
  int state = index >= 0 && index < kDevices ? known[index].load() : 0;
  if (state == 0) {
    c10::cuda::CUDAGuard guard(t.device());
    state = kernels_run_on_current_device() ? 1 : 2;
    if (index >= 0 && index < kDevices) known[index].store(state);
  }
  if (state == 2) {
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
    TORCH_CHECK(false, op, ": lora_kernels' CUDA kernels were not built for this GPU (",
                prop.name, ", compute capability ", prop.major, ".", prop.minor,
                "): rebuild with its architecture in TORCH_CUDA_ARCH_LIST, or build without "
                "LORA_KERNELS_CUDA=1 to run the Triton kernels");
  }
}

struct DeviceChecks {
  static void first(const char* op, const char* name, const Tensor& t) {
    check_is_cuda(op, name, t);
    check_arch(op, t);
  }
  static void same(const char* op, const char* name, const Tensor& t, const char* ref_name,
                   const Tensor& ref) {
    check_cuda(op, name, t, ref_name, ref);
  }
};

// What a kernel reads through a raw pointer: contiguous (the op makes its
// own contiguous copy of small operands before this check).
inline void check_contiguous(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides(), " for shape ", shape_str(t));
}

// x-like operands are read row by row: unit stride along the last dimension
// (any row stride). Anything else is copied once into that layout.
inline Tensor rows_layout(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}
inline int64_t row_stride(const Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : t.size(1);
}

// Points a kernel's row-read operand (its pointer, row stride, and whether
// groups of `group` elements are 16-byte aligned: rows_aligned) at the rows
// of t in rows_layout. Returns the tensor read (t, or its copy), to be kept
// until the launch.
template <typename scalar_t>
Tensor bind_rows(const Tensor& t, int64_t group, const scalar_t*& p, int64_t& ld, bool& vec) {
  Tensor rows = rows_layout(t);
  p = rows.data_ptr<scalar_t>();
  ld = row_stride(rows);
  vec = rows_aligned(p, ld, group);
  return rows;
}

// The dropout mask of one call; inactive (threshold 0) when p == 0. The seed
// is read by the kernels from device memory (no host synchronisation); a
// CPU seed is read here.
inline MaskArgs make_mask(const char* op, const Tensor& seed, double p, const Tensor& ref) {
  check_dropout_p(op, p);
  MaskArgs m;
  if (!(p > 0.0)) return m;
  check_seed(op, seed);
  if (seed.is_cuda()) {
    TORCH_CHECK(seed.device() == ref.device(), op, ": seed must be on ", ref.device(),
                " (or the CPU), got ", seed.device());
    m.seed_ptr = seed.data_ptr<int64_t>();  // one element: always contiguous
  } else {
    TORCH_CHECK(seed.device().is_cpu(), op, ": seed must be a CUDA or CPU tensor, got ",
                seed.device());
    m.seed = static_cast<uint64_t>(seed.item<int64_t>());
  }
  m.threshold = philox::dropout_threshold(p);
  m.scale = philox::dropout_keep_scale(m.threshold);
  return m;
}

// B laid out over all out features, (out, r·len(groups)) in dtype `dt`,
// contiguous: group groups[i]'s rows hold B_i in columns [i·r, (i+1)·r) and
// zeros elsewhere, so a grouped layer is a plain rank-R one. A plain Linear
// uses lora_B itself. Only this out × R tensor is padded, never tokens × out.
inline Tensor b_full(const Tensor& lora_B, const GroupLayout& L, at::ScalarType dt) {
  if (L.plain()) return lora_B.to(dt).contiguous();
  const int64_t R = L.r * L.enabled();
  Tensor full = at::zeros({L.num_groups * L.size, R}, lora_B.options().dtype(dt));
  for (int64_t i = 0; i < L.enabled(); ++i)
    full.narrow(0, L.groups[i] * L.size, L.size)
        .narrow(1, i * L.r, L.r)
        .copy_(lora_B.narrow(0, i * L.size, L.size));
  return full;
}

// The inverse of b_full for a gradient: lora_B's (size·len(groups), r) rows.
inline Tensor ungroup_b(const Tensor& full, const GroupLayout& L) {
  if (L.plain()) return full;
  Tensor out = at::empty({L.enabled() * L.size, L.r}, full.options());
  for (int64_t i = 0; i < L.enabled(); ++i)
    out.narrow(0, i * L.size, L.size)
        .copy_(full.narrow(0, L.groups[i] * L.size, L.size).narrow(1, i * L.r, L.r));
  return out;
}

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Blocks that keep the current device busy: `per_sm` per multiprocessor.
inline int64_t target_blocks(int per_sm) {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = c10::cuda::current_device();
  int sms = dev >= 0 && dev < 64 ? cache[dev].load() : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    if (dev >= 0 && dev < 64) cache[dev].store(sms);
  }
  return static_cast<int64_t>(sms) * per_sm;
}

// A partial-sum buffer [n][rows][cols] of the low-rank dtype, and its sum
// (alpha · Σ over n, in order) into `out` (rows × cols, row stride out_ld).
template <typename acc_t>
inline Tensor parts_buffer(const Tensor& like, int64_t n, int64_t rows, int64_t cols) {
  return at::empty({n, rows, cols}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename acc_t, typename out_t>
inline void sum_parts_into(const Tensor& parts, double alpha, const Tensor& out) {
  check_contiguous("sum_parts", "parts", parts);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == parts.size(1) && out.size(1) == parts.size(2) &&
                  (out.size(1) <= 1 || out.stride(1) == 1),
              "sum_parts: out must be a row-major ", parts.size(1), " x ", parts.size(2),
              " matrix, got shape ", shape_str(out));
  SumPartsArgs<acc_t, out_t> a;
  a.parts = parts.data_ptr<acc_t>();
  a.n = parts.size(0);
  a.rows = parts.size(1);
  a.cols = parts.size(2);
  a.alpha = static_cast<acc_t>(alpha);
  a.out = out.data_ptr<out_t>();
  a.out_ld = row_stride(out);
  launch_sum_parts<acc_t, out_t>(a, current_stream());
}

// From one read of g (T × N, kernels/rank_r_grads.cuh): dS = scaling · g·Bm
// (T × R, low-rank dtype) into `dS` and dB = scaling · gᵀ·S (N × R, db_t)
// into `dB`, each only when defined. Bm (N × R) and S (T × R) are
// contiguous, in the low-rank dtype. Each block writes a dS partial per
// column chunk and a dB partial per row slot; the partials are summed in a
// fixed order.
template <typename scalar_t, typename db_t>
void rank_r_grads_into(const Tensor& g, const Tensor& Bm, const Tensor& S, double scaling,
                       const Tensor& dS, const Tensor& dB) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = g.size(0), N = g.size(1), R = Bm.size(1);
  RankGradsArgs<scalar_t> a;
  const Tensor gr = bind_rows(g, grads_tile<acc_t>() * grads_tile<acc_t>() / kGradsThreads, a.g,
                              a.ldg, a.g_vec);
  a.Bm = Bm.data_ptr<acc_t>();
  a.S = dB.defined() ? S.data_ptr<acc_t>() : nullptr;
  a.T = T;
  a.N = N;
  a.R = R;
  plan_rank_r_grads(T, N, R, grads_tile<acc_t>(), target_blocks(2), &a.chunks, &a.chunk_cols,
                    &a.slots);
  Tensor ds_parts = dS.defined() ? parts_buffer<acc_t>(g, a.chunks, T, R) : Tensor();
  Tensor db_parts = dB.defined() ? parts_buffer<acc_t>(g, a.slots, N, R) : Tensor();
  a.ds_parts = dS.defined() ? ds_parts.data_ptr<acc_t>() : nullptr;
  a.db_parts = dB.defined() ? db_parts.data_ptr<acc_t>() : nullptr;
  launch_rank_r_grads<scalar_t>(a, current_stream());
  if (dS.defined()) sum_parts_into<acc_t, acc_t>(ds_parts, scaling, dS);
  if (dB.defined()) sum_parts_into<acc_t, db_t>(db_parts, scaling, dB);
}

}  // namespace cuda
}  // namespace lora_kernels
