// Exact top-k of element masks on the GPU (issue 17): the per-thread bodies of the three kernels of
// csrc/cuda/topk.cu, written as SPARE_HD code (csrc/common/launch.h) so that the host harness
// (csrc/harness/topk.cpp) runs the very same bodies on CPU tensors in the tests.
//
// The driver is spare_kernels/topk.py (_device_topk). Over a group of score tensors (fp32, fp16 or
// bf16, contiguous, on one device) it runs a radix select of the k-th largest 32-bit key with 8-bit
// digits, one launch per pass over ALL tensors (a device table of descriptors, never a concatenation):
//
//   pass 0      histogram       per tensor, the 256-bin histogram of digit 0 of every key (and the
//                               NaNs in bin 256); the host reads it and picks the digit.
//   pass 1      compact         the histogram of digit 1 of the keys whose digit 0 is the tensor's
//                               prefix, and (when the host asked for it) those keys themselves,
//                               written to the tensor's segment of a candidate array (cand).
//   pass 2, 3   cand_histogram  the same histograms over the candidates only (or, without a
//                               candidate array, `histogram` over all scores again).
//   ties            equal_counts  only for the tensors where the threshold's ties are cut: the number
//                               of keys equal to the threshold per chunk (the host scans that array).
//   last            pack        scores + threshold (+ tie cut) -> packed uint8 mask rows, LSB first.
//
// Keys are those of spare_kernels.topk._Keys(torch.float32) (order-preserving, -0.0 == +0.0), made
// unsigned (sign bit flipped) so that digits are plain bit fields: ukey = key ^ 0x80000000.
//
// Tables (all int64, row-major, one row per tensor; see spare_kernels/topk.py):
//   desc  (n, kDescCols): kPtr, kBytes (rows * row_bytes), kCols, kRowBytes, kDtype, kHBlock0,
//                         kPBlock0, kOut (the byte offset of the tensor's mask rows in the ONE flat
//                         output buffer of every mask), kE0 (its first entry in the concatenated
//                         order of all tensors: the sample's positions). kBytes and kRowBytes are
//                         below 2^32 (checked by the driver):
//                         byte -> (row, col) takes 32-bit divisions, not 64-bit ones (which cost
//                         registers and spills in every kernel).
//   sel   (n, kSelCols):  kThr, kMode, kTake, kEq0  (the pack's per-tensor selection rule)
//   hist  (n, kHistCols): 256 digit bins + the NaN count (uint64 counts in an int64 tensor)
//   ctab  (n, kCandCols): kCOff, kCCount, kCBlock0: the tensor's segment of cand (offset and number
//                         of keys, known exactly from pass 0's histogram) and its first block in the
//                         candidate passes' grid.
// A tensor is cut into chunks of whole output bytes (8 entries of a mask row, or fewer at the row's
// end): consecutive bytes of the (rows, row_bytes) mask are consecutive ranges of the tensor's flat
// entries, so a chunk is one contiguous range of entries and chunks follow flat (tie) order.
// Block b of a launch works on chunk b - block0[t] of the tensor t whose first block block0[t] is
// the last one <= b (binary search over the table: no per-chunk table).
#pragma once

#include <cstdint>

#include "../common/launch.h"

namespace spare {
namespace topk {

// ------------------------------------------------------------------------------------- layout
enum DescField : int64_t { kPtr = 0, kBytes, kCols, kRowBytes, kDtype, kHBlock0, kPBlock0, kOut, kE0, kDescCols };
enum SelField : int64_t { kThr = 0, kMode, kTake, kEq0, kSelCols };
enum CandField : int64_t { kCOff = 0, kCCount, kCBlock0, kCandCols };
enum Dtype : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
// Pack rule of a tensor: key > thr is on; key == thr is off (kNoneEqual), on (kAllEqual), or on for
// the first `take` of them in flat order (kPartial: ranks from equal_counts' scan + a block scan).
enum Mode : int64_t { kNoneEqual = 0, kAllEqual = 1, kPartial = 2 };

constexpr int64_t kBins = 256;           // 8-bit digits
constexpr int64_t kNanBin = kBins;       // the histogram's extra column: NaN count (pass 0)
constexpr int64_t kHistCols = kBins + 1;
constexpr uint32_t kNoBin = 0xFFFFFFFFu; // a thread with nothing to count this round
constexpr int64_t kMaxThreads = 256;     // shared arrays are sized for at most this block size
// Pack's block scan of per-byte tie counts: kMaxThreads/kSeg = 16 segments of kSeg = 16, so both of
// its serial stages (16 threads x 16 adds, then 1 thread x 16 adds) are equally short.
constexpr int64_t kSeg = 16;
// Histogram: independent loads in flight per thread per round. 4 x 4 bytes x 2048 resident threads
// = 32 KB per SM in flight, above what an SM needs to cover DRAM latency at full bandwidth
// (~3.35 TB/s x ~0.6 us / 132 SMs ~ 15 KB on an H100); more would only cost registers.
constexpr int32_t kUnroll = 4;
// Compaction: keys staged in shared memory per block before one global reservation (one atomic on the
// tensor's cursor per flush, not one per warp: a big tensor's ~900 blocks share that cursor). Two
// rounds of kMaxThreads * kUnroll keys (8 KB): a flush at most every other round, and at 5% candidates
// (a typical first-digit bin) a 16384-score chunk flushes once.
constexpr int64_t kStage = 2 * kMaxThreads * kUnroll;

// ------------------------------------------------------------------------------------- keys
SPARE_HD inline uint32_t clz32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__clz(v));
#else
  return v ? static_cast<uint32_t>(__builtin_clz(v)) : 32u;
#endif
}

