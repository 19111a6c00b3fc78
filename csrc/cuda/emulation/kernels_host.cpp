// The CUDA kernels of csrc/cuda/kernels/ run on the host (cuda_emulation.h),
// behind a C interface that tests/test_cuda_build.py loads with ctypes and
// checks against lora_kernels.reference. Each entry point plans and launches
// like the op files do (same launch plans, partial buffers summed by the
// sum_parts kernel), on host memory, and returns 0 (or -1 for a bad dtype).
//
// Build: c++ -std=c++20 -O1 -pthread -shared -fPIC -DLK_CUDA_EMULATION
//        -I csrc -I <torch include> csrc/cuda/emulation/kernels_host.cpp
// dtype codes: 0 float16, 1 bfloat16, 2 float32, 3 float64 (the low-rank
// buffers are float32, or float64 for float64).
#include <vector>

#include "../kernels/dropout.cuh"
#include "../kernels/lowrank_da.cuh"
#include "../kernels/lowrank_in.cuh"
#include "../kernels/rank_r_grads.cuh"
#include "../kernels/rank_update.cuh"
#include "../kernels/sum_parts.cuh"

namespace lora_kernels {
namespace cuda {
namespace {

template <typename Kernel, typename Args>
void run(const LaunchShape& s, Kernel kernel, const Args& a) {
  lk_emu::launch(s.gx, s.gy, s.gz, s.block, [&] { kernel(a); });
}

MaskArgs mask_of(const int64_t* seed, double p) {
  MaskArgs m;
  if (p > 0.0) {
    m.seed_ptr = seed;  // read "on the device", as with a CUDA seed tensor
    m.threshold = philox::dropout_threshold(p);
    m.scale = philox::dropout_keep_scale(m.threshold);
  }
  return m;
}

template <typename acc_t, typename out_t>
void sum_parts(const std::vector<acc_t>& parts, int64_t n, int64_t rows, int64_t cols,
               double alpha, out_t* out) {
  SumPartsArgs<acc_t, out_t> a;
  a.parts = parts.data();
  a.n = n;
  a.rows = rows;
  a.cols = cols;
  a.alpha = static_cast<acc_t>(alpha);
  a.out = out;
  a.out_ld = cols;
  run(sum_parts_shape(a), &sum_parts_kernel<acc_t, out_t>, a);
}

template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      f(c10::Half());
      return 0;
    case 1:
      f(c10::BFloat16());
      return 0;
    case 2:
      f(float());
      return 0;
    case 3:
      f(double());
      return 0;
    default:
      return -1;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace lora_kernels

using namespace lora_kernels::cuda;

extern "C" {

int lk_emu_dropout(int dtype, const void* x, void* out, int64_t rows, int64_t cols,
                   const int64_t* seed, double p) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    DropoutArgs<scalar_t> a;
    a.x = static_cast<const scalar_t*>(x);
    a.out = static_cast<scalar_t*>(out);
    a.rows = rows;
    a.cols = cols;
    a.vec = cols % 8 == 0 && rows_aligned(a.x, cols, 8) && rows_aligned(a.out, cols, 8);
    a.mask = mask_of(seed, p);
    a.keep = static_cast<scalar_t>(static_cast<acc_t>(a.mask.scale));
    run(dropout_shape(a), &dropout_kernel<scalar_t>, a);
  });
}

// S (T × R) = dropout(x)·Aᵀ; A is R × K in the low-rank dtype.
int lk_emu_lowrank_in(int dtype, const void* x, int64_t ldx, const void* A, void* S, int64_t T,
                      int64_t K, int64_t R, const int64_t* seed, double p,
                      int64_t target_blocks) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    LowrankInArgs<scalar_t> a;
    a.x = static_cast<const scalar_t*>(x);
    a.ldx = ldx;
    a.x_vec = rows_aligned(a.x, ldx, kInGroup);
    a.A = static_cast<const acc_t*>(A);
    a.T = T;
    a.K = K;
    a.R = R;
    a.mask = mask_of(seed, p);
    plan_lowrank_in(T, K, R, target_blocks, &a.splits, &a.tiles_per_split);
    std::vector<acc_t> parts(static_cast<size_t>(a.splits * T * R));
    a.out = parts.data();
    run(lowrank_in_shape(a), lowrank_in_kernel_for<scalar_t>(R), a);
    sum_parts<acc_t, acc_t>(parts, a.splits, T, R, 1.0, static_cast<acc_t*>(S));
  });
}

