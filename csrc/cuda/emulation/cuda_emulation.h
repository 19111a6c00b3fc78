// The CUDA thread model on the host, for running the kernels of
// csrc/cuda/kernels/ without a GPU (tests only; compiled with a host C++20
// compiler and -DLK_CUDA_EMULATION).
//
// A launch runs its blocks one after another; the threads of a block are
// host threads that meet at __syncthreads() (a std::barrier). __shared__
// variables become function-local statics: one instance, shared by the
// threads of the running block, as shared memory is. A read of shared memory
// that is not ordered by a barrier is a data race here too (ThreadSanitizer
// reports it). Warp-level operations are not emulated; the kernels use none.
#pragma once

#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

namespace lk_emu {

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local Index3 thread_idx;
inline thread_local Index3 block_idx;
inline Index3 block_dim;
inline Index3 grid_dim;
inline std::barrier<>* block_barrier = nullptr;

inline void syncthreads() { block_barrier->arrive_and_wait(); }

// Runs body() once per thread of every block of a (gx, gy, gz) grid of
// `threads`-thread blocks. The block's threads are started once per launch
// and run the blocks in order, meeting at a barrier after each block (the
// next block reuses the shared-memory statics).
template <typename F>
void launch(int64_t gx, int64_t gy, int64_t gz, int threads, F&& body) {
  grid_dim = {static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)};
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      thread_idx = {static_cast<unsigned>(t), 0, 0};
      for (int64_t z = 0; z < gz; ++z)
        for (int64_t y = 0; y < gy; ++y)
          for (int64_t x = 0; x < gx; ++x) {
            block_idx = {static_cast<unsigned>(x), static_cast<unsigned>(y),
                         static_cast<unsigned>(z)};
            body();
            barrier.arrive_and_wait();  // the block is done before the next one starts
          }
    });
  for (auto& th : pool) th.join();
  block_barrier = nullptr;
}

}  // namespace lk_emu

#define threadIdx lk_emu::thread_idx
#define blockIdx lk_emu::block_idx
#define blockDim lk_emu::block_dim
#define gridDim lk_emu::grid_dim
#define __syncthreads() lk_emu::syncthreads()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