SPARE_HD inline uint32_t popc32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__popc(v));
#else
  return static_cast<uint32_t>(__builtin_popcount(v));
#endif
}

// The float32 bit pattern of an IEEE half (exact: every half is a float32; NaN stays NaN).
SPARE_HD inline uint32_t half_to_float_bits(uint32_t h) {
  const uint32_t s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return s | 0x7F800000u | (m << 13);        // inf, NaN
  if (e != 0) return s | ((e + 112u) << 23) | (m << 13);     // normal: rebias 15 -> 127
  if (m == 0) return s;                                      // ±0
  const uint32_t sh = clz32(m) - 21u;                        // subnormal: shift the leading 1 to bit 10
  return s | ((113u - sh) << 23) | (((m << sh) & 0x3FFu) << 13);
}

// Entry i of a score tensor as float32 bits.
template <typename I>
SPARE_HD inline uint32_t load_bits(const void* x, int64_t dtype, I i) {
  if (dtype == kF32) return static_cast<const uint32_t*>(x)[i];
  const uint32_t h = static_cast<const uint16_t*>(x)[i];
  return dtype == kBF16 ? h << 16 : half_to_float_bits(h);
}

// x + i entries of a score tensor of `dtype` (chunk-local 32-bit indices from there: fewer registers).
SPARE_HD inline const void* entry_ptr(const void* x, int64_t dtype, int64_t i) {
  return static_cast<const char*>(x) + i * (dtype == kF32 ? 4 : 2);
}

SPARE_HD inline bool is_nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }

// Unsigned order-preserving key of a non-NaN float32: _Keys' signed key with its sign bit flipped.
// x >= +0: bits | 2^31.  x < 0 with magnitude bits m > 0: 2^31 - 1 - m.  -0.0: +0.0's key 2^31.
// (2^31 - 1, signed key -1, is unused, as in _Keys.)
SPARE_HD inline uint32_t ukey(uint32_t u) {
  const uint32_t m = u & 0x7FFFFFFFu;
  if (!(u >> 31)) return u | 0x80000000u;
  return m ? 0x7FFFFFFFu - m : 0x80000000u;
}

// ------------------------------------------------------------------------------------- chunks
// A block's chunk, located once per block (first phase, one thread) and kept in shared memory.
struct Chunk {
  const void* x;     // the tensor's scores
  int64_t out;       // byte offset of its packed mask rows in the flat output buffer
  int64_t t, lc;     // tensor index, chunk index within the tensor
  int64_t q0, q1;    // output bytes [q0, q1) of the (rows, row_bytes) mask
  int64_t e0, e1;    // entries [e0, e1) of the flat tensor (the same range)
  int64_t cols, rb, dtype;
};

// First flat entry of output byte q (q == rows*row_bytes gives numel); q, row_bytes < 2^32.
SPARE_HD inline int64_t entry_of_byte(int64_t q, int64_t cols, int64_t row_bytes) {
  const uint32_t q32 = static_cast<uint32_t>(q), rb32 = static_cast<uint32_t>(row_bytes);
  const uint32_t r = q32 / rb32;
  return static_cast<int64_t>(r) * cols + static_cast<int64_t>(q32 - r * rb32) * kBitsPerByte;
}

// The chunk of block b: chunk_bytes output bytes of tensor t, t the last row with block0 <= b
// (a tensor with no chunks has its successor's block0 and is never chosen: the search takes the last
// such row).
SPARE_HD inline Chunk chunk_of(const int64_t* desc, int64_t n, int64_t field, int64_t chunk_bytes, int64_t b) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (desc[mid * kDescCols + field] <= b) lo = mid; else hi = mid - 1;
  }
  const int64_t* d = desc + lo * kDescCols;
  Chunk c;
  c.x = reinterpret_cast<const void*>(d[kPtr]);
  c.out = d[kOut];
  c.t = lo;
  c.lc = b - d[field];
  c.cols = d[kCols];
  c.rb = d[kRowBytes];
  c.dtype = d[kDtype];
  const int64_t total = d[kBytes];
  c.q0 = c.lc * chunk_bytes;
  c.q1 = c.q0 + chunk_bytes < total ? c.q0 + chunk_bytes : total;
  c.e0 = entry_of_byte(c.q0, c.cols, c.rb);
  c.e1 = entry_of_byte(c.q1, c.cols, c.rb);
  return c;
}

