// Host side of the top-k ops shared by the CUDA ops (csrc/cuda/topk.cu) and their host harness
// (csrc/harness/topk.cpp): the schemas and the checks of the ops' int64 tables, which differ between
// the two only in the device the tables live on. The block size check stays with each (the CUDA
// kernels take only kThreads; the harness any size up to kMaxThreads).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "topk_kernels.h"

// The topk_* schemas (topk_config is defined by each library: its own threads and chunk). Every
// tensor an op writes is declared mutable (a!): topk_pack writes the masks into `out`, the one flat
// uint8 buffer of every tensor's mask rows (desc column kOut: byte offsets into it).
#define SPARE_DEFINE_TOPK_OPS(m)                                                                      \
  do {                                                                                                \
    (m).def("topk_histogram(Tensor desc, Tensor prefix, Tensor(a!) hist, int level, int threads, "    \
            "int chunk_bytes, int nblocks) -> ()");                                                   \
    (m).def("topk_compact(Tensor desc, Tensor prefix, Tensor(a!) hist, Tensor ctab, "                 \
            "Tensor(b!) cursor, Tensor(c!) cand, int threads, int chunk_bytes, int nblocks) -> ()");  \
    (m).def("topk_cand_histogram(Tensor ctab, Tensor prefix, Tensor(a!) hist, Tensor cand, "          \
            "int level, int threads, int chunk, int nblocks) -> ()");                                 \
    (m).def("topk_sample(Tensor desc, Tensor(a!) out, int total, int threads) -> ()");                 \
    (m).def("topk_window(Tensor desc, Tensor win, Tensor(a!) counts, Tensor(b!) cursor, "             \
            "Tensor(c!) cand, Tensor(d!) cand_t, int threads, int chunk_bytes, int nblocks) -> ()");  \
    (m).def("topk_equal_counts(Tensor desc, Tensor thr, Tensor(a!) counts, int threads, "             \
            "int chunk_bytes) -> ()");                                                                \
    (m).def("topk_pack(Tensor desc, Tensor sel, Tensor scan, Tensor(a!) out, int threads, "           \
            "int nblocks) -> ()");                                                                    \
  } while (0)

