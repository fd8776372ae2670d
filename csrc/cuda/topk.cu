// Exact top-k of element masks on the GPU (issue 17): the topk_* ops of torch.ops.spare_kernels_cuda.
// The kernels are thin wrappers over the SPARE_HD phase bodies of topk_kernels.h (run on the host by
// csrc/harness/topk.cpp in the CPU tests); the driver is spare_kernels/topk.py (_device_topk), which
// documents the algorithm. Every op runs on the current stream of its tables' device and returns
// without synchronising; the driver reads the histograms back (one D2H copy per pass).
// Compiled, not yet run on a GPU.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "topk_kernels.h"
#include "topk_tables.h"

namespace spare {
namespace topk {
namespace {

// Block size of the three kernels. 256 threads = 8 warps: the pack kernel takes one output byte per
// thread, so its chunk is 256 bytes = 2048 scores (8 KB of fp32), enough to amortise a block's
// start-up (descriptor binary search, shared zeroing) and small enough that the tie scan is 16
// segments of 16; 8 blocks of 256 fill an SM's 2048 threads on sm_80/sm_90 when a thread stays
// under 32 registers (kMinBlocks below), and the shared arrays (1.1 KB hist, 1.7 KB pack)
// never limit occupancy. It must be a multiple of 32 (warp-aggregated histogram atomics).
constexpr int64_t kThreads = 256;
static_assert(kThreads <= kMaxThreads && kThreads % 32 == 0, "block size");
// Blocks per SM asked of ptxas (__launch_bounds__): 8 x 256 = 2048 threads, the whole SM on sm_80 and
// sm_90, i.e. at most 32 registers per thread. The kernels are bound by memory latency (one pass
// over the scores each, little arithmetic), so resident warps matter more than registers; ptxas
// fits every kernel in 32 without spilling (ptxas -v, docs/backends.md).
constexpr int kMinBlocks = 8;

// Output bytes (8 scores each) per histogram block: 2048 bytes = 16384 scores = 64 per thread in 16
// rounds of kUnroll=4 independent loads. Large enough that flushing up to 257 shared bins into the
// global (n_tensors, 257) table is rare next to the counting (and the per-block binary search is
// negligible), small enough that SD-1.5's ~860M scores still give ~52K blocks (~50 waves of 132 SMs
// x 8 blocks: a short tail) and a small tensor (a 320-channel bias) is one block.
constexpr int64_t kHistChunkBytes = 2048;

void check_launch(int64_t threads, int64_t nblocks, const char* op) {
  TORCH_CHECK(threads == kThreads, op, ": threads must be ", kThreads, " (topk_config()), got ", threads);
  TORCH_CHECK(nblocks >= 0 && nblocks <= std::numeric_limits<int32_t>::max(), op, ": bad block count ", nblocks);
}

__global__ void __launch_bounds__(kThreads, kMinBlocks) histogram_kernel(HistParams p) {
  __shared__ HistShared sh;
  const Thread t = this_thread();
  hist_start(t, p, &sh);
  __syncthreads();
  hist_count(t, p, &sh);
  __syncthreads();
  hist_flush(t, p, &sh);
}

// Pass 1: histogram of digit 1 + compaction. The loop of rounds is block-uniform (compact_rounds,
// compact_should_flush read shared state after a barrier), so the barriers inside it are safe.
__global__ void __launch_bounds__(kThreads, kMinBlocks) compact_kernel(CompactParams p) {
  __shared__ CompactShared sh;
  const Thread t = this_thread();
  compact_start(t, p, &sh);
  __syncthreads();
  const int32_t rounds = compact_rounds(t, &sh);
  for (int32_t r = 0; r < rounds; ++r) {
    compact_round(t, p, &sh, r);
    __syncthreads();
    if (compact_should_flush(t, &sh, r, rounds)) {
      compact_reserve(t, p, &sh);
      __syncthreads();
      compact_copy(t, p, &sh);
      __syncthreads();
    }
  }
  compact_flush_hist(t, p, &sh);
}

__global__ void __launch_bounds__(kThreads, kMinBlocks) cand_histogram_kernel(CandHistParams p) {
  __shared__ CandHistShared sh;
  const Thread t = this_thread();
  cand_start(t, p, &sh);
  __syncthreads();
  cand_count(t, p, &sh);
  __syncthreads();
  cand_flush(t, p, &sh);
}

__global__ void __launch_bounds__(kThreads, kMinBlocks) sample_kernel(SampleParams p) { sample_body(this_thread(), p); }

// The window pass: the same grid and round structure as compact_kernel.
__global__ void __launch_bounds__(kThreads, kMinBlocks) window_kernel(WindowParams p) {
  __shared__ WindowShared sh;
  const Thread t = this_thread();
  window_start(t, p, &sh);
  __syncthreads();
  const int32_t rounds = window_rounds(t, &sh);
  for (int32_t r = 0; r < rounds; ++r) {
    window_round(t, p, &sh, r);
    __syncthreads();
    if (window_should_flush(t, &sh, r, rounds)) {
      window_reserve(t, p, &sh);
      __syncthreads();
      window_copy(t, p, &sh);
      __syncthreads();
    }
  }
  window_finish(t, p, &sh);
}

__global__ void __launch_bounds__(kThreads, kMinBlocks) equal_counts_kernel(EqParams p) {
  __shared__ EqShared sh;
  const Thread t = this_thread();
  eq_start(t, p, &sh);
  __syncthreads();
  eq_count(t, p, &sh);
  __syncthreads();
  eq_write(t, p, &sh);
}

__global__ void __launch_bounds__(kThreads, kMinBlocks) pack_kernel(PackParams p) {
  __shared__ PackShared sh;
  const Thread t = this_thread();
  pack_start(t, p, &sh);
  __syncthreads();
  pack_bits_phase(t, p, &sh);
  __syncthreads();
  pack_scan_segments(t, p, &sh);
  __syncthreads();
  pack_scan_totals(t, p, &sh);
  __syncthreads();
  pack_ties_phase(t, p, &sh);
}

void topk_histogram(const at::Tensor& desc, const at::Tensor& prefix, const at::Tensor& hist, int64_t level,
                    int64_t threads, int64_t chunk_bytes, int64_t nblocks) {
  const int64_t n = check_histogram(desc, prefix, hist, level, chunk_bytes, c10::DeviceType::CUDA);
  check_launch(threads, nblocks, "topk_histogram");
  if (nblocks == 0 || n == 0) return;
  c10::cuda::CUDAGuard guard(desc.device());
  HistParams p{desc.data_ptr<int64_t>(), n, prefix.data_ptr<int64_t>(),
               reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), level, chunk_bytes};
  histogram_kernel<<<static_cast<unsigned>(nblocks), static_cast<unsigned>(threads), 0,
                     c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_compact(const at::Tensor& desc, const at::Tensor& prefix, const at::Tensor& hist, const at::Tensor& ctab,
                  const at::Tensor& cursor, const at::Tensor& cand, int64_t threads, int64_t chunk_bytes,
                  int64_t nblocks) {
  const int64_t n = check_compact(desc, prefix, hist, ctab, cursor, cand, chunk_bytes, c10::DeviceType::CUDA);
  check_launch(threads, nblocks, "topk_compact");
  if (nblocks == 0 || n == 0) return;
  c10::cuda::CUDAGuard guard(desc.device());
  const bool keep = cand.numel() > 0;
  CompactParams p{desc.data_ptr<int64_t>(), n, prefix.data_ptr<int64_t>(),
                  reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), chunk_bytes,
                  keep ? ctab.data_ptr<int64_t>() : nullptr,
                  reinterpret_cast<unsigned long long*>(cursor.data_ptr<int64_t>()),
                  keep ? reinterpret_cast<uint32_t*>(cand.data_ptr<int32_t>()) : nullptr};
  compact_kernel<<<static_cast<unsigned>(nblocks), static_cast<unsigned>(threads), 0,
                   c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_cand_histogram(const at::Tensor& ctab, const at::Tensor& prefix, const at::Tensor& hist,
                         const at::Tensor& cand, int64_t level, int64_t threads, int64_t chunk, int64_t nblocks) {
  const int64_t n = check_cand_histogram(ctab, prefix, hist, cand, level, chunk, c10::DeviceType::CUDA);
  check_launch(threads, nblocks, "topk_cand_histogram");
  if (nblocks == 0 || n == 0 || cand.numel() == 0) return;
  c10::cuda::CUDAGuard guard(ctab.device());
  CandHistParams p{ctab.data_ptr<int64_t>(), n, prefix.data_ptr<int64_t>(),
                   reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                   reinterpret_cast<const uint32_t*>(cand.data_ptr<int32_t>()), level, chunk};
  cand_histogram_kernel<<<static_cast<unsigned>(nblocks), static_cast<unsigned>(threads), 0,
                          c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_sample(const at::Tensor& desc, const at::Tensor& out, int64_t total, int64_t threads) {
  const int64_t n = check_sample(desc, out, total, c10::DeviceType::CUDA);
  const int64_t m = out.numel(), nblocks = (m + kThreads - 1) / kThreads;
  check_launch(threads, nblocks, "topk_sample");
  if (m == 0 || n == 0) return;
  c10::cuda::CUDAGuard guard(desc.device());
  SampleParams p{desc.data_ptr<int64_t>(), n, total, m, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>())};
  sample_kernel<<<static_cast<unsigned>(nblocks), static_cast<unsigned>(threads), 0,
                  c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_window(const at::Tensor& desc, const at::Tensor& win, const at::Tensor& counts, const at::Tensor& cursor,
                 const at::Tensor& cand, const at::Tensor& cand_t, int64_t threads, int64_t chunk_bytes,
                 int64_t nblocks) {
  const int64_t n = check_window(desc, win, counts, cursor, cand, cand_t, chunk_bytes, c10::DeviceType::CUDA);
  check_launch(threads, nblocks, "topk_window");
  if (nblocks == 0 || n == 0) return;
  c10::cuda::CUDAGuard guard(desc.device());
  WindowParams p{desc.data_ptr<int64_t>(), n, win.data_ptr<int32_t>(),
                 reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
                 reinterpret_cast<unsigned long long*>(cursor.data_ptr<int64_t>()),
                 reinterpret_cast<uint32_t*>(cand.data_ptr<int32_t>()), cand_t.data_ptr<int32_t>(), cand.numel(),
                 chunk_bytes};
  window_kernel<<<static_cast<unsigned>(nblocks), static_cast<unsigned>(threads), 0,
                  c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_equal_counts(const at::Tensor& desc, const at::Tensor& thr, const at::Tensor& counts, int64_t threads,
                       int64_t chunk_bytes) {
  const int64_t n = check_equal_counts(desc, thr, counts, threads, chunk_bytes, c10::DeviceType::CUDA);
  const int64_t nblocks = counts.size(0);
  check_launch(threads, nblocks, "topk_equal_counts");
  if (nblocks == 0 || n == 0) return;
  c10::cuda::CUDAGuard guard(desc.device());
  EqParams p{desc.data_ptr<int64_t>(), n, thr.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), chunk_bytes};
  equal_counts_kernel<<<static_cast<unsigned>(nblocks), static_cast<unsigned>(threads), 0,
                        c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_pack(const at::Tensor& desc, const at::Tensor& sel, const at::Tensor& scan, const at::Tensor& out,
               int64_t threads, int64_t nblocks) {
  const int64_t n = check_pack(desc, sel, scan, out, c10::DeviceType::CUDA);
  check_launch(threads, nblocks, "topk_pack");
  if (nblocks == 0 || n == 0) return;
  c10::cuda::CUDAGuard guard(desc.device());
  PackParams p{desc.data_ptr<int64_t>(), n, sel.data_ptr<int64_t>(), scan.data_ptr<int64_t>(),
               out.data_ptr<uint8_t>()};
  pack_kernel<<<static_cast<unsigned>(nblocks), static_cast<unsigned>(threads), 0,
                c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace topk
}  // namespace spare

// Schemas in topk_tables.h (shared with torch.ops.spare_harness); the tables in topk_kernels.h.
TORCH_LIBRARY_FRAGMENT(spare_kernels_cuda, m) {
  m.def("topk_config() -> int[]",
        []() -> std::vector<int64_t> { return {spare::topk::kThreads, spare::topk::kHistChunkBytes}; });
  SPARE_DEFINE_TOPK_OPS(m);
}

TORCH_LIBRARY_IMPL(spare_kernels_cuda, CUDA, m) {
  m.impl("topk_histogram", &spare::topk::topk_histogram);
  m.impl("topk_compact", &spare::topk::topk_compact);
  m.impl("topk_cand_histogram", &spare::topk::topk_cand_histogram);
  m.impl("topk_sample", &spare::topk::topk_sample);
  m.impl("topk_window", &spare::topk::topk_window);
  m.impl("topk_equal_counts", &spare::topk::topk_equal_counts);
  m.impl("topk_pack", &spare::topk::topk_pack);
}