SPARE_HD inline void shared_add(uint32_t* p, uint32_t v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// bins[bin] += 1 for every thread of the warp whose bin is not kNoBin. On the GPU the lanes with the
// same bin are merged first (one shared atomic per distinct bin and warp: scores of a chunk crowd
// into a few top digits in pass 0, where plain atomics would serialise up to 32-way). Every lane of
// the warp must call it (the histogram's rounds are block-uniform). Host: a plain add, same counts.
SPARE_HD inline void warp_hist_add(Thread t, uint32_t* bins, uint32_t bin) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
  if (bin != kNoBin) atomicAdd(&bins[bin], 1u);  // no __match_any_sync before sm_70
#elif defined(__CUDA_ARCH__)
  if (!__any_sync(0xFFFFFFFFu, bin != kNoBin)) return;
  const uint32_t peers = __match_any_sync(0xFFFFFFFFu, bin);
  const uint32_t lane = static_cast<uint32_t>(t.tid()) & 31u;
  if (bin != kNoBin && lane == static_cast<uint32_t>(__ffs(peers) - 1)) atomicAdd(&bins[bin], __popc(peers));
#else
  (void)t;
  if (bin != kNoBin) bins[bin] += 1;
#endif
}

// ------------------------------------------------------------------------------------- histogram
// hist[t, digit L of ukey] += 1 for every key of tensor t whose digits 0..L-1 equal prefix[t]
// (prefix[t] < 0: tensor skipped); NaN entries counted in hist[t, kNanBin] instead.
struct HistParams {
  const int64_t* desc;
  int64_t n;
  const int64_t* prefix;
  unsigned long long* hist;
  int64_t level;        // 0..3
  int64_t chunk_bytes;  // output bytes per block (8 entries each)
};

struct HistShared {
  Chunk c;
  int64_t prefix;
  uint32_t bins[kHistCols];
};

// phase 1: locate the chunk, zero the bins
SPARE_HD inline void hist_start(Thread t, const HistParams& p, HistShared* sh) {
  if (t.tid() == 0) {
    sh->c = chunk_of(p.desc, p.n, kHBlock0, p.chunk_bytes, t.block.x);
    sh->prefix = p.prefix[sh->c.t];
  }
  for (int64_t i = t.tid(); i < kHistCols; i += t.nthreads()) sh->bins[i] = 0;
}

// phase 2: count into shared bins
SPARE_HD inline void hist_count(Thread t, const HistParams& p, HistShared* sh) {
  const int64_t pre = sh->prefix;
  if (pre < 0) return;  // block-uniform
  const int64_t dtype = sh->c.dtype;
  const void* x = entry_ptr(sh->c.x, dtype, sh->c.e0);
  const int32_t T = static_cast<int32_t>(t.nthreads()), tid = static_cast<int32_t>(t.tid());
  const int32_t ne = static_cast<int32_t>(sh->c.e1 - sh->c.e0);  // <= 8 * chunk_bytes
  const int level = static_cast<int>(p.level);
  const int shift_digit = 24 - 8 * level, shift_prefix = shift_digit + 8;  // 32 at level 0: unused
  const uint32_t pre32 = static_cast<uint32_t>(pre);
  for (int32_t base = 0; base < ne; base += T * kUnroll) {  // the same trip count for every thread
    uint32_t u[kUnroll];
    for (int32_t j = 0; j < kUnroll; ++j) {
      const int32_t e = base + j * T + tid;
      u[j] = e < ne ? load_bits(x, dtype, e) : 0u;
    }
    for (int32_t j = 0; j < kUnroll; ++j) {
      uint32_t bin = kNoBin;
      if (base + j * T + tid < ne) {
        if (is_nan_bits(u[j])) {
          bin = static_cast<uint32_t>(kNanBin);
        } else {
          const uint32_t k = ukey(u[j]);
          if (level == 0 || (k >> shift_prefix) == pre32) bin = (k >> shift_digit) & 0xFFu;
        }
      }
      warp_hist_add(t, sh->bins, bin);
    }
  }
}

// phase 3: only the bins in use go to global memory (in later passes most chunks have none).
SPARE_HD inline void hist_flush(Thread t, const HistParams& p, HistShared* sh) {
  if (sh->prefix < 0) return;
  unsigned long long* row = p.hist + sh->c.t * kHistCols;
  for (int64_t i = t.tid(); i < kHistCols; i += t.nthreads())
    if (sh->bins[i]) atomic_add(row + i, static_cast<unsigned long long>(sh->bins[i]));
}

