// Host harness of the GPU top-k (csrc/cuda/topk.cu): the same phase bodies (csrc/cuda/topk_kernels.h)
// driven over the same grids (and, for topk_compact, the same loop of barrier-separated rounds) on CPU
// tensors, as torch.ops.spare_harness.topk_*, with the schemas of
// torch.ops.spare_kernels_cuda.topk_*. spare_kernels/topk.py's driver (_device_topk) runs unchanged
// on either namespace. Everything of the kernels runs here except the GPU-only instructions inside
// warp_hist_add and warp_stage (__any_sync/__match_any_sync/__ballot_sync/__shfl_sync warp
// aggregation, replaced by plain adds giving the same counts and the same staged keys) and the atomics
// (atomic_add/shared_add: plain adds, blocks and threads in order).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../cuda/topk_kernels.h"
#include "../cuda/topk_tables.h"

namespace {

using namespace spare;
using namespace spare::topk;

// The harness' defaults (the driver may pass others: any block size up to kMaxThreads runs here):
// tiny chunks, so that the tests' small tensors span many blocks.
constexpr int64_t kHarnessThreads = 32;
constexpr int64_t kHarnessHistChunkBytes = 16;

void check_threads(int64_t threads, const char* op) {
  TORCH_CHECK(threads > 0 && threads <= kMaxThreads, op, ": threads must be in [1, ", kMaxThreads, "], got ",
              threads);
}

void topk_histogram(const at::Tensor& desc, const at::Tensor& prefix, const at::Tensor& hist, int64_t level,
                    int64_t threads, int64_t chunk_bytes, int64_t nblocks) {
  const int64_t n = check_histogram(desc, prefix, hist, level, chunk_bytes, c10::DeviceType::CPU);
  check_threads(threads, "topk_histogram");
  if (nblocks == 0 || n == 0) return;
  HistParams p{desc.data_ptr<int64_t>(), n, prefix.data_ptr<int64_t>(),
               reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), level, chunk_bytes};
  HistShared sh;
  for_each_block_phased(
      Dim3{nblocks}, Dim3{threads}, [&](Thread t) { hist_start(t, p, &sh); },
      [&](Thread t) { hist_count(t, p, &sh); }, [&](Thread t) { hist_flush(t, p, &sh); });
}

// Rows of a table as host int64 rows (the harness can check the device-side contents the CUDA op trusts).
const int64_t* rows_of(const at::Tensor& t) { return t.data_ptr<int64_t>(); }

bool segment_inside(const int64_t* row, int64_t size) {
  return row[kCOff] >= 0 && row[kCCount] >= 0 && row[kCOff] + row[kCCount] <= size;
}

// Pass 1 (compact_kernel of topk.cu, the same phases and barriers, the loop of rounds included).
void topk_compact(const at::Tensor& desc, const at::Tensor& prefix, const at::Tensor& hist, const at::Tensor& ctab,
                  const at::Tensor& cursor, const at::Tensor& cand, int64_t threads, int64_t chunk_bytes,
                  int64_t nblocks) {
  const int64_t n = check_compact(desc, prefix, hist, ctab, cursor, cand, chunk_bytes, c10::DeviceType::CPU);
  check_threads(threads, "topk_compact");
  const bool keep = cand.numel() > 0;
  if (keep) {  // segments inside cand (the CUDA op trusts the driver here)
    const int64_t* c = rows_of(ctab);
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(segment_inside(c + i * kCandCols, cand.numel()), "topk_compact: ctab row ", i, " lies outside cand");
  }
  if (nblocks == 0 || n == 0) return;
  CompactParams p{desc.data_ptr<int64_t>(), n, prefix.data_ptr<int64_t>(),
                  reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), chunk_bytes,
                  keep ? ctab.data_ptr<int64_t>() : nullptr,
                  reinterpret_cast<unsigned long long*>(cursor.data_ptr<int64_t>()),
                  keep ? reinterpret_cast<uint32_t*>(cand.data_ptr<int32_t>()) : nullptr};
  auto sh = std::make_unique<CompactShared>();
  for (int64_t b = 0; b < nblocks; ++b) {
    auto run = [&](auto&& phase) {
      for (int64_t tid = 0; tid < threads; ++tid)
        phase(Thread{Dim3{b, 0, 0}, Dim3{tid, 0, 0}, Dim3{nblocks}, Dim3{threads}});
    };
    const Thread t0{Dim3{b, 0, 0}, Dim3{0, 0, 0}, Dim3{nblocks}, Dim3{threads}};  // block-uniform reads
    run([&](Thread t) { compact_start(t, p, sh.get()); });
    const int32_t rounds = compact_rounds(t0, sh.get());
    for (int32_t r = 0; r < rounds; ++r) {
      run([&](Thread t) { compact_round(t, p, sh.get(), r); });
      if (compact_should_flush(t0, sh.get(), r, rounds)) {
        run([&](Thread t) { compact_reserve(t, p, sh.get()); });
        run([&](Thread t) { compact_copy(t, p, sh.get()); });
      }
    }
    run([&](Thread t) { compact_flush_hist(t, p, sh.get()); });
  }
}

