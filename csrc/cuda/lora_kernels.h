// Per-thread bodies of the CUDA backend's mask-dependent kernels (masked LoRA and saliency), written
// as SPARE_HD functions of a Thread (csrc/common/launch.h) so the host harness (csrc/harness/lora.cpp)
// runs exactly this code in the CPU tests; lora.cu / saliency.cu wrap each in a __global__ kernel.
// Storage types are template parameters (float, c10::Half, c10::BFloat16); arithmetic is fp32.
#pragma once

#include <cstdint>

#include "../common/launch.h"
#include "../common/lora_tile.h"
#include "../common/maskfmt.h"

namespace spare {

// ---------------------------------------------------------------------------- effective weight
// out[o, c] = W[o, c] + s · M[o, c] · Σ_r B[o, r] A[r, c], written once in the GEMM's dtype: no fp32
// delta, no second pass. Element and block masks (the delta's rank-r dot runs only where the mask is
// on, so off tiles cost one copy of W). Grid (cdiv(cols, kWeffThreads), min(rows, 65535)), rows
// grid-strided over y.
constexpr int64_t kWeffThreads = 256;  // one warp-contiguous row segment per block: coalesced W/A/out

template <typename TW, typename TA, typename TB, typename TO>
struct WeffParams {
  const TW* w;          // (rows, cols), row stride ldw
  const TA* a;          // (rank, cols) contiguous
  const TB* b;          // (rows, rank) contiguous
  const void* mask;     // wire mask data (element: packed rows; block: (nbo, nbi) bool)
  TO* out;              // (rows, cols) contiguous
  int64_t rows, cols, rank, ldw, kind, block_o, block_i;
  float scale;
};

template <typename TW, typename TA, typename TB, typename TO>
SPARE_HD inline void weff_body(const Thread& t, const WeffParams<TW, TA, TB, TO>& p) {
  const int64_t c = t.block.x * t.block_dim.x + t.thread.x;
  if (c >= p.cols) return;
  for (int64_t o = t.block.y; o < p.rows; o += t.grid.y) {
    const bool on = mask_on(p.kind, p.mask, p.cols, p.block_o, p.block_i, o, c);
    const float v = effective_weight(static_cast<float>(p.w[o * p.ldw + c]), on, p.scale, p.b + o * p.rank,
                                     p.a + c, p.cols, p.rank);
    p.out[o * p.cols + c] = static_cast<TO>(v);
  }
}

// ------------------------------------------------------------------ fused mask-and-contract
// One region of G = dyᵀ·x: rows [row0, row0 + rows) x columns [col0, col0 + gcols) of the weight (fp32 or
// the activations' 16-bit type, row stride ldg), masked on the fly and contracted against the adapter:
//   dB[row0 + o, k] = s · Σ_c M⊙G[o, c] · A[k, c]   (written: a region's rows are owned by one block row;
//                                                     columns outside the region are off by construction)
//   part[t, k, c]   = Σ_{o in row tile t} B[row0 + o, k] · M⊙G[o, c]   (plain stores, one thread each)
// and contract_reduce_body then adds dA[k, col0 + c] += s · Σ_t part[t, k, c] in t order. No atomics:
// every output entry is written by one thread and every sum runs in a fixed order, so dA / dB are
// bit-identical from run to run (the launcher runs regions one after another on one stream).
//
// Block (kContractThreads) = kContractRows rows x kContractRanks ranks; grid (cdiv(rank, kContractRanks),
// cdiv(rows, kContractRows)): the rank tiles of one row tile are consecutive blocks, scheduled together,
// so a row tile of G is read from memory once and shared through L2 rather than once per rank tile (a G
// chunk can exceed L2); each thread strides over the columns keeping kContractRows x kContractRanks dB
// partials in registers, then the block reduces them through shared memory in thread order (phase 2).
//
// kContractRows 16: the dA partials cost rank/16 floats per G entry written and read again (rank 4:
// 2 B against G's 4 B read; the price of determinism over the former atomics) while the 16 masked G
// values a thread holds stay in registers; kContractRanks 4: 64 dB partials per thread (registers, no
// spill at 128 threads), G re-read rank/4 times from L2; kContractThreads 128: the phase-2 smem is
// 16·4·128·4 B = 32 KiB (static limit 48 KiB). Not yet tuned on a GPU.
constexpr int64_t kContractThreads = 128;
constexpr int64_t kContractRows = 16;
constexpr int64_t kContractRanks = 4;
// Row tiles go on grid.y (at most 65535): a chunk has at most this many rows.
constexpr int64_t kContractMaxRows = 65535 * kContractRows;
constexpr int64_t kContractSmem = kContractRows * kContractRanks * kContractThreads;  // floats
constexpr int64_t kReduceThreads = 256;  // contract_reduce_body: one (k, c) per thread, coalesced over c

template <typename TG, typename TA, typename TB>
struct ContractParams {
  const TG* g;          // (rows, gcols) region of G, row stride ldg
  const void* mask;     // wire mask of the whole weight (global row and column indices)
  const TA* a;          // (rank, cols) contiguous
  const TB* b;          // (out, rank) contiguous
  float* part;          // (cdiv(rows, kContractRows), rank, gcols) dA partials, or nullptr (no dA)
  float* dB;            // (out, rank) fp32, or nullptr
  int64_t row0, rows, col0, gcols, cols, rank, ldg, kind, block_o, block_i;
  float scale;
};

template <typename TG, typename TA, typename TB>
SPARE_HD inline void contract_phase1(const Thread& t, const ContractParams<TG, TA, TB>& p, float* smem) {
  const int64_t tile = t.block.y, o0 = tile * kContractRows, k0 = t.block.x * kContractRanks;
  const int64_t no = o0 + kContractRows <= p.rows ? kContractRows : p.rows - o0;
  const int64_t nk = k0 + kContractRanks <= p.rank ? kContractRanks : p.rank - k0;
  float part[kContractRows][kContractRanks];
  SPARE_UNROLL
  for (int64_t i = 0; i < kContractRows; ++i)
    SPARE_UNROLL
    for (int64_t j = 0; j < kContractRanks; ++j) part[i][j] = 0.f;
  for (int64_t cl = t.thread.x; cl < p.gcols; cl += t.block_dim.x) {
    const int64_t c = p.col0 + cl;
    float gm[kContractRows];
    SPARE_UNROLL
    for (int64_t i = 0; i < kContractRows; ++i) {
      const int64_t o = p.row0 + o0 + i;
      gm[i] = (i < no && mask_on(p.kind, p.mask, p.cols, p.block_o, p.block_i, o, c))
                  ? static_cast<float>(p.g[(o0 + i) * p.ldg + cl]) : 0.f;
    }
    SPARE_UNROLL
    for (int64_t j = 0; j < kContractRanks; ++j) {
      if (j >= nk) break;
      const int64_t k = k0 + j;
      const float ak = static_cast<float>(p.a[k * p.cols + c]);
      float da = 0.f;
      SPARE_UNROLL
      for (int64_t i = 0; i < kContractRows; ++i) {
        part[i][j] += gm[i] * ak;
        if (i < no) da += static_cast<float>(p.b[(p.row0 + o0 + i) * p.rank + k]) * gm[i];
      }
      if (p.part != nullptr) p.part[(tile * p.rank + k) * p.gcols + cl] = da;
    }
  }
  SPARE_UNROLL
  for (int64_t i = 0; i < kContractRows; ++i)
    SPARE_UNROLL
    for (int64_t j = 0; j < kContractRanks; ++j)
      smem[(i * kContractRanks + j) * t.block_dim.x + t.thread.x] = part[i][j];
}

template <typename TG, typename TA, typename TB>
SPARE_HD inline void contract_phase2(const Thread& t, const ContractParams<TG, TA, TB>& p, const float* smem) {
  const int64_t i = t.thread.x / kContractRanks, j = t.thread.x % kContractRanks;
  if (p.dB == nullptr || i >= kContractRows) return;
  const int64_t o = t.block.y * kContractRows + i, k = t.block.x * kContractRanks + j;
  if (o >= p.rows || k >= p.rank) return;
  float s = 0.f;
  const float* col = smem + (i * kContractRanks + j) * t.block_dim.x;
  for (int64_t x = 0; x < t.block_dim.x; ++x) s += col[x];
  p.dB[(p.row0 + o) * p.rank + k] = p.scale * s;
}

// Rows per chunk of a (rows, gcols) region: its G and its dA partials each within `scratch` entries, a
// multiple of the row tile (unless the whole region fits), at most kContractMaxRows. Host only.
inline int64_t contract_step(int64_t rows, int64_t gcols, int64_t rank, int64_t scratch) {
  // a row tile holds kContractRows·gcols entries of G and rank·gcols dA partials
  const int64_t per_tile = (gcols > 1 ? gcols : 1) * (rank > kContractRows ? rank : kContractRows);
  const int64_t tiles = scratch / per_tile > 1 ? scratch / per_tile : 1;
  const int64_t step = tiles * kContractRows < kContractMaxRows ? tiles * kContractRows : kContractMaxRows;
  return rows < step ? rows : step;
}

// dA[k, col0 + c] += s · Σ_{t < tiles} part[t, k, c] for every (k, c) of a region, t in order. Grid-
// strided over rank · gcols entries (kReduceThreads per block).
struct ReduceParams {
  const float* part;    // (tiles, rank, gcols)
  float* dA;            // (rank, cols) fp32
  int64_t tiles, rank, gcols, col0, cols;
  float scale;
};

SPARE_HD inline void contract_reduce_body(const Thread& t, const ReduceParams& p) {
  const int64_t n = p.rank * p.gcols, step = t.grid.x * t.block_dim.x;
  for (int64_t e = t.block.x * t.block_dim.x + t.thread.x; e < n; e += step) {
    const int64_t k = e / p.gcols, c = e - k * p.gcols;
    float s = 0.f;
    for (int64_t i = 0; i < p.tiles; ++i) s += p.part[(i * p.rank + k) * p.gcols + c];
    p.dA[k * p.cols + p.col0 + c] += p.scale * s;
  }
}

// ---------------------------------------------------------------- block masks: G on the on tiles
// The regions of G a block mask needs, for G from vendor GEMMs / convolutions: runs of consecutive tile
// rows with any tile on (row range), each with the column span from its first to its last on tile
// column, rounded outwards to multiples of `quantum` (a conv's kh·kw: a span of whole input channels, so
// G's columns come from a convolution over a channel slice of x). Off tile rows are skipped; two runs
// whose gap is below `merge_rows` rows become one (the gap's rows cost less than the second GEMM's
// re-read of x: see lora.cu). Each region as {o0, o1, c0, c1}; an all-off mask gives none. Host only.
//
// Why regions of vendor GEMMs and not a tile-listed kernel (estimates, H100, bf16, rank 4, 64x64 tiles on
// at random with density 0.1; not yet measured): 320->320 at 32k tokens, G's GEMM is bound by reading dy
// and x (42 MB, 14 µs against 8.5 µs of FLOPs), which any scheme pays; the regions cover 0.36 of W and
// the pass stays at 14 µs. 1280->1280 at 2k tokens (compute-bound, 8.5 µs): random tiles leave almost
// every tile row and column span on (0.97 of W), where a tile-listed tensor-core kernel contracting in
// registers would take ≈ 4 µs (reading dy and x once, 3.5 µs) and drop the fp32 G round trip (≈ 3 µs):
// ≈ 7 µs of the path's ≈ 62 µs. That kernel is a hand-written MMA loop nothing here can test; the Triton
// backend's fused path already lists tiles, and clustered masks (whole tile rows or column bands off) get
// the saving here too.
struct Region {
  int64_t o0, o1, c0, c1;
};

template <typename Vec>
inline void block_regions(const bool* tiles, int64_t out, int64_t cols, int64_t block_o, int64_t block_i,
                          int64_t quantum, int64_t merge_rows, Vec& regions) {
  const int64_t nbo = cdiv(out, block_o), nbi = cdiv(cols, block_i);
  const int64_t q = quantum > 0 ? quantum : 1;
  Region cur{0, 0, 0, 0};
  bool open = false;
  for (int64_t bo = 0; bo < nbo; ++bo) {
    int64_t lo = -1, hi = -1;
    for (int64_t bi = 0; bi < nbi; ++bi)
      if (tiles[bo * nbi + bi]) {
        if (lo < 0) lo = bi;
        hi = bi;
      }
    if (lo < 0) continue;
    const int64_t o0 = bo * block_o, o1 = o0 + block_o < out ? o0 + block_o : out;
    const int64_t c0 = lo * block_i / q * q;
    const int64_t c1e = (hi + 1) * block_i < cols ? (hi + 1) * block_i : cols;
    const int64_t c1 = round_up(c1e, q) < cols ? round_up(c1e, q) : cols;
    if (open && o0 - cur.o1 < merge_rows) {
      cur.o1 = o1;
      if (c0 < cur.c0) cur.c0 = c0;
      if (c1 > cur.c1) cur.c1 = c1;
    } else {
      if (open) regions.push_back(cur);
      cur = Region{o0, o1, c0, c1};
      open = true;
    }
  }
  if (open) regions.push_back(cur);
}

// ------------------------------------------------------------------------ saliency accumulate
// acc[e] += Σ_{s < n} f(g[s · stride + e]) for every entry e of one weight, f = |·| (grad_abs,
// sample_abs), identity (signed) or square (sample_sq): the per-sample gradients of a chunk of samples
// (a fixed-size scratch from one batched GEMM or convolution) folded into the fp32 statistic in one
// read. Grid-strided over entries (kAccThreads per block).
constexpr int64_t kAccThreads = 256;
enum SaliencyStat : int64_t { kGradAbs = 0, kSigned = 1, kSampleAbs = 2, kSampleSq = 3 };

template <typename TG>
struct AccumulateParams {
  const TG* g;          // (n, numel) with row stride `stride`
  float* acc;           // (numel,) fp32
  int64_t n, numel, stride, stat;
};

template <typename TG>
SPARE_HD inline void accumulate_body(const Thread& t, const AccumulateParams<TG>& p) {
  const int64_t step = t.grid.x * t.block_dim.x;
  for (int64_t e = t.block.x * t.block_dim.x + t.thread.x; e < p.numel; e += step) {
    float s = 0.f;
    for (int64_t i = 0; i < p.n; ++i) {
      const float v = static_cast<float>(p.g[i * p.stride + e]);
      s += p.stat == kSampleSq ? v * v : (p.stat == kSigned ? v : (v < 0.f ? -v : v));
    }
    // grad_abs: |Σ_i g_i| of the whole batch, which the host passes as one "sample" (n = 1).
    p.acc[e] += s;
  }
}

}  // namespace spare