// ------------------------------------------------------------------------------------- compact (pass 1)
// The level-1 histogram of the keys whose digit 0 equals prefix[t] (pass 0's pick; prefix[t] < 0:
// tensor skipped), and, when cand is not null, those keys written to cand[ctab[t, kCOff] + ...]: the
// later passes read 4 bytes per candidate instead of every score. Candidate order within a segment
// depends on the blocks' timing (one atomic reservation per flush); the later passes only count, so
// the result does not.
struct CompactParams {
  const int64_t* desc;
  int64_t n;
  const int64_t* prefix;
  unsigned long long* hist;
  int64_t chunk_bytes;
  const int64_t* ctab;        // null: count only (no candidate array)
  unsigned long long* cursor; // per tensor: candidates written so far
  uint32_t* cand;
};

struct CompactShared {
  Chunk c;
  int64_t prefix, coff, ccount;
  unsigned long long flush_base;
  uint32_t nstaged, flush_n;
  uint32_t bins[kHistCols];
  uint32_t staged[kStage];
};

SPARE_HD inline unsigned long long atomic_add_return(unsigned long long* p, unsigned long long v) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(p, v);
#else
  const unsigned long long old = *p;
  *p += v;
  return old;
#endif
}

// staged[next free slot] = key for every lane of the warp with `keep`; on the GPU one shared atomic
// per warp (ballot + popc ranks the lanes). Every lane of the warp must call it. Host: in thread order.
SPARE_HD inline void warp_stage(Thread t, uint32_t* staged, uint32_t* nstaged, bool keep, uint32_t key) {
#if defined(__CUDA_ARCH__)
  const uint32_t ballot = __ballot_sync(0xFFFFFFFFu, keep);
  if (!ballot) return;
  const uint32_t lane = static_cast<uint32_t>(t.tid()) & 31u;
  const int leader = __ffs(ballot) - 1;
  uint32_t base = 0;
  if (static_cast<int>(lane) == leader) base = atomicAdd(nstaged, static_cast<uint32_t>(__popc(ballot)));
  base = __shfl_sync(0xFFFFFFFFu, base, leader);
  if (keep) staged[base + __popc(ballot & ((1u << lane) - 1u))] = key;
#else
  (void)t;
  if (keep) staged[(*nstaged)++] = key;
#endif
}

// phase: locate the chunk, zero the bins and the stage
SPARE_HD inline void compact_start(Thread t, const CompactParams& p, CompactShared* sh) {
  if (t.tid() == 0) {
    sh->c = chunk_of(p.desc, p.n, kHBlock0, p.chunk_bytes, t.block.x);
    sh->prefix = p.prefix[sh->c.t];
    sh->coff = p.ctab ? p.ctab[sh->c.t * kCandCols + kCOff] : 0;
    sh->ccount = p.ctab ? p.ctab[sh->c.t * kCandCols + kCCount] : 0;
    sh->nstaged = 0;
  }
  for (int64_t i = t.tid(); i < kHistCols; i += t.nthreads()) sh->bins[i] = 0;
}

// Rounds of nthreads * kUnroll entries of the block's chunk (block-uniform; 0 for a skipped tensor).
SPARE_HD inline int32_t compact_rounds(Thread t, const CompactShared* sh) {
  if (sh->prefix < 0) return 0;
  const int64_t per = t.nthreads() * kUnroll, ne = sh->c.e1 - sh->c.e0;
  return static_cast<int32_t>((ne + per - 1) / per);
}

// phase (per round r): count digit 1 of the matching keys, stage them when there is a candidate array
SPARE_HD inline void compact_round(Thread t, const CompactParams& p, CompactShared* sh, int32_t r) {
  const int64_t dtype = sh->c.dtype;
  const void* x = entry_ptr(sh->c.x, dtype, sh->c.e0);
  const int32_t T = static_cast<int32_t>(t.nthreads()), tid = static_cast<int32_t>(t.tid());
  const int32_t ne = static_cast<int32_t>(sh->c.e1 - sh->c.e0), base = r * T * kUnroll;
  const uint32_t pre32 = static_cast<uint32_t>(sh->prefix);
  const bool stage = p.cand != nullptr;
  uint32_t u[kUnroll];
  SPARE_UNROLL
  for (int32_t j = 0; j < kUnroll; ++j) {
    const int32_t e = base + j * T + tid;
    u[j] = e < ne ? load_bits(x, dtype, e) : 0u;
  }
  SPARE_UNROLL
  for (int32_t j = 0; j < kUnroll; ++j) {
    const uint32_t k = ukey(u[j]);  // no NaN here: pass 0 refused them
    const bool keep = base + j * T + tid < ne && (k >> 24) == pre32;
    warp_hist_add(t, sh->bins, keep ? (k >> 16) & 0xFFu : kNoBin);
    if (stage) warp_stage(t, sh->staged, &sh->nstaged, keep, k);
  }
}