// out (T × N, strides o_st, o_sn) = base + m ⊙ alpha · L·Rmᵀ; L and Rm in the
// low-rank dtype (acc_dtype 3: float64 factors for a lower-precision out).
int lk_emu_rank_update(int dtype, int acc_dtype, const void* L, int64_t l_st, int64_t l_sk,
                       const void* Rm, int64_t r_sn, int64_t r_sk, void* out, int64_t o_st,
                       int64_t o_sn, const void* bias, const void* rows, int64_t rows_ld,
                       int64_t num_rows, const int64_t* idx, int accumulate, int64_t T,
                       int64_t N, int64_t R, double alpha, const int64_t* seed, double p) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    auto go = [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      RankUpdateArgs<scalar_t, acc_t> a;
      a.L = static_cast<const acc_t*>(L);
      a.l_st = l_st;
      a.l_sk = l_sk;
      a.Rm = static_cast<const acc_t*>(Rm);
      a.r_sn = r_sn;
      a.r_sk = r_sk;
      a.out = static_cast<scalar_t*>(out);
      a.o_st = o_st;
      a.o_sn = o_sn;
      a.bias = static_cast<const scalar_t*>(bias);
      a.rows = static_cast<const scalar_t*>(rows);
      a.rows_ld = rows_ld;
      a.num_rows = num_rows;
      a.idx = idx;
      a.accumulate = accumulate != 0;
      a.T = T;
      a.N = N;
      a.R = R;
      a.alpha = static_cast<acc_t>(alpha);
      a.mask = mask_of(seed, p);
      run(rank_update_shape(a), &rank_update_kernel<scalar_t, acc_t>, a);
    };
    if (acc_dtype == 3)
      go(double());
    else if constexpr (!std::is_same_v<scalar_t, double>)
      go(float());
  });
}

// dS = scaling · g·Bm (T × R) and dB = scaling · gᵀ·S (N × R) in the low-rank
// dtype; either output may be null (not wanted).
int lk_emu_rank_r_grads(int dtype, const void* g, int64_t ldg, const void* Bm, const void* S,
                        void* dS, void* dB, int64_t T, int64_t N, int64_t R, double scaling,
                        int64_t target_blocks) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    constexpr int tile = grads_tile<acc_t>();
    RankGradsArgs<scalar_t> a;
    a.g = static_cast<const scalar_t*>(g);
    a.ldg = ldg;
    a.g_vec = rows_aligned(a.g, ldg, tile * tile / kGradsThreads);
    a.Bm = static_cast<const acc_t*>(Bm);
    a.S = dB != nullptr ? static_cast<const acc_t*>(S) : nullptr;
    a.T = T;
    a.N = N;
    a.R = R;
    plan_rank_r_grads(T, N, R, tile, target_blocks, &a.chunks, &a.chunk_cols, &a.slots);
    std::vector<acc_t> ds_parts(dS != nullptr ? static_cast<size_t>(a.chunks * T * R) : 0);
    std::vector<acc_t> db_parts(dB != nullptr ? static_cast<size_t>(a.slots * N * R) : 0);
    a.ds_parts = dS != nullptr ? ds_parts.data() : nullptr;
    a.db_parts = dB != nullptr ? db_parts.data() : nullptr;
    run(rank_r_grads_shape(a), rank_r_grads_kernel_for<scalar_t>(R), a);
    if (dS != nullptr) sum_parts<acc_t, acc_t>(ds_parts, a.chunks, T, R, scaling,
                                               static_cast<acc_t*>(dS));
    if (dB != nullptr) sum_parts<acc_t, acc_t>(db_parts, a.slots, N, R, scaling,
                                               static_cast<acc_t*>(dB));
  });
}

// dA (R × K) = dSᵀ·(x ⊙ m), in the low-rank dtype.
int lk_emu_lowrank_da(int dtype, const void* x, int64_t ldx, const void* dS, void* dA, int64_t T,
                      int64_t K, int64_t R, const int64_t* seed, double p,
                      int64_t target_blocks) {
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    constexpr int tile = da_tile<acc_t>();
    LowrankDaArgs<scalar_t> a;
    a.x = static_cast<const scalar_t*>(x);
    a.ldx = ldx;
    a.x_vec = rows_aligned(a.x, ldx, tile * tile / kDaThreads);
    a.dS = static_cast<const acc_t*>(dS);
    a.T = T;
    a.K = K;
    a.R = R;
    a.mask = mask_of(seed, p);
    plan_lowrank_da(T, K, R, tile, target_blocks, &a.splits, &a.rows_per_split);
    std::vector<acc_t> parts(static_cast<size_t>(a.splits * R * K));
    a.parts = parts.data();
    run(lowrank_da_shape(a), lowrank_da_kernel_for<scalar_t>(R), a);
    sum_parts<acc_t, acc_t>(parts, a.splits, R, K, 1.0, static_cast<acc_t*>(dA));
  });
}

}  // extern "C"
