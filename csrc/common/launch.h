// How a CUDA kernel's per-thread body is written so that the CPU tests can run it (issue 17).
//
// Every kernel of csrc/cuda is `__global__ void k(P p) { body(this_thread(), p); }` with the body a
// SPARE_HD function of a Thread and the kernel's parameter struct, in a header that compiles without
// nvcc. The host harness (csrc/harness) calls the body for every (block, thread) of a small grid in
// order. A kernel with block-wide synchronisation is split into phases (one body per phase, shared
// memory passed in as a pointer): the GPU runs the phases separated by __syncthreads(), the harness
// runs phase 1 for every thread of the block, then phase 2, ... Atomics go through atomic_add, which
// is atomicAdd on the GPU and a plain add (run in order) on the host.
#pragma once

#include <cstdint>

#include "maskfmt.h"

namespace spare {

// A compile-time-bounded loop the GPU compiler should unroll (register arrays indexed by it stay in
// registers); nothing on the host.
#if defined(__CUDACC__)
#define SPARE_UNROLL _Pragma("unroll")
#else
#define SPARE_UNROLL
#endif

struct Dim3 {
  int64_t x = 1, y = 1, z = 1;
};

struct Thread {
  Dim3 block, thread, grid, block_dim;
  SPARE_HD int64_t tid() const { return thread.x + block_dim.x * (thread.y + block_dim.y * thread.z); }
  SPARE_HD int64_t nthreads() const { return block_dim.x * block_dim.y * block_dim.z; }
};

#if defined(__CUDACC__)
__device__ inline Thread this_thread() {
  Thread t;
  t.block = Dim3{blockIdx.x, blockIdx.y, blockIdx.z};
  t.thread = Dim3{threadIdx.x, threadIdx.y, threadIdx.z};
  t.grid = Dim3{gridDim.x, gridDim.y, gridDim.z};
  t.block_dim = Dim3{blockDim.x, blockDim.y, blockDim.z};
  return t;
}
#endif

SPARE_HD inline void atomic_add(float* p, float v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

SPARE_HD inline void atomic_add(unsigned long long* p, unsigned long long v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// Host side: run body(thread) for every thread of `grid` x `block`, blocks and threads in order.
template <typename F>
inline void for_each_thread(Dim3 grid, Dim3 block, F&& body) {
  for (int64_t bz = 0; bz < grid.z; ++bz)
    for (int64_t by = 0; by < grid.y; ++by)
      for (int64_t bx = 0; bx < grid.x; ++bx)
        for (int64_t tz = 0; tz < block.z; ++tz)
          for (int64_t ty = 0; ty < block.y; ++ty)
            for (int64_t tx = 0; tx < block.x; ++tx)
              body(Thread{Dim3{bx, by, bz}, Dim3{tx, ty, tz}, grid, block});
}

// Host side: run each phase of a block-synchronised kernel for all threads of one block before the
// next phase (what __syncthreads() guarantees on the GPU), block by block.
template <typename... Phases>
inline void for_each_block_phased(Dim3 grid, Dim3 block, Phases&&... phases) {
  for (int64_t bz = 0; bz < grid.z; ++bz)
    for (int64_t by = 0; by < grid.y; ++by)
      for (int64_t bx = 0; bx < grid.x; ++bx) {
        auto run = [&](auto&& phase) {
          for (int64_t tz = 0; tz < block.z; ++tz)
            for (int64_t ty = 0; ty < block.y; ++ty)
              for (int64_t tx = 0; tx < block.x; ++tx)
                phase(Thread{Dim3{bx, by, bz}, Dim3{tx, ty, tz}, grid, block});
        };
        (run(phases), ...);
      }
}

}  // namespace spare