// After round r (read after a barrier, block-uniform): flush the stage when the next round might not
// fit, or after the last round.
SPARE_HD inline bool stage_full(Thread t, uint32_t n, int32_t r, int32_t rounds) {
  return n > 0 && (r + 1 == rounds || static_cast<int64_t>(n) > kStage - t.nthreads() * kUnroll);
}

SPARE_HD inline bool compact_should_flush(Thread t, const CompactShared* sh, int32_t r, int32_t rounds) {
  return stage_full(t, sh->nstaged, r, rounds);
}

// phase: one thread reserves the staged keys' place in the tensor's segment
SPARE_HD inline void compact_reserve(Thread t, const CompactParams& p, CompactShared* sh) {
  if (t.tid() != 0) return;
  sh->flush_n = sh->nstaged;
  sh->flush_base = atomic_add_return(p.cursor + sh->c.t, sh->flush_n);
}

// phase: copy the stage out (coalesced) and empty it. A key past the segment (the scores changed
// since pass 0) is dropped; the driver compares the cursors with the segment sizes.
SPARE_HD inline void compact_copy(Thread t, const CompactParams& p, CompactShared* sh) {
  const int64_t n = sh->flush_n, b = static_cast<int64_t>(sh->flush_base);
  for (int64_t i = t.tid(); i < n; i += t.nthreads())
    if (b + i < sh->ccount) p.cand[sh->coff + b + i] = sh->staged[i];
  if (t.tid() == 0) sh->nstaged = 0;  // the others read flush_n, not nstaged
}

SPARE_HD inline void compact_flush_hist(Thread t, const CompactParams& p, CompactShared* sh) {
  if (sh->prefix < 0) return;
  unsigned long long* row = p.hist + sh->c.t * kHistCols;
  for (int64_t i = t.tid(); i < kBins; i += t.nthreads())
    if (sh->bins[i]) atomic_add(row + i, static_cast<unsigned long long>(sh->bins[i]));
}

// ------------------------------------------------------------------------------------- candidate histogram
// Histograms over candidate keys (unsigned keys): the radix path's passes 2 and 3, and every level of
// the window path's selection (one segment). hist[t, digit L] += 1 for each key of segment t whose
// digits 0..L-1 equal prefix[t] (< 0: skipped; level 0: every key). Block b takes `chunk` keys of the
// segment whose first block kCBlock0 is the last one <= b.
struct CandHistParams {
  const int64_t* ctab;
  int64_t n;
  const int64_t* prefix;
  unsigned long long* hist;
  const uint32_t* cand;
  int64_t level;  // 0..3
  int64_t chunk;  // keys per block
};

struct CandHistShared {
  int64_t t, k0, k1, prefix;
  uint32_t bins[kHistCols];
};

SPARE_HD inline void cand_start(Thread t, const CandHistParams& p, CandHistShared* sh) {
  if (t.tid() == 0) {
    int64_t lo = 0, hi = p.n - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (p.ctab[mid * kCandCols + kCBlock0] <= t.block.x) lo = mid; else hi = mid - 1;
    }
    const int64_t* c = p.ctab + lo * kCandCols;
    const int64_t first = (t.block.x - c[kCBlock0]) * p.chunk;
    sh->t = lo;
    sh->k0 = c[kCOff] + first;
    sh->k1 = c[kCOff] + (first + p.chunk < c[kCCount] ? first + p.chunk : c[kCCount]);
    sh->prefix = p.prefix[lo];
  }
  for (int64_t i = t.tid(); i < kHistCols; i += t.nthreads()) sh->bins[i] = 0;
}

SPARE_HD inline void cand_count(Thread t, const CandHistParams& p, CandHistShared* sh) {
  if (sh->prefix < 0) return;  // block-uniform
  const uint32_t* k = p.cand + sh->k0;
  const int32_t ne = static_cast<int32_t>(sh->k1 - sh->k0);
  const int32_t T = static_cast<int32_t>(t.nthreads()), tid = static_cast<int32_t>(t.tid());
  const int level = static_cast<int>(p.level);
  const int shift_digit = 24 - 8 * level, shift_prefix = shift_digit + 8;  // 32 at level 0: unused
  const uint32_t pre32 = static_cast<uint32_t>(sh->prefix);
  for (int32_t base = 0; base < ne; base += T * kUnroll) {  // the same trip count for every thread
    uint32_t u[kUnroll];
    SPARE_UNROLL
    for (int32_t j = 0; j < kUnroll; ++j) {
      const int32_t e = base + j * T + tid;
      u[j] = e < ne ? k[e] : 0u;
    }
    SPARE_UNROLL
    for (int32_t j = 0; j < kUnroll; ++j) {
      const bool keep = base + j * T + tid < ne && (level == 0 || (u[j] >> shift_prefix) == pre32);
      warp_hist_add(t, sh->bins, keep ? (u[j] >> shift_digit) & 0xFFu : kNoBin);
    }
  }
}

