// Per-sample saliency (sample_abs Σ_i |g_i|, sample_sq Σ_i g_i², DESIGN §1) without a per-sample gradient
// in memory: the block body of saliency.cu's tile kernel, written so the host harness
// (csrc/harness/saliency.cpp) runs the same code on the CPU.
//
// One block of kSalThreads threads (kSalWarps warps, 2×2) owns a kSalTileO × kSalTileI tile of the
// weight (linear: (out, in); conv: (out, C·kh·kw), groups == 1) and one group of consecutive samples.
// Per sample, per chunk of kSalStepT tokens (pixels): the threads stage dy's (tile rows × tokens) and x's
// (tokens × tile columns, a conv's unfolded input gathered on the fly) into shared memory, zero outside
// the shapes; each warp multiplies its 32×32 sub-tile (2×2 fragments of 16×16×16) into g_i's fragments.
// After the sample's last chunk each fragment element is folded, |g| or g², into the tile's statistic
// (the same fragment type and layout, so element i of one is element i of the other). At the end the
// statistic goes out: with one group straight into acc (+=, each entry owned by one thread); with several,
// into partials (groups, out, cols) that sample_reduce_body adds to acc in group order. Deterministic:
// no atomics, fixed orders.
//
// The matrix-multiply primitive is a policy: Mma::load_a / load_b / mma / zero / fold / store. On the
// device it is WMMA (bf16 / fp16 in, fp32 accumulate, saliency.cu); on the host ScalarMma below (fp32
// products of the same 16-bit values: exact, as on the tensor cores; sums in another order). Block
// phases go through a Block policy: threads(f) runs f for every thread then synchronises, warps(f) runs
// f per warp (warp-collective on the device: every lane calls it, lanes {lane, 32}; the host calls it
// once per warp with lanes {0, 1}), sync() is __syncthreads().
#pragma once

#include <cstdint>

#include "../common/launch.h"