namespace spare::topk {

// `t` is a contiguous int64 table on a `device` tensor, on desc's device: (n, cols) when cols > 0,
// else 1-D.
inline void check_table(const at::Tensor& t, int64_t cols, const char* op, const char* what, c10::DeviceType device,
                        const at::Tensor* desc = nullptr) {
  TORCH_CHECK(t.device().type() == device, op, ": ", what, " must be a ", c10::DeviceTypeName(device),
              " tensor, got ", t.device());
  TORCH_CHECK(desc == nullptr || t.device() == desc->device(), op, ": tables on different devices (",
              desc->device(), ", ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", what, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
  if (cols > 0) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, op, ": ", what, " must be (n, ", cols, "), got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 1, op, ": ", what, " must be 1-D, got ", t.sizes());
  }
}

// The arguments of each op on `device` tensors (block size aside); each returns n, desc's rows.
inline int64_t check_histogram(const at::Tensor& desc, const at::Tensor& prefix, const at::Tensor& hist,
                               int64_t level, int64_t chunk_bytes, c10::DeviceType device) {
  const char* op = "topk_histogram";
  check_table(desc, kDescCols, op, "desc", device);
  check_table(prefix, 0, op, "prefix", device, &desc);
  check_table(hist, kHistCols, op, "hist", device, &desc);
  const int64_t n = desc.size(0);
  TORCH_CHECK(prefix.size(0) == n && hist.size(0) == n, op, ": prefix and hist must have ", n, " rows");
  TORCH_CHECK(level >= 0 && level < 4, op, ": level must be in [0, 4), got ", level);
  TORCH_CHECK(chunk_bytes > 0, op, ": chunk_bytes must be positive");
  return n;
}

// cand: the int32 candidate keys (1-D; empty when the driver does not compact), cursor: one int64
// per tensor. ctab (n, kCandCols) gives each tensor's segment, which must lie inside cand.
inline int64_t check_compact(const at::Tensor& desc, const at::Tensor& prefix, const at::Tensor& hist,
                             const at::Tensor& ctab, const at::Tensor& cursor, const at::Tensor& cand,
                             int64_t chunk_bytes, c10::DeviceType device) {
  const int64_t n = check_histogram(desc, prefix, hist, 1, chunk_bytes, device);
  const char* op = "topk_compact";
  check_table(ctab, kCandCols, op, "ctab", device, &desc);
  check_table(cursor, 0, op, "cursor", device, &desc);
  TORCH_CHECK(ctab.size(0) == n && cursor.size(0) == n, op, ": ctab and cursor must have ", n, " rows");
  TORCH_CHECK(cand.device() == desc.device() && cand.scalar_type() == at::kInt && cand.dim() == 1 &&
                  cand.is_contiguous(),
              op, ": cand must be a contiguous 1-D int32 tensor on desc's device");
  return n;
}

inline int64_t check_cand_histogram(const at::Tensor& ctab, const at::Tensor& prefix, const at::Tensor& hist,
                                    const at::Tensor& cand, int64_t level, int64_t chunk, c10::DeviceType device) {
  const char* op = "topk_cand_histogram";
  check_table(ctab, kCandCols, op, "ctab", device);
  check_table(prefix, 0, op, "prefix", device, &ctab);
  check_table(hist, kHistCols, op, "hist", device, &ctab);
  const int64_t n = ctab.size(0);
  TORCH_CHECK(prefix.size(0) == n && hist.size(0) == n, op, ": prefix and hist must have ", n, " rows");
  TORCH_CHECK(cand.device() == ctab.device() && cand.scalar_type() == at::kInt && cand.dim() == 1 &&
                  cand.is_contiguous(),
              op, ": cand must be a contiguous 1-D int32 tensor on ctab's device");
  TORCH_CHECK(level >= 0 && level < 4, op, ": level must be in [0, 4), got ", level);
  TORCH_CHECK(chunk > 0 && chunk <= (int64_t{1} << 30), op, ": chunk must be in (0, 2^30], got ", chunk);
  return n;
}

inline void check_vector(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* what,
                         const at::Tensor& desc) {
  TORCH_CHECK(t.device() == desc.device() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(), op,
              ": ", what, " must be a contiguous 1-D ", dtype, " tensor on desc's device, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

// out: the m samples (int32); total: the entries of all tensors (the driver's sum, >= m).
inline int64_t check_sample(const at::Tensor& desc, const at::Tensor& out, int64_t total, c10::DeviceType device) {
  const char* op = "topk_sample";
  check_table(desc, kDescCols, op, "desc", device);
  check_vector(out, at::kInt, op, "out", desc);
  TORCH_CHECK(out.numel() <= total && total < (int64_t{1} << 40), op, ": need out.numel() <= total < 2^40, got ",
              out.numel(), " and ", total);
  TORCH_CHECK(out.numel() <= (int64_t{1} << 22), op, ": at most 2^22 samples, got ", out.numel());
  TORCH_CHECK(out.numel() == 0 || desc.size(0) > 0, op, ": samples of no tensor");
  return desc.size(0);
}

// win: [lo, hi] (int32 signed-order keys); counts (n, 2) int64; cursor: one int64; cand (int32) and
// cand_t (int32) of one capacity.
inline int64_t check_window(const at::Tensor& desc, const at::Tensor& win, const at::Tensor& counts,
                            const at::Tensor& cursor, const at::Tensor& cand, const at::Tensor& cand_t,
                            int64_t chunk_bytes, c10::DeviceType device) {
  const char* op = "topk_window";
  check_table(desc, kDescCols, op, "desc", device);
  check_vector(win, at::kInt, op, "win", desc);
  check_table(counts, 2, op, "counts", device, &desc);
  check_vector(cursor, at::kLong, op, "cursor", desc);
  check_vector(cand, at::kInt, op, "cand", desc);
  check_vector(cand_t, at::kInt, op, "cand_t", desc);
  const int64_t n = desc.size(0);
  TORCH_CHECK(win.numel() == 2 && cursor.numel() == 1 && counts.size(0) == n && cand.numel() == cand_t.numel(), op,
              ": need win of 2, cursor of 1, counts of ", n, " rows, cand and cand_t of one size");
  TORCH_CHECK(chunk_bytes > 0, op, ": chunk_bytes must be positive");
  return n;
}

inline int64_t check_equal_counts(const at::Tensor& desc, const at::Tensor& thr, const at::Tensor& counts,
                                  int64_t threads, int64_t chunk_bytes, c10::DeviceType device) {
  const char* op = "topk_equal_counts";
  check_table(desc, kDescCols, op, "desc", device);
  check_table(thr, 0, op, "thr", device, &desc);
  check_table(counts, 0, op, "counts", device, &desc);
  const int64_t n = desc.size(0);
  TORCH_CHECK(thr.size(0) == n, op, ": thr must have ", n, " entries");
  TORCH_CHECK(chunk_bytes == threads, op, ": chunk_bytes must equal threads (the pack's chunk)");
  return n;
}

inline int64_t check_pack(const at::Tensor& desc, const at::Tensor& sel, const at::Tensor& scan,
                          const at::Tensor& out, c10::DeviceType device) {
  const char* op = "topk_pack";
  check_table(desc, kDescCols, op, "desc", device);
  check_table(sel, kSelCols, op, "sel", device, &desc);
  check_table(scan, 0, op, "scan", device, &desc);
  const int64_t n = desc.size(0);
  TORCH_CHECK(sel.size(0) == n, op, ": sel must have ", n, " rows");
  TORCH_CHECK(out.device() == desc.device() && out.scalar_type() == at::kByte && out.dim() == 1 &&
                  out.is_contiguous(),
              op, ": out must be a contiguous 1-D uint8 tensor on desc's device, got ", out.scalar_type(), " ",
              out.sizes(), " on ", out.device());
  return n;
}

}  // namespace spare::topk