SPARE_HD inline void cand_flush(Thread t, const CandHistParams& p, CandHistShared* sh) {
  if (sh->prefix < 0) return;
  unsigned long long* row = p.hist + sh->t * kHistCols;
  for (int64_t i = t.tid(); i < kBins; i += t.nthreads())
    if (sh->bins[i]) atomic_add(row + i, static_cast<unsigned long long>(sh->bins[i]));
}

// ------------------------------------------------------------------------------------- sample + window
// The window path (global scope): a deterministic sample of m keys locates the k-th key within a
// window [lo, hi] of keys (the driver picks it from the sample's order statistics, on the device); ONE
// pass over the scores then counts, per tensor, the keys above hi and the NaNs, and writes the keys
// inside the window (unsigned keys, with their tensor) to a candidate array of a fixed capacity. When
// the k-th key lies in the window (above < k <= above + candidates, no overflow), it is an order
// statistic of the candidates (radix passes of cand_histogram over them); otherwise the driver falls
// back to the radix passes over the scores. Exact either way.

// A 32-bit mix (lowbias32): the sample's offset inside its stratum, so that strides never alias with
// row lengths. Deterministic.
SPARE_HD inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Sample keys are stored as signed-order int32 (ukey ^ 2^31): torch sorts them as int32.
SPARE_HD inline uint32_t signed_order(uint32_t ukey_) { return ukey_ ^ 0x80000000u; }

struct SampleParams {
  const int64_t* desc;
  int64_t n;
  int64_t total;  // entries of all tensors
  int64_t m;      // samples, 1 <= m <= total
  uint32_t* out;  // m signed-order keys (a NaN: the largest key; the window pass reports it)
};

// One thread per sample: entry g of stratum [i*total/m, (i+1)*total/m) of the concatenated entries.
SPARE_HD inline void sample_body(Thread t, const SampleParams& p) {
  const int64_t i = t.block.x * t.nthreads() + t.tid();
  if (i >= p.m) return;
  const int64_t lo = i * p.total / p.m, hi = (i + 1) * p.total / p.m;  // total < 2^40, m <= 2^22
  const int64_t g = lo + static_cast<int64_t>(mix32(static_cast<uint32_t>(i)) % static_cast<uint64_t>(hi - lo));
  int64_t a = 0, b = p.n - 1;  // the last tensor with e0 <= g (empty tensors share their successor's e0)
  while (a < b) {
    const int64_t mid = (a + b + 1) / 2;
    if (p.desc[mid * kDescCols + kE0] <= g) a = mid; else b = mid - 1;
  }
  const int64_t* d = p.desc + a * kDescCols;
  const uint32_t u = load_bits(reinterpret_cast<const void*>(d[kPtr]), d[kDtype], g - d[kE0]);
  p.out[i] = is_nan_bits(u) ? 0xFFFFFFFFu ^ 0x80000000u : signed_order(ukey(u));
}

struct WindowParams {
  const int64_t* desc;
  int64_t n;
  const int32_t* win;          // [lo, hi] as signed-order keys (device: picked from the sample there)
  unsigned long long* counts;  // (n, 2): keys above hi, NaNs
  unsigned long long* cursor;  // candidates found (may exceed capacity: the driver then falls back)
  uint32_t* cand;              // capacity unsigned keys
  int32_t* cand_t;             // their tensors
  int64_t capacity;
  int64_t chunk_bytes;         // the histogram's grid
};

struct WindowShared {
  Chunk c;
  uint32_t lo, hi, above, nan, nstaged, flush_n;
  unsigned long long flush_base;
  uint32_t staged[kStage];
};

SPARE_HD inline void window_start(Thread t, const WindowParams& p, WindowShared* sh) {
  if (t.tid() != 0) return;
  sh->c = chunk_of(p.desc, p.n, kHBlock0, p.chunk_bytes, t.block.x);
  sh->lo = signed_order(static_cast<uint32_t>(p.win[0]));
  sh->hi = signed_order(static_cast<uint32_t>(p.win[1]));
  sh->above = sh->nan = sh->nstaged = 0;
}

SPARE_HD inline int32_t window_rounds(Thread t, const WindowShared* sh) {
  const int64_t per = t.nthreads() * kUnroll, ne = sh->c.e1 - sh->c.e0;
  return static_cast<int32_t>((ne + per - 1) / per);
}