void topk_cand_histogram(const at::Tensor& ctab, const at::Tensor& prefix, const at::Tensor& hist,
                         const at::Tensor& cand, int64_t level, int64_t threads, int64_t chunk, int64_t nblocks) {
  const int64_t n = check_cand_histogram(ctab, prefix, hist, cand, level, chunk, c10::DeviceType::CPU);
  check_threads(threads, "topk_cand_histogram");
  const int64_t* c = rows_of(ctab);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(segment_inside(c + i * kCandCols, cand.numel()), "topk_cand_histogram: ctab row ", i,
                " lies outside cand");
  if (nblocks == 0 || n == 0 || cand.numel() == 0) return;
  CandHistParams p{ctab.data_ptr<int64_t>(), n, prefix.data_ptr<int64_t>(),
                   reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                   reinterpret_cast<const uint32_t*>(cand.data_ptr<int32_t>()), level, chunk};
  CandHistShared sh;
  for_each_block_phased(
      Dim3{nblocks}, Dim3{threads}, [&](Thread t) { cand_start(t, p, &sh); }, [&](Thread t) { cand_count(t, p, &sh); },
      [&](Thread t) { cand_flush(t, p, &sh); });
}

void topk_sample(const at::Tensor& desc, const at::Tensor& out, int64_t total, int64_t threads) {
  const int64_t n = check_sample(desc, out, total, c10::DeviceType::CPU);
  check_threads(threads, "topk_sample");
  const int64_t m = out.numel();
  if (m == 0 || n == 0) return;
  SampleParams p{desc.data_ptr<int64_t>(), n, total, m, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>())};
  for_each_thread(Dim3{(m + threads - 1) / threads}, Dim3{threads}, [&](Thread t) { sample_body(t, p); });
}

void topk_window(const at::Tensor& desc, const at::Tensor& win, const at::Tensor& counts, const at::Tensor& cursor,
                 const at::Tensor& cand, const at::Tensor& cand_t, int64_t threads, int64_t chunk_bytes,
                 int64_t nblocks) {
  const int64_t n = check_window(desc, win, counts, cursor, cand, cand_t, chunk_bytes, c10::DeviceType::CPU);
  check_threads(threads, "topk_window");
  if (nblocks == 0 || n == 0) return;
  WindowParams p{desc.data_ptr<int64_t>(), n, win.data_ptr<int32_t>(),
                 reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
                 reinterpret_cast<unsigned long long*>(cursor.data_ptr<int64_t>()),
                 reinterpret_cast<uint32_t*>(cand.data_ptr<int32_t>()), cand_t.data_ptr<int32_t>(), cand.numel(),
                 chunk_bytes};
  auto sh = std::make_unique<WindowShared>();
  for (int64_t b = 0; b < nblocks; ++b) {
    auto run = [&](auto&& phase) {
      for (int64_t tid = 0; tid < threads; ++tid)
        phase(Thread{Dim3{b, 0, 0}, Dim3{tid, 0, 0}, Dim3{nblocks}, Dim3{threads}});
    };
    const Thread t0{Dim3{b, 0, 0}, Dim3{0, 0, 0}, Dim3{nblocks}, Dim3{threads}};
    run([&](Thread t) { window_start(t, p, sh.get()); });
    const int32_t rounds = window_rounds(t0, sh.get());
    for (int32_t r = 0; r < rounds; ++r) {
      run([&](Thread t) { window_round(t, p, sh.get(), r); });
      if (window_should_flush(t0, sh.get(), r, rounds)) {
        run([&](Thread t) { window_reserve(t, p, sh.get()); });
        run([&](Thread t) { window_copy(t, p, sh.get()); });
      }
    }
    run([&](Thread t) { window_finish(t, p, sh.get()); });
  }
}