namespace spare {

constexpr int kSalWarps = 4;                      // 2×2 warps of 32×32
constexpr int kSalThreads = 32 * kSalWarps;
constexpr int kSalTileO = 64, kSalTileI = 64;     // block tile of the weight
constexpr int kSalWarpO = 32, kSalWarpI = 32;     // warp sub-tile: 2×2 fragments
constexpr int kSalFrag = 16;                      // WMMA m = n = k = 16 (bf16 / fp16)
// Tokens per staged chunk: two WMMA k-steps per barrier pair; 8 KiB of 16-bit staging per chunk. T not a
// multiple of 16 is zero-padded (T = 77: 80 tokens of MMA work, the k-step past T is skipped; 64: none).
constexpr int kSalStepT = 32;
// Shared-memory row length in elements: 64 + 8 (a multiple of 8 for WMMA loads; the 16-byte offset
// staggers the rows over the banks).
constexpr int kSalLd = kSalTileO + 8;
constexpr int kSalStageElems = kSalStepT * kSalLd;   // one of A (dy) / B (x), 16-bit entries
constexpr int kSalOutFloats = kSalWarps * kSalFrag * kSalFrag;
static_assert(kSalTileO == 2 * kSalWarpO && kSalTileI == 2 * kSalWarpI && kSalWarpO == 2 * kSalFrag,
              "the warp layout below is 2×2 warps of 2×2 fragments");
static_assert(kSalTileI + 8 == kSalLd, "A and B stages share kSalLd");

template <typename TG>
struct SampleTileParams {
  const TG* x;
  const TG* dy;
  float* out;          // groups == 1: acc (OUT, IN) +=; else partials (groups, OUT, IN) =
  int64_t S, T, OUT, IN;
  int64_t spg, groups;   // samples per group (the last may have fewer), number of groups
  // dy entry (sample s, token t, row o) at s·dy_ss + t·dy_st + o·dy_so; linear x entry (s, t, col i) at
  // s·x_ss + t·x_st + i.
  int64_t dy_ss, dy_st, dy_so, x_ss, x_st;
  // conv (conv != 0): x (S, C, H, W); column i = (c, r, q) of the (C, KH, KW) kernel; token t = (oh, ow).
  int64_t conv, C, H, W, KH, KW, OW, sh, sw, ph, pw, dh, dw;
  int64_t square;        // 1: g², 0: |g|
  // 16-byte loads: vec_a when dy's contiguous extent (OUT for linear, OH·OW for conv) is a multiple of 8
  // and dy is 16-byte aligned; vec_b (linear) when IN is and x is. 8 entries per load instead of 1: the
  // staging's instruction count, not the tensor cores, bounds the scalar path (≈ 12 instructions per
  // entry, 32 entries per thread per chunk ≈ 4× the chunk's MMA issue time).
  int64_t vec_a, vec_b;
};

template <typename TG>
struct alignas(16) SalVec8 {
  TG v[8];
};

struct SampleReduceParams {
  const float* part;   // (groups, numel)
  float* acc;          // (numel)
  int64_t numel, groups;
};

// Lanes of a warp as a warp body sees them: the device's 32 lanes each take every 32nd item; the host's
// single call takes them all.
struct Lanes {
  int64_t first, step;
};

SPARE_HD inline void warp_sync() {
#if defined(__CUDA_ARCH__)
  __syncwarp();
#endif
}

// Which path a per-sample statistic takes on CUDA (saliency.cu). Per weight entry and sample the ATen
// path costs its GEMM share 2T/R_gemm plus the per-sample gradient's fp32 scratch write, re-read and the
// acc update, ≈ 12 B/BW; the tile kernel costs 2T/R_tile and no traffic. Tiles win while
// T < 6 / (BW · (1/R_tile − 1/R_gemm)); estimates for an H100 (not yet measured): BW 3 TB/s (HBM: the
// worst case, small weights' scratch stays in the 50 MB L2), R_gemm ≈ 600 TFLOP/s (cuBLAS bf16 at these
// shapes), R_tile ≈ 300 TFLOP/s linear / 250 conv (mma.sync peaks at ≈ 2/3 of the 990 TFLOP/s dense rate;
// per 64×64×32 block step ≈ 90 clocks of MMA against ≈ 120 (16-byte staging) / 240 (conv gather) issue
// clocks, single-buffered) → T < ≈ 1200 (linear) / 860 (conv); 768 also keeps 1024-token layers, whose
// scratch fits L2 (320×320×8 fp32 = 3.3 MB), on the ATen path. SD-1.5 at a 64×64 latent: 4096 and 1024
// tokens take the ATen path, 256, 77 (cross-attention K/V) and 64 take the tiles.
// fp32 inputs always take the ATen path: the WMMA path would round them (TF32), the reference does not.
constexpr int64_t kSalTileMaxTokens = 768;
// Blocks per SM a split aims at: 128 threads at 166 registers (bf16; fp16 128) and 13 KiB of shared
// memory fit 3 per SM (65536 registers); one full wave, so the sample split never leaves SMs idle for
// want of tiles.
constexpr int64_t kSalBlocksPerSM = 3;

inline bool sal_use_tiles(int64_t tokens, bool sixteen_bit) {
  return sixteen_bit && tokens > 1 && tokens <= kSalTileMaxTokens;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename TG>
inline SampleTileParams<TG> sal_linear_params(const TG* x, const TG* dy, int64_t S, int64_t T, int64_t OUT,
                                              int64_t IN, bool square) {
  SampleTileParams<TG> p{};
  p.x = x;
  p.dy = dy;
  p.S = S, p.T = T, p.OUT = OUT, p.IN = IN;
  p.dy_ss = T * OUT, p.dy_st = OUT, p.dy_so = 1;
  p.x_ss = T * IN, p.x_st = IN;
  p.square = square;
  p.spg = S, p.groups = 1;
  p.vec_a = OUT % 8 == 0 && aligned16(dy);
  p.vec_b = IN % 8 == 0 && aligned16(x);
  return p;
}

// x (S, C, H, W), dy (S, OUT, OH, OW) contiguous, groups == 1: tokens are the OH·OW output pixels, columns
// the C·KH·KW kernel entries.
template <typename TG>
inline SampleTileParams<TG> sal_conv_params(const TG* x, const TG* dy, int64_t S, int64_t C, int64_t H, int64_t W,
                                            int64_t OUT, int64_t KH, int64_t KW, int64_t OH, int64_t OW,
                                            const int64_t* stride, const int64_t* padding, const int64_t* dilation,
                                            bool square) {
  SampleTileParams<TG> p = sal_linear_params(x, dy, S, OH * OW, OUT, C * KH * KW, square);
  p.dy_ss = OUT * OH * OW, p.dy_st = 1, p.dy_so = OH * OW;
  p.x_ss = p.x_st = 0;
  p.vec_a = (OH * OW) % 8 == 0 && aligned16(dy);
  p.vec_b = 0;   // the unfolded input is gathered entry by entry
  p.conv = 1, p.C = C, p.H = H, p.W = W, p.KH = KH, p.KW = KW, p.OW = OW;
  p.sh = stride[0], p.sw = stride[1], p.ph = padding[0], p.pw = padding[1], p.dh = dilation[0], p.dw = dilation[1];
  return p;
}

inline int64_t sal_tiles(int64_t out, int64_t cols) { return cdiv(out, kSalTileO) * cdiv(cols, kSalTileI); }

// Samples per group and groups for S samples over `tiles` weight tiles: enough blocks to fill the GPU
// (target_blocks), never more groups than samples, partials within max_partial entries.
struct SalSplit {
  int64_t spg, groups;
};
inline SalSplit sal_split(int64_t S, int64_t tiles, int64_t numel, int64_t target_blocks, int64_t max_partial) {
  int64_t g = cdiv(target_blocks, tiles > 0 ? tiles : 1);
  if (g > S) g = S;
  if (g > 1 && g * numel > max_partial) g = max_partial / (numel > 0 ? numel : 1);
  if (g < 1) g = 1;
  const int64_t spg = cdiv(S, g);
  return SalSplit{spg, cdiv(S, spg)};   // no empty group
}

template <typename TG>
SPARE_HD inline void sal_stage(const SampleTileParams<TG>& p, int64_t s, int64_t t0, int64_t o0, int64_t i0,
                               int64_t tid, TG* sa, TG* sb) {
  const TG zero = TG(0, TG::from_bits());   // +0 as bits: no float rounding code (c10::Half / BFloat16)
  // A: dy rows o0.., tokens t0.. as a column-major (o fastest) 64 × 32 tile; lanes along dy's
  // contiguous dim (o for linear, t for conv) so the global loads coalesce.
  const bool o_fast = p.dy_so == 1;
  if (p.vec_a) {   // 8 entries along the contiguous dim: all inside the shapes or all outside
    constexpr int64_t vo = kSalTileO / 8, vt = kSalStepT / 8;
    for (int64_t e = tid; e < kSalTileO * kSalStepT / 8; e += kSalThreads) {
      const int64_t o = o_fast ? e % vo * 8 : e / vt, t = o_fast ? e / vo : e % vt * 8;
      const int64_t go = o0 + o, gt = t0 + t;
      SalVec8<TG> v;
      if (go < p.OUT && gt < p.T) {
        v = *reinterpret_cast<const SalVec8<TG>*>(p.dy + s * p.dy_ss + gt * p.dy_st + go * p.dy_so);
      } else {
        SPARE_UNROLL for (int j = 0; j < 8; ++j) v.v[j] = zero;
      }
      if (o_fast) {
        *reinterpret_cast<SalVec8<TG>*>(sa + o + t * kSalLd) = v;
      } else {
        SPARE_UNROLL for (int j = 0; j < 8; ++j) sa[o + (t + j) * kSalLd] = v.v[j];
      }
    }
  } else {
    for (int64_t e = tid; e < kSalTileO * kSalStepT; e += kSalThreads) {
      const int64_t o = o_fast ? e % kSalTileO : e / kSalStepT, t = o_fast ? e / kSalTileO : e % kSalStepT;
      const int64_t go = o0 + o, gt = t0 + t;
      sa[o + t * kSalLd] = (go < p.OUT && gt < p.T) ? p.dy[s * p.dy_ss + gt * p.dy_st + go * p.dy_so] : zero;
    }
  }
  if (p.vec_b) {   // linear x, 8 columns per load
    for (int64_t e = tid; e < kSalStepT * kSalTileI / 8; e += kSalThreads) {
      const int64_t i = e % (kSalTileI / 8) * 8, t = e / (kSalTileI / 8);
      const int64_t gi = i0 + i, gt = t0 + t;
      SalVec8<TG> v;
      if (gi < p.IN && gt < p.T) {
        v = *reinterpret_cast<const SalVec8<TG>*>(p.x + s * p.x_ss + gt * p.x_st + gi);
      } else {
        SPARE_UNROLL for (int j = 0; j < 8; ++j) v.v[j] = zero;
      }
      *reinterpret_cast<SalVec8<TG>*>(sb + t * kSalLd + i) = v;
    }
    return;
  }
  // B: x tokens × columns i0.., row-major (i fastest). A thread keeps one column (kSalThreads is a
  // multiple of kSalTileI) and steps over the rows, so a conv's column decomposition and the pixel's
  // (oh, ow) division happen once per chunk, not per entry.
  static_assert(kSalThreads % kSalTileI == 0, "one column per thread");
  constexpr int64_t rstep = kSalThreads / kSalTileI;
  const int64_t i = tid % kSalTileI, gi = i0 + i;
  if (p.conv == 0) {
    for (int64_t t = tid / kSalTileI; t < kSalStepT; t += rstep) {
      const int64_t gt = t0 + t;
      sb[t * kSalLd + i] = (gi < p.IN && gt < p.T) ? p.x[s * p.x_ss + gt * p.x_st + gi] : zero;
    }
    return;
  }
  const int64_t khw = p.KH * p.KW, c = gi / khw, r = (gi / p.KW) % p.KH, q = gi % p.KW;
  const TG* xs = p.x + (s * p.C + c) * p.H * p.W;   // this column's input channel of sample s
  const int64_t rh = r * p.dh - p.ph, qw = q * p.dw - p.pw;
  int64_t t = tid / kSalTileI, gt = t0 + t, oh = gt / p.OW, ow = gt % p.OW;
  for (; t < kSalStepT; t += rstep) {
    TG v = zero;
    if (gi < p.IN && gt < p.T) {
      const int64_t ih = oh * p.sh + rh, iw = ow * p.sw + qw;
      if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) v = xs[ih * p.W + iw];
    }
    sb[t * kSalLd + i] = v;
    gt += rstep;
    for (ow += rstep; ow >= p.OW; ow -= p.OW) ++oh;   // (oh, ow) of gt without a division
  }
}

template <typename Frag>
struct SalWarpState {
  Frag g[2][2];     // this sample's gradient, the warp's 32×32 sub-tile
  Frag tot[2][2];   // Σ over the group's samples of |g| or g²
};

// The whole block's work (tile `tile`, sample group `group`); sa / sb kSalStageElems 16-bit entries each,
// so kSalOutFloats floats.
template <typename Mma, typename Block, typename TG>
SPARE_HD inline void sample_tile_block(Block& b, const SampleTileParams<TG>& p, int64_t tile, int64_t group, TG* sa,
                                       TG* sb, float* so) {
  const int64_t n_i = cdiv(p.IN, kSalTileI);
  const int64_t o0 = tile / n_i * kSalTileO, i0 = tile % n_i * kSalTileI;
  const int64_t s0 = group * p.spg, s1 = s0 + p.spg < p.S ? s0 + p.spg : p.S;
  b.warps([&](int64_t, auto& st, Lanes) {
    SPARE_UNROLL for (int fo = 0; fo < 2; ++fo) SPARE_UNROLL for (int fi = 0; fi < 2; ++fi) Mma::zero(st.tot[fo][fi]);
  });
  for (int64_t s = s0; s < s1; ++s) {
    b.warps([&](int64_t, auto& st, Lanes) {
      SPARE_UNROLL for (int fo = 0; fo < 2; ++fo) SPARE_UNROLL for (int fi = 0; fi < 2; ++fi) Mma::zero(st.g[fo][fi]);
    });
    for (int64_t t0 = 0; t0 < p.T; t0 += kSalStepT) {
      b.threads([&](int64_t tid) { sal_stage(p, s, t0, o0, i0, tid, sa, sb); });
      b.warps([&](int64_t w, auto& st, Lanes) {
        const int64_t wo = (w / 2) * kSalWarpO, wi = (w % 2) * kSalWarpI;
        SPARE_UNROLL for (int kk = 0; kk < kSalStepT; kk += kSalFrag) {
          if (t0 + kk >= p.T) break;   // an all-padding k-step (uniform over the block): T = 77 costs 80, not 96
          typename Mma::AFrag a[2];
          typename Mma::BFrag bf[2];
          SPARE_UNROLL for (int f = 0; f < 2; ++f) {
            Mma::load_a(a[f], sa + wo + f * kSalFrag + kk * kSalLd, kSalLd);
            Mma::load_b(bf[f], sb + kk * kSalLd + wi + f * kSalFrag, kSalLd);
          }
          SPARE_UNROLL for (int fo = 0; fo < 2; ++fo) SPARE_UNROLL for (int fi = 0; fi < 2; ++fi)
            Mma::mma(st.g[fo][fi], a[fo], bf[fi]);
        }
      });
      b.sync();   // every warp done with this chunk before the next staging overwrites it
    }
    b.warps([&](int64_t, auto& st, Lanes) {
      SPARE_UNROLL for (int fo = 0; fo < 2; ++fo) SPARE_UNROLL for (int fi = 0; fi < 2; ++fi)
        Mma::fold(st.tot[fo][fi], st.g[fo][fi], p.square != 0);
    });
  }
  // Out, fragment by fragment through the warp's own 16×16 slot of so.
  b.warps([&](int64_t w, auto& st, Lanes l) {
    float* slot = so + w * kSalFrag * kSalFrag;
    float* base = p.groups == 1 ? p.out : p.out + group * p.OUT * p.IN;
    SPARE_UNROLL for (int fo = 0; fo < 2; ++fo) SPARE_UNROLL for (int fi = 0; fi < 2; ++fi) {
      Mma::store(slot, kSalFrag, st.tot[fo][fi]);
      warp_sync();
      const int64_t r0 = o0 + (w / 2) * kSalWarpO + fo * kSalFrag, c0 = i0 + (w % 2) * kSalWarpI + fi * kSalFrag;
      for (int64_t e = l.first; e < kSalFrag * kSalFrag; e += l.step) {
        const int64_t o = r0 + e / kSalFrag, i = c0 + e % kSalFrag;
        if (o < p.OUT && i < p.IN) {
          if (p.groups == 1)
            base[o * p.IN + i] += slot[e];
          else
            base[o * p.IN + i] = slot[e];
        }
      }
      warp_sync();   // the slot is rewritten by the next fragment
    }
  });
}

// acc[e] += Σ_g part[g][e], groups in order (the split's fixed reduction order); grid-strided.
SPARE_HD inline void sample_reduce_body(const Thread& t, const SampleReduceParams& p) {
  const int64_t stride = t.grid.x * t.block_dim.x;
  for (int64_t e = t.block.x * t.block_dim.x + t.thread.x; e < p.numel; e += stride) {
    float s = 0.f;
    for (int64_t g = 0; g < p.groups; ++g) s += p.part[g * p.numel + e];
    p.acc[e] += s;
  }
}

// The host's MMA: a 16×16 fp32 accumulator held whole; operands read from the staged tiles as WMMA would
// (A column-major: (m, k) at a[m + k·ld]; B row-major: (k, n) at b[k·ld + n]).
template <typename TG>
struct ScalarMma {
  struct Frag {
    static constexpr int num_elements = kSalFrag * kSalFrag;
    float x[num_elements];
  };
  struct AFrag {
    const TG* p;
    int64_t ld;
  };
  using BFrag = AFrag;
  static void zero(Frag& f) {
    for (float& v : f.x) v = 0.f;
  }
  static void load_a(AFrag& a, const TG* p, int64_t ld) { a = AFrag{p, ld}; }
  static void load_b(BFrag& b, const TG* p, int64_t ld) { b = BFrag{p, ld}; }
  static void mma(Frag& c, const AFrag& a, const BFrag& b) {
    for (int m = 0; m < kSalFrag; ++m)
      for (int n = 0; n < kSalFrag; ++n) {
        float s = c.x[m * kSalFrag + n];
        for (int k = 0; k < kSalFrag; ++k)
          s += static_cast<float>(a.p[m + k * a.ld]) * static_cast<float>(b.p[k * b.ld + n]);
        c.x[m * kSalFrag + n] = s;
      }
  }
  static void fold(Frag& tot, const Frag& g, bool square) {
    for (int e = 0; e < Frag::num_elements; ++e)
      tot.x[e] += square ? g.x[e] * g.x[e] : (g.x[e] < 0.f ? -g.x[e] : g.x[e]);
  }
  static void store(float* dst, int64_t ld, const Frag& f) {
    for (int m = 0; m < kSalFrag; ++m)
      for (int n = 0; n < kSalFrag; ++n) dst[m * ld + n] = f.x[m * kSalFrag + n];
  }
};

// The host's block: threads in order, then the barrier is implicit; one call per warp with its state.
template <typename Frag>
struct HostBlock {
  SalWarpState<Frag> st[kSalWarps];
  template <typename F>
  void threads(F&& f) {
    for (int64_t tid = 0; tid < kSalThreads; ++tid) f(tid);
  }
  template <typename F>
  void warps(F&& f) {
    for (int64_t w = 0; w < kSalWarps; ++w) f(w, st[w], Lanes{0, 1});
  }
  void sync() {}
};

}  // namespace spare