SPARE_HD inline void window_round(Thread t, const WindowParams&, WindowShared* sh, int32_t r) {
  const int64_t dtype = sh->c.dtype;
  const void* x = entry_ptr(sh->c.x, dtype, sh->c.e0);
  const int32_t T = static_cast<int32_t>(t.nthreads()), tid = static_cast<int32_t>(t.tid());
  const int32_t ne = static_cast<int32_t>(sh->c.e1 - sh->c.e0), base = r * T * kUnroll;
  const uint32_t lo = sh->lo, hi = sh->hi;
  uint32_t u[kUnroll];
  SPARE_UNROLL
  for (int32_t j = 0; j < kUnroll; ++j) {
    const int32_t e = base + j * T + tid;
    u[j] = e < ne ? load_bits(x, dtype, e) : 0u;
  }
  uint32_t above = 0, nan = 0;
  SPARE_UNROLL
  for (int32_t j = 0; j < kUnroll; ++j) {
    const bool valid = base + j * T + tid < ne, is_nan = is_nan_bits(u[j]);
    const uint32_t k = ukey(u[j]);
    nan += valid && is_nan;
    above += valid && !is_nan && k > hi;
    warp_stage(t, sh->staged, &sh->nstaged, valid && !is_nan && k >= lo && k <= hi, k);
  }
  if (above) shared_add(&sh->above, above);
  if (nan) shared_add(&sh->nan, nan);
}

SPARE_HD inline bool window_should_flush(Thread t, const WindowShared* sh, int32_t r, int32_t rounds) {
  return stage_full(t, sh->nstaged, r, rounds);
}

SPARE_HD inline void window_reserve(Thread t, const WindowParams& p, WindowShared* sh) {
  if (t.tid() != 0) return;
  sh->flush_n = sh->nstaged;
  sh->flush_base = atomic_add_return(p.cursor, sh->flush_n);
}

// Keys past the capacity are dropped (the cursor still counts them: the driver falls back).
SPARE_HD inline void window_copy(Thread t, const WindowParams& p, WindowShared* sh) {
  const int64_t n = sh->flush_n, b = static_cast<int64_t>(sh->flush_base);
  const int32_t tensor = static_cast<int32_t>(sh->c.t);
  for (int64_t i = t.tid(); i < n; i += t.nthreads()) {
    if (b + i < p.capacity) {
      p.cand[b + i] = sh->staged[i];
      p.cand_t[b + i] = tensor;
    }
  }
  if (t.tid() == 0) sh->nstaged = 0;  // the others read flush_n, not nstaged
}

SPARE_HD inline void window_finish(Thread t, const WindowParams& p, WindowShared* sh) {
  if (t.tid() != 0) return;
  if (sh->above) atomic_add(p.counts + sh->c.t * 2, static_cast<unsigned long long>(sh->above));
  if (sh->nan) atomic_add(p.counts + sh->c.t * 2 + 1, static_cast<unsigned long long>(sh->nan));
}

// ------------------------------------------------------------------------------------- equal counts
// counts[b] = number of keys equal to thr[t] in chunk b. The table holds only the tensors whose ties
// are cut (their kPBlock0 = offsets of their chunks in counts), chunks of the pack's size.
struct EqParams {
  const int64_t* desc;
  int64_t n;
  const int64_t* thr;
  int64_t* counts;
  int64_t chunk_bytes;
};

struct EqShared {
  Chunk c;
  uint32_t thr, count;
};

// phase 1
SPARE_HD inline void eq_start(Thread t, const EqParams& p, EqShared* sh) {
  if (t.tid() != 0) return;
  sh->c = chunk_of(p.desc, p.n, kPBlock0, p.chunk_bytes, t.block.x);
  sh->thr = static_cast<uint32_t>(p.thr[sh->c.t]);
  sh->count = 0;
}

// phase 2
SPARE_HD inline void eq_count(Thread t, const EqParams&, EqShared* sh) {
  const int64_t dtype = sh->c.dtype;
  const void* x = entry_ptr(sh->c.x, dtype, sh->c.e0);
  const uint32_t thr = sh->thr;
  const int32_t ne = static_cast<int32_t>(sh->c.e1 - sh->c.e0), T = static_cast<int32_t>(t.nthreads());
  uint32_t n = 0;
  for (int32_t e = static_cast<int32_t>(t.tid()); e < ne; e += T) {
    const uint32_t u = load_bits(x, dtype, e);
    n += (!is_nan_bits(u) && ukey(u) == thr) ? 1u : 0u;
  }
  if (n) shared_add(&sh->count, n);
}

// phase 3
SPARE_HD inline void eq_write(Thread t, const EqParams& p, EqShared* sh) {
  if (t.tid() == 0) p.counts[t.block.x] = static_cast<int64_t>(sh->count);
}

// ------------------------------------------------------------------------------------- pack
// One thread per output byte; a block is a chunk of nthreads bytes. Byte = bits of key > thr, plus
// the bits of key == thr per the tensor's mode. kPartial: the rank of a tied entry among its
// tensor's ties = scan[eq0 + chunk] - scan[eq0] (ties in earlier chunks; scan is the exclusive scan
// of equal_counts) + ties in earlier bytes of the chunk (block scan below) + earlier bits of the byte.
struct PackParams {
  const int64_t* desc;
  int64_t n;
  const int64_t* sel;
  const int64_t* scan;
  uint8_t* out;  // the flat output buffer: tensor t's mask rows at out + desc[t, kOut]
};