void topk_equal_counts(const at::Tensor& desc, const at::Tensor& thr, const at::Tensor& counts, int64_t threads,
                       int64_t chunk_bytes) {
  const int64_t n = check_equal_counts(desc, thr, counts, threads, chunk_bytes, c10::DeviceType::CPU);
  const int64_t nblocks = counts.size(0);
  check_threads(threads, "topk_equal_counts");
  if (nblocks == 0 || n == 0) return;
  EqParams p{desc.data_ptr<int64_t>(), n, thr.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), chunk_bytes};
  EqShared sh;
  for_each_block_phased(
      Dim3{nblocks}, Dim3{threads}, [&](Thread t) { eq_start(t, p, &sh); }, [&](Thread t) { eq_count(t, p, &sh); },
      [&](Thread t) { eq_write(t, p, &sh); });
}

void topk_pack(const at::Tensor& desc, const at::Tensor& sel, const at::Tensor& scan, const at::Tensor& out,
               int64_t threads, int64_t nblocks) {
  const int64_t n = check_pack(desc, sel, scan, out, c10::DeviceType::CPU);
  check_threads(threads, "topk_pack");
  const int64_t* d = rows_of(desc);
  for (int64_t i = 0; i < n; ++i)  // every tensor's mask rows inside out (the CUDA op trusts the driver)
    TORCH_CHECK(d[i * kDescCols + kOut] >= 0 && d[i * kDescCols + kOut] + d[i * kDescCols + kBytes] <= out.numel(),
                "topk_pack: desc row ", i, "'s mask lies outside out");
  if (nblocks == 0 || n == 0) return;
  PackParams p{desc.data_ptr<int64_t>(), n, sel.data_ptr<int64_t>(), scan.data_ptr<int64_t>(),
               out.data_ptr<uint8_t>()};
  PackShared sh;
  for_each_block_phased(
      Dim3{nblocks}, Dim3{threads}, [&](Thread t) { pack_start(t, p, &sh); },
      [&](Thread t) { pack_bits_phase(t, p, &sh); }, [&](Thread t) { pack_scan_segments(t, p, &sh); },
      [&](Thread t) { pack_scan_totals(t, p, &sh); }, [&](Thread t) { pack_ties_phase(t, p, &sh); });
}

// The host twins of the device helpers, for a direct test of the key map and the half conversion.
at::Tensor topk_keys(const at::Tensor& bits, int64_t dtype) {
  TORCH_CHECK(bits.device().is_cpu() && bits.scalar_type() == at::kLong && bits.dim() == 1,
              "topk_keys: bits must be a 1-D int64 CPU tensor");
  auto in = bits.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t* b = in.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.numel(); ++i) {
    const uint32_t raw = static_cast<uint32_t>(b[i]);
    const uint32_t f = dtype == kF32 ? raw : dtype == kBF16 ? raw << 16 : half_to_float_bits(raw & 0xFFFFu);
    o[i] = is_nan_bits(f) ? -1 : static_cast<int64_t>(ukey(f));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spare_harness, m) {
  m.def("topk_config() -> int[]", []() -> std::vector<int64_t> { return {kHarnessThreads, kHarnessHistChunkBytes}; });
  SPARE_DEFINE_TOPK_OPS(m);
  m.def("topk_keys(Tensor bits, int dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(spare_harness, CPU, m) {
  m.impl("topk_histogram", &topk_histogram);
  m.impl("topk_compact", &topk_compact);
  m.impl("topk_cand_histogram", &topk_cand_histogram);
  m.impl("topk_sample", &topk_sample);
  m.impl("topk_window", &topk_window);
  m.impl("topk_equal_counts", &topk_equal_counts);
  m.impl("topk_pack", &topk_pack);
  m.impl("topk_keys", &topk_keys);
}