struct PackShared {
  Chunk c;
  int64_t mode, take, base;          // base: ties of the tensor before this chunk (kPartial)
  uint32_t thr;
  uint32_t cnt[kMaxThreads];         // per byte: number of tied bits, then its exclusive scan
  uint32_t seg[kMaxThreads / kSeg];  // per segment of kSeg bytes: total, then its exclusive scan
  uint8_t gt[kMaxThreads], eq[kMaxThreads];
};

// phase 1: locate the chunk and the tensor's rule
SPARE_HD inline void pack_start(Thread t, const PackParams& p, PackShared* sh) {
  if (t.tid() != 0) return;
  sh->c = chunk_of(p.desc, p.n, kPBlock0, t.nthreads(), t.block.x);
  const int64_t* s = p.sel + sh->c.t * kSelCols;
  sh->thr = static_cast<uint32_t>(s[kThr]);
  sh->mode = s[kMode];
  sh->take = s[kTake];
  sh->base = sh->mode == kPartial ? p.scan[s[kEq0] + sh->c.lc] - p.scan[s[kEq0]] : 0;
}

// phase 2: the bits of this thread's byte; written out unless the tensor's ties are cut (kPartial:
// kept in shared memory with their tie count).
SPARE_HD inline void pack_bits_phase(Thread t, const PackParams& p, PackShared* sh) {
  const int64_t tid = t.tid(), q = sh->c.q0 + tid;
  const uint32_t thr = sh->thr;
  uint32_t gt = 0, eq = 0;
  if (q < sh->c.q1) {
    const int64_t cols = sh->c.cols, dtype = sh->c.dtype;
    const uint32_t q32 = static_cast<uint32_t>(q), rb32 = static_cast<uint32_t>(sh->c.rb), r = q32 / rb32;
    const int64_t j = static_cast<int64_t>(q32 - r * rb32) * kBitsPerByte;  // first column of the byte
    const int32_t ne = static_cast<int32_t>(cols - j < kBitsPerByte ? cols - j : kBitsPerByte);
    const void* x = entry_ptr(sh->c.x, dtype, static_cast<int64_t>(r) * cols + j);
    for (int32_t i = 0; i < ne; ++i) {
      const uint32_t k = ukey(load_bits(x, dtype, i));  // no NaN here: pass 0 refused them
      gt |= static_cast<uint32_t>(k > thr) << i;
      eq |= static_cast<uint32_t>(k == thr) << i;
    }
  }
  if (sh->mode != kPartial) {
    if (q < sh->c.q1) p.out[sh->c.out + q] = static_cast<uint8_t>(gt | (sh->mode == kAllEqual ? eq : 0u));
    return;
  }
  sh->gt[tid] = static_cast<uint8_t>(gt);
  sh->eq[tid] = static_cast<uint8_t>(eq);
  sh->cnt[tid] = popc32(eq);
}

// phase 3: segment-wise exclusive scan of the counts (nthreads/kSeg threads, kSeg adds each).
SPARE_HD inline void pack_scan_segments(Thread t, const PackParams&, PackShared* sh) {
  const int64_t T = t.nthreads(), s0 = t.tid() * kSeg;
  if (sh->mode != kPartial || s0 >= T) return;
  uint32_t acc = 0;
  for (int64_t i = s0; i < s0 + kSeg && i < T; ++i) {
    const uint32_t v = sh->cnt[i];
    sh->cnt[i] = acc;
    acc += v;
  }
  sh->seg[t.tid()] = acc;
}

// phase 4: exclusive scan of the segment totals (one thread, at most kMaxThreads/kSeg adds).
SPARE_HD inline void pack_scan_totals(Thread t, const PackParams&, PackShared* sh) {
  if (t.tid() != 0 || sh->mode != kPartial) return;
  uint32_t acc = 0;
  for (int64_t i = 0; i * kSeg < t.nthreads(); ++i) {
    const uint32_t v = sh->seg[i];
    sh->seg[i] = acc;
    acc += v;
  }
}

// phase 5: the bytes of a kPartial tensor, the first `take` ties on.
SPARE_HD inline void pack_ties_phase(Thread t, const PackParams& p, PackShared* sh) {
  const int64_t tid = t.tid(), q = sh->c.q0 + tid;
  if (sh->mode != kPartial || q >= sh->c.q1) return;
  const int64_t take = sh->take;
  int64_t rank = sh->base + sh->cnt[tid] + sh->seg[tid / kSeg];
  uint32_t byte = sh->gt[tid];
  const uint32_t eq = sh->eq[tid];
  for (uint32_t i = 0; i < kBitsPerByte; ++i) {
    if ((eq >> i) & 1u) {
      if (rank < take) byte |= 1u << i;
      ++rank;
    }
  }
  p.out[sh->c.out + q] = static_cast<uint8_t>(byte);
}

}  // namespace topk
}  // namespace spare
