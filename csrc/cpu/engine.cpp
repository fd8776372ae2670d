// Tiled masked-weight engine (element and block masks): see spare_cpu.h.
#include "spare_cpu.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SPARE_AVX512 1
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace spare {

namespace {
// Tuning knobs (docs/backends.md, "CPU tuning variables"), read once per process from the environment; defaults
// chosen on the dev machine. SPARE_KERNELS_QF / _BF are the forward tile width (columns) / size (floats),
// _QFL / _BFL the same from 512 tokens on, SPARE_KERNELS_QB / _BB the backward ones,
// SPARE_KERNELS_TOKEN_SPLIT the token count from which threads split tokens (0: never). An unset or empty
// variable takes the default; a value that is not an integer in [lo, hi] and a multiple of `mult` is an
// error naming the variable (never a silent tile width of 0).
// Knob ranges. Tile widths are multiples of 16: a forward tile starts its mask bits at column i0 (a
// multiple of the width), read a byte and an AVX-512 lane mask (16 columns) at a time; the backward
// rounds its width to 16 anyway. Tile sizes (floats) from one 16 x 16 tile to 256 MiB of scratch per
// thread (the backward allocates its size whole).
constexpr int64_t kMaxTileWidth = int64_t(1) << 20, kMinTileSize = 256, kMaxTileSize = int64_t(1) << 26;
constexpr const char* kWidthRange = "a multiple of 16 in [16, 1048576] (columns)";
constexpr const char* kSizeRange = "an integer in [256, 67108864] (floats)";
int64_t knob(const char* name, int64_t dflt, int64_t lo, int64_t hi, int64_t mult, const char* expected) {
  const std::string old = std::string("SPARE_") + (name + std::strlen("SPARE_KERNELS_"));
  if (std::getenv(old.c_str()) != nullptr)
    TORCH_WARN("spare_kernels_cpu: ", old, " is no longer read: it was renamed ", name);
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  while (end != nullptr && (*end == ' ' || *end == '\t' || *end == '\n')) ++end;
  const bool ok = end != v && *end == '\0' && errno == 0 && x >= lo && x <= hi && x % mult == 0;
  TORCH_CHECK(ok, "spare_kernels_cpu: environment variable ", name, "='", v, "' is invalid: expected ", expected,
              " (default ", dflt, "; unset it for the default)");
  return x;
}

// Column-major BLAS description of a Mat: trans flag and leading dimension.
inline void blas_desc(const Mat& A, char& tr, int64_t& ld) {
  if (A.rs == 1 && (A.c <= 1 || A.cs >= A.r)) {
    tr = 'N';
    ld = std::max<int64_t>({A.cs, A.r, 1});
  } else if (A.cs == 1 && (A.r <= 1 || A.rs >= A.c)) {
    tr = 'T';
    ld = std::max<int64_t>({A.rs, A.c, 1});
  } else {
    TORCH_CHECK(false, "spare_kernels_cpu: internal error, matrix layout not BLAS-compatible (",
                A.r, "x", A.c, " strides ", A.rs, ",", A.cs, ")");
  }
}

constexpr int64_t kTileBudget = 32 * 1024;  // floats per weight tile (128 KiB)
}  // namespace

void gemm(float alpha, const Mat& A0, const Mat& B0, float beta, const Mat& C0) {
  Mat A = A0, B = B0, C = C0;
  if (C.r == 0 || C.c == 0) return;
  TORCH_CHECK(A.r == C.r && B.c == C.c && A.c == B.r, "spare_kernels_cpu: internal gemm shape error");
  if (A.c == 0) {
    for (int64_t i = 0; i < C.r; ++i)
      for (int64_t j = 0; j < C.c; ++j) {
        float& v = C.p[i * C.rs + j * C.cs];
        v = beta == 0.f ? 0.f : v * beta;
      }
    return;
  }
  // Make C column-major (rs == 1); else compute C^T = B^T A^T.
  if (!(C.rs == 1 && (C.c <= 1 || C.cs >= C.r))) {
    Mat At = B.t(), Bt = A.t();
    A = At;
    B = Bt;
    C = C.t();
  }
  char ta, tb, tc;
  int64_t lda, ldb, ldc;
  blas_desc(A, ta, lda);
  blas_desc(B, tb, ldb);
  blas_desc(C, tc, ldc);
  TORCH_CHECK(tc == 'N', "spare_kernels_cpu: internal error, output layout");
  int m = (int)C.r, n = (int)C.c, k = (int)A.c;
  int ilda = (int)lda, ildb = (int)ldb, ildc = (int)ldc;
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, A.p, &ilda, B.p, &ildb, &beta, C.p, &ildc);
}

namespace {

// Bits [j, j+n) (n <= 16, j % 8 == 0) of a packed mask row of `cols` columns.
inline uint32_t bits16(const uint8_t* row, int64_t j, int64_t n) {
  const uint8_t* p = row + (j >> 3);
  uint32_t m = p[0];
  if (n > 8) m |= (uint32_t)p[1] << 8;
  return n >= 16 ? m : (m & ((1u << n) - 1u));
}

template <typename WT>
inline void load_w16(const WT* w, int64_t n, float* dst);

#ifdef SPARE_AVX512
inline __m512 loadw(const float* w, __mmask16 k) { return _mm512_maskz_loadu_ps(k, w); }
inline __m512 loadw(const c10::BFloat16* w, __mmask16 k) {
  __m256i h = _mm256_maskz_loadu_epi16(k, (const void*)w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

inline float tof(float v) { return v; }
inline float tof(c10::BFloat16 v) { return static_cast<float>(v); }

// wp (pr x qc, row stride qc) = W[o0.., i0..] + M . (sB * A) ; sB = scale * B rows.
template <typename WT>
void build_tile(const EngineArgs& e, int64_t o0, int64_t pr, int64_t i0, int64_t qc, float* wp) {
  const WT* W = static_cast<const WT*>(e.W);
  const int64_t r = e.r;
  float sb[256];
  float* sbv = sb;
  std::vector<float> sbig;
  if (r > 256) {
    sbig.resize(r);
    sbv = sbig.data();
  }
  for (int64_t o = 0; o < pr; ++o) {
    const int64_t og = o0 + o;
    const WT* wrow = W + og * e.ldw + i0;
    const uint8_t* mrow = e.mask.row(og);
    float* dst = wp + o * qc;
    for (int64_t k = 0; k < r; ++k) sbv[k] = e.scale * e.B[og * r + k];
#ifdef SPARE_AVX512
    for (int64_t j = 0; j < qc; j += 16) {
      const int64_t n = std::min<int64_t>(16, qc - j);
      const __mmask16 tail = (__mmask16)(n >= 16 ? 0xFFFFu : ((1u << n) - 1u));
      const __mmask16 m = (__mmask16)bits16(mrow, i0 + j, n);
      __m512 w = loadw(wrow + j, tail);
      if (m) {
        const float* a = e.A + i0 + j;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < r; ++k)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(sbv[k]), _mm512_maskz_loadu_ps(tail, a + k * e.lda), acc);
        w = _mm512_mask_add_ps(w, m, w, acc);
      }
      _mm512_mask_storeu_ps(dst + j, tail, w);
    }
#else
    for (int64_t j = 0; j < qc; ++j) {
      const int64_t c = i0 + j;  // sbv is s * B[o]: the shared entry arithmetic with scale 1
      dst[j] = effective_weight(tof(wrow[j]), mask_bit(mrow, c), 1.f, sbv, e.A + c, e.lda, r);
    }
#endif
  }
}

void build_tile_any(const EngineArgs& e, int64_t o0, int64_t pr, int64_t i0, int64_t qc, float* wp) {
  if (e.w_bf16)
    build_tile<c10::BFloat16>(e, o0, pr, i0, qc, wp);
  else
    build_tile<float>(e, o0, pr, i0, qc, wp);
}

// gp (pr x qc) *= M ; returns whether any bit was set.
void mask_tile(const EngineArgs& e, int64_t o0, int64_t pr, int64_t i0, int64_t qc, float* gp) {
  for (int64_t o = 0; o < pr; ++o) {
    const uint8_t* mrow = e.mask.row(o0 + o);
    float* g = gp + o * qc;
#ifdef SPARE_AVX512
    for (int64_t j = 0; j < qc; j += 16) {
      const int64_t n = std::min<int64_t>(16, qc - j);
      const __mmask16 tail = (__mmask16)(n >= 16 ? 0xFFFFu : ((1u << n) - 1u));
      const __mmask16 m = (__mmask16)bits16(mrow, i0 + j, n);
      _mm512_mask_storeu_ps(g + j, tail, _mm512_maskz_loadu_ps(m, g + j));
    }
#else
    for (int64_t j = 0; j < qc; ++j) {
      const int64_t c = i0 + j;
      if (!mask_bit(mrow, c)) g[j] = 0.f;
    }
#endif
  }
}

#ifdef SPARE_AVX512
// Small rank, fused: for the tile's rows, g = M . G row;  dA[:, i0..] += s * B[o]^T g ; dB[o] += s * g A^T.
// RR (the rank) is a template parameter so the accumulators stay in registers.
template <int RR>
void mask_contract_small_r(const EngineArgs& e, int64_t o0, int64_t pr, int64_t i0, int64_t qc, const float* gp,
                           float* dA, int64_t ldda, float* dbt) {
  const float* const A = e.A;
  const float* const Bm = e.B;
  const int64_t lda = e.lda;
  const float s = e.scale;
  const MaskBits mb = e.mask;
  for (int64_t o = 0; o < pr; ++o) {
    const uint8_t* mrow = mb.row(o0 + o);
    const float* g = gp + o * qc;
    __m512 acc[RR], sb[RR];
    for (int k = 0; k < RR; ++k) {
      acc[k] = _mm512_setzero_ps();
      sb[k] = _mm512_set1_ps(s * Bm[(o0 + o) * RR + k]);
    }
    for (int64_t j = 0; j < qc; j += 16) {
      const int64_t n = std::min<int64_t>(16, qc - j);
      const __mmask16 m = (__mmask16)bits16(mrow, i0 + j, n);
      if (!m) continue;
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + j);
      for (int k = 0; k < RR; ++k) {
        const __m512 a = _mm512_maskz_loadu_ps(m, A + k * lda + i0 + j);
        acc[k] = _mm512_fmadd_ps(gv, a, acc[k]);
        float* d = dA + k * ldda + i0 + j;
        _mm512_mask_storeu_ps(d, m, _mm512_fmadd_ps(sb[k], gv, _mm512_maskz_loadu_ps(m, d)));
      }
    }
    for (int k = 0; k < RR; ++k) dbt[(o0 + o) * RR + k] += s * _mm512_reduce_add_ps(acc[k]);
  }
}

// Ranks 1, 2, 4, 8 (false: the caller takes the generic mask + gemm route).
bool mask_contract_small(const EngineArgs& e, int64_t o0, int64_t pr, int64_t i0, int64_t qc, const float* gp,
                         float* dA, int64_t ldda, float* dbt) {
  switch (e.r) {
    case 1: mask_contract_small_r<1>(e, o0, pr, i0, qc, gp, dA, ldda, dbt); return true;
    case 2: mask_contract_small_r<2>(e, o0, pr, i0, qc, gp, dA, ldda, dbt); return true;
    case 4: mask_contract_small_r<4>(e, o0, pr, i0, qc, gp, dA, ldda, dbt); return true;
    case 8: mask_contract_small_r<8>(e, o0, pr, i0, qc, gp, dA, ldda, dbt); return true;
    default: return false;
  }
}
#endif

bool tile_any(const EngineArgs& e, int64_t o0, int64_t pr, int64_t i0, int64_t qc) {
  const int64_t b0 = i0 >> 3, b1 = (i0 + qc + 7) >> 3;  // i0 % 8 == 0
  const int64_t last = (i0 + qc) & 7;
  const uint8_t* prev = nullptr;
  for (int64_t o = 0; o < pr; ++o) {
    const uint8_t* mrow = e.mask.row(o0 + o);
    if (mrow == prev) continue;
    prev = mrow;
    for (int64_t b = b0; b < b1; ++b) {
      uint8_t v = mrow[b];
      if (b == b1 - 1 && last) v &= (uint8_t)((1u << last) - 1u);
      if (v) return true;
    }
  }
  return false;
}

struct Scratch {
  std::vector<float> buf;
  float* get(int64_t n) {
    if ((int64_t)buf.size() < n + 16) buf.resize(n + 16);
    return buf.data();
  }
};

}  // namespace

namespace {
// Y[:, c] += bias[c] on a (rows x cols) strided view (while the panel is still in cache).
void add_bias(const Mat& Y, const float* bias) {
  if (Y.cs == 1) {
    for (int64_t i = 0; i < Y.r; ++i) {
      float* y = Y.p + i * Y.rs;
#pragma omp simd
      for (int64_t j = 0; j < Y.c; ++j) y[j] += bias[j];
    }
  } else {
    for (int64_t j = 0; j < Y.c; ++j) {
      float* y = Y.p + j * Y.cs;
      const float b = bias[j];
#pragma omp simd
      for (int64_t i = 0; i < Y.r; ++i) y[i * Y.rs] += b;
    }
  }
}
}  // namespace

namespace {
// Token split (many tokens, several threads): each thread takes a share of the rows of every
// X_b / Y_b and runs all tiles itself (the weight-side tile work is duplicated, which is cheap
// when T is large), so every GEMM keeps the full tile width; no output is shared.
bool token_split(int64_t T, int64_t nth) {
  static const int64_t kMinT = knob("SPARE_KERNELS_TOKEN_SPLIT", 1024, 0, INT64_MAX, 1,
                                    "a non-negative integer (tokens; 0: never split)");
  return nth > 1 && kMinT > 0 && T >= kMinT;
}
std::vector<Mat> rows_share(const std::vector<Mat>& M, int64_t t, int64_t nth) {
  std::vector<Mat> v;
  for (const auto& m : M) {
    const int64_t r0 = m.r * t / nth, r1 = m.r * (t + 1) / nth;
    v.push_back(m.sub(r0, r1 - r0, 0, m.c));
  }
  return v;
}
}  // namespace


#ifdef SPARE_AVX512
namespace {
// Few tokens (T <= 4, e.g. the time-embedding projections at batch 1-2): the tiled GEMMs
// degenerate into GEMVs whose per-tile overhead dominates. Instead stream each weight row once:
// build the effective row in registers and dot it with the T token rows (forward), or axpy it
// into dX and contract M.G into dA / dB on the fly (backward). One pass over W and the mask.
// T and r are template parameters so every accumulator lives in a register.
inline __mmask16 tail16(int64_t n) { return (__mmask16)(n >= 16 ? 0xFFFFu : ((1u << n) - 1u)); }

template <typename WT, int TT, int RR>
void small_forward(const EngineArgs& e, const Mat& X, const Mat& Y, const float* bias) {
  const int64_t out = e.out, cols = e.cols, lda = e.lda, ldw = e.ldw, xrs = X.rs, yrs = Y.rs, ycs = Y.cs;
  const WT* const W = static_cast<const WT*>(e.W);
  const float* const A = e.A;
  const float* const Bm = e.B;
  const float* const Xp = X.p;
  float* const Yp = Y.p;
  const float s = e.scale;
  const MaskBits mb = e.mask;
  at::parallel_for(0, out, grain_for(2 * cols * (RR + TT)), [=](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      __m512 sb[RR];
      for (int k = 0; k < RR; ++k) sb[k] = _mm512_set1_ps(s * Bm[o * RR + k]);
      const WT* wrow = W + o * ldw;
      const uint8_t* mrow = mb.row(o);
      __m512 acc[TT];
      for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t j = 0; j < cols; j += 16) {
        const int64_t n = std::min<int64_t>(16, cols - j);
        const __mmask16 tail = tail16(n);
        const __mmask16 m = (__mmask16)bits16(mrow, j, n);
        __m512 w = loadw(wrow + j, tail);
        __m512 d = _mm512_setzero_ps();
        for (int k = 0; k < RR; ++k) d = _mm512_fmadd_ps(sb[k], _mm512_maskz_loadu_ps(m, A + k * lda + j), d);
        w = _mm512_add_ps(w, d);
        for (int t = 0; t < TT; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(tail, Xp + t * xrs + j), acc[t]);
      }
      const float b = bias ? bias[o] : 0.f;
      for (int t = 0; t < TT; ++t) Yp[t * yrs + o * ycs] = _mm512_reduce_add_ps(acc[t]) + b;
    }
  });
}

template <typename WT, int TT, int RR>
void small_backward(const EngineArgs& e, const Mat& dY, const Mat& X, const Mat* dX, float* dA, int64_t ldda,
                    float* dB) {
  const int64_t out = e.out, cols = e.cols, lda = e.lda, ldw = e.ldw, xrs = X.rs, dyrs = dY.rs, dycs = dY.cs;
  const WT* const W = static_cast<const WT*>(e.W);
  const float* const A = e.A;
  const float* const Bm = e.B;
  const float* const Xp = X.p;
  const float* const dYp = dY.p;
  const float s = e.scale;
  const MaskBits mb = e.mask;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  // Per-thread partial dX (T x cols) and dA (r x cols); dB rows are owned by one thread each.
  std::vector<float> dxp(dX ? (size_t)nth * TT * cols : 0, 0.f), dap(dA ? (size_t)nth * RR * cols : 0, 0.f);
  std::vector<char> used(nth, 0);
  float* const dxbase = dX ? dxp.data() : nullptr;
  float* const dabase = dA ? dap.data() : nullptr;
  char* const usedp = used.data();
  at::parallel_for(0, out, grain_for(2 * cols * (3 * RR + 2 * TT)), [=](int64_t o0, int64_t o1) {
    const int64_t tid = at::get_thread_num();
    usedp[tid] = 1;
    float* const dxt = dxbase ? dxbase + tid * TT * cols : nullptr;
    float* const dat = dabase ? dabase + tid * RR * cols : nullptr;
    for (int64_t o = o0; o < o1; ++o) {
      __m512 sb[RR], ab[RR], dyo[TT];
      for (int k = 0; k < RR; ++k) {
        sb[k] = _mm512_set1_ps(s * Bm[o * RR + k]);
        ab[k] = _mm512_setzero_ps();
      }
      for (int t = 0; t < TT; ++t) dyo[t] = _mm512_set1_ps(dYp[t * dyrs + o * dycs]);
      const WT* wrow = W + o * ldw;
      const uint8_t* mrow = mb.row(o);
      for (int64_t j = 0; j < cols; j += 16) {
        const int64_t n = std::min<int64_t>(16, cols - j);
        const __mmask16 tail = tail16(n);
        const __mmask16 m = (__mmask16)bits16(mrow, j, n);
        if (dxt) {
          __m512 d = loadw(wrow + j, tail);
          for (int k = 0; k < RR; ++k) d = _mm512_fmadd_ps(sb[k], _mm512_maskz_loadu_ps(m, A + k * lda + j), d);
          for (int t = 0; t < TT; ++t) {
            float* p = dxt + t * cols + j;
            _mm512_mask_storeu_ps(p, tail, _mm512_fmadd_ps(dyo[t], d, _mm512_maskz_loadu_ps(tail, p)));
          }
        }
        if (dat && m) {
          __m512 g = _mm512_setzero_ps();  // (M.G)[o, j..] with G = dY^T X
          for (int t = 0; t < TT; ++t) g = _mm512_fmadd_ps(dyo[t], _mm512_maskz_loadu_ps(m, Xp + t * xrs + j), g);
          for (int k = 0; k < RR; ++k) {
            ab[k] = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, A + k * lda + j), ab[k]);
            float* p = dat + k * cols + j;
            _mm512_mask_storeu_ps(p, m, _mm512_fmadd_ps(sb[k], g, _mm512_maskz_loadu_ps(m, p)));
          }
        }
      }
      if (dat)
        for (int k = 0; k < RR; ++k) dB[o * RR + k] += s * _mm512_reduce_add_ps(ab[k]);
    }
  });
  if (dX) {
    for (int64_t t = 0; t < TT; ++t) {
      float* dst = dX->p + t * dX->rs;
      for (int64_t j = 0; j < cols; ++j) dst[j * dX->cs] = 0.f;
      for (int64_t h = 0; h < nth; ++h) {
        if (!used[h]) continue;
        const float* src = dxp.data() + (h * TT + t) * cols;
        for (int64_t j = 0; j < cols; ++j) dst[j * dX->cs] += src[j];
      }
    }
  }
  if (dA)
    for (int64_t h = 0; h < nth; ++h) {
      if (!used[h]) continue;
      for (int64_t k = 0; k < RR; ++k) {
        const float* src = dap.data() + (h * RR + k) * cols;
        float* dst = dA + k * ldda;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) dst[j] += src[j];
      }
    }
}

bool small_ok(const EngineArgs& e, const std::vector<Mat>& A, const std::vector<Mat>& B) {
  const int64_t r = e.r;
  return A.size() == 1 && B.size() == 1 && A[0].r >= 1 && A[0].r <= kSmallT && A[0].cs == 1 && B[0].cs == 1 &&
         (r == 1 || r == 2 || r == 4 || r == 8 || r == 16);
}

static_assert(kSmallT == 4, "SPARE_SMALL_DISPATCH instantiates T = 1..4");
// fn<WT, T, R>(args...) for the runtime (bf16?, T, r) of a small_ok call.
#define SPARE_SMALL_DISPATCH(fn, e, T, ...)                                                         \
  do {                                                                                              \
    auto go = [&](auto wt, auto tt) {                                                               \
      using WT_ = decltype(wt);                                                                     \
      constexpr int TT_ = decltype(tt)::value;                                                      \
      switch ((e).r) {                                                                              \
        case 1: fn<WT_, TT_, 1>(__VA_ARGS__); break;                                                \
        case 2: fn<WT_, TT_, 2>(__VA_ARGS__); break;                                                \
        case 4: fn<WT_, TT_, 4>(__VA_ARGS__); break;                                                \
        case 8: fn<WT_, TT_, 8>(__VA_ARGS__); break;                                                \
        default: fn<WT_, TT_, 16>(__VA_ARGS__); break;                                              \
      }                                                                                             \
    };                                                                                              \
    auto by_t = [&](auto wt) {                                                                      \
      switch (T) {                                                                                  \
        case 1: go(wt, std::integral_constant<int, 1>{}); break;                                    \
        case 2: go(wt, std::integral_constant<int, 2>{}); break;                                    \
        case 3: go(wt, std::integral_constant<int, 3>{}); break;                                    \
        default: go(wt, std::integral_constant<int, 4>{}); break;                                   \
      }                                                                                             \
    };                                                                                              \
    if ((e).w_bf16) by_t(c10::BFloat16{}); else by_t(float{});                                      \
  } while (0)
}  // namespace
#endif

void engine_forward(const EngineArgs& e, const std::vector<Mat>& X, const std::vector<Mat>& Y, const float* bias) {
  const int64_t out = e.out, cols = e.cols;
  if (out == 0) return;
  if (cols == 0) {  // no input features: y = bias
    for (auto& y : Y) {
      gemm(1.f, Mat{nullptr, y.r, 0, 1, 1}, Mat{nullptr, 0, y.c, 1, 1}, 0.f, y);
      if (bias) add_bias(y, bias);
    }
    return;
  }
#ifdef SPARE_AVX512
  if (small_ok(e, X, Y)) {
    SPARE_SMALL_DISPATCH(small_forward, e, X[0].r, e, X[0], Y[0], bias);
    return;
  }
#endif
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  int64_t T = 0;
  for (auto& x : X) T += x.r;
  const bool tsplit = token_split(T, nth);
  // Many tokens: the GEMMs dominate, bigger tiles (fewer K splits of the output) win.
  static const int64_t kQf = knob("SPARE_KERNELS_QF", 512, 16, kMaxTileWidth, 16, kWidthRange);
  static const int64_t kBf = knob("SPARE_KERNELS_BF", kTileBudget, kMinTileSize, kMaxTileSize, 1, kSizeRange);
  static const int64_t kQfL = knob("SPARE_KERNELS_QFL", 1024, 16, kMaxTileWidth, 16, kWidthRange);
  static const int64_t kBfL = knob("SPARE_KERNELS_BFL", 8 * kTileBudget, kMinTileSize, kMaxTileSize, 1, kSizeRange);
  const bool large = T >= 512;
  const int64_t Q = std::min<int64_t>(round_up(cols, 16), large ? kQfL : kQf);
  // Row panels: a multiple of the thread count (balanced), each of at most kBf / Q rows.
  const int64_t P0 = std::max<int64_t>(8, (large ? kBfL : kBf) / Q);
  // (One thread: no balancing needed, so no extra panels that would shrink the GEMMs.)
  const int64_t npan0 = tsplit || nth == 1 ? cdiv(out, P0) : round_up(std::max<int64_t>(cdiv(out, P0), 2 * nth), nth);
  const int64_t P = std::max<int64_t>(1, cdiv(out, npan0));
  const int64_t npan = cdiv(out, P);
  auto body = [&](const std::vector<Mat>& Xs, const std::vector<Mat>& Ys, int64_t b0, int64_t b1) {
    Scratch s;
    float* wp = s.get(P * Q);
    for (int64_t pan = b0; pan < b1; ++pan) {
      const int64_t o0 = pan * P, pr = std::min(P, out - o0);
      for (int64_t i0 = 0; i0 < cols; i0 += Q) {
        const int64_t qc = std::min(Q, cols - i0);
        build_tile_any(e, o0, pr, i0, qc, wp);
        const Mat wt{wp, qc, pr, 1, qc};  // (qc x pr) view of the tile's transpose
        for (size_t b = 0; b < Xs.size(); ++b)
          gemm(1.f, Xs[b].sub(0, Xs[b].r, i0, qc), wt, i0 == 0 ? 0.f : 1.f, Ys[b].sub(0, Ys[b].r, o0, pr));
      }
      if (bias)
        for (size_t b = 0; b < Ys.size(); ++b) add_bias(Ys[b].sub(0, Ys[b].r, o0, pr), bias + o0);
    }
  };
  if (tsplit) {
    at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) body(rows_share(X, t, nth), rows_share(Y, t, nth), 0, npan);
    });
    return;
  }
  at::parallel_for(0, npan, grain_for(P * cols * (2 * T + 2 * e.r)),
                   [&](int64_t b0, int64_t b1) { body(X, Y, b0, b1); });
}

void engine_backward(const EngineArgs& e, const std::vector<Mat>& dY, const std::vector<Mat>& X,
                     const std::vector<Mat>* dX, float* dA, int64_t ldda, float* dB) {
  const int64_t out = e.out, cols = e.cols, r = e.r;
  if (cols == 0 || out == 0) {
    if (dX)
      for (auto& d : *dX) gemm(1.f, Mat{nullptr, d.r, 0, 1, 1}, Mat{nullptr, 0, d.c, 1, 1}, 0.f, d);
    return;
  }
#ifdef SPARE_AVX512
  if (small_ok(e, dY, X) && (!dX || (dX->size() == 1 && (*dX)[0].cs == 1))) {
    const Mat* dx0 = dX ? &(*dX)[0] : nullptr;
    SPARE_SMALL_DISPATCH(small_backward, e, dY[0].r, e, dY[0], X[0], dx0, dA, ldda, dB);
    return;
  }
#endif
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  int64_t T = 0;
  for (auto& x : dY) T += x.r;
  const bool tsplit = token_split(T, nth);
  static const int64_t kQb = knob("SPARE_KERNELS_QB", 256, 16, kMaxTileWidth, 16, kWidthRange);
  static const int64_t kBb = knob("SPARE_KERNELS_BB", kTileBudget, kMinTileSize, kMaxTileSize, 1, kSizeRange);
  // Column panels (16-aligned, so mask bytes are addressed directly): a multiple of the thread count.
  const int64_t npq = tsplit || nth == 1 ? cdiv(cols, kQb)
                             : round_up(std::max<int64_t>(cdiv(cols, kQb), std::min<int64_t>(2 * nth, cdiv(cols, 16))), nth);
  const int64_t Q = std::max<int64_t>(16, round_up(cdiv(cols, npq), 16));
  const int64_t P = std::max<int64_t>(16, (kBb / Q) / 16 * 16);
  const int64_t npan = cdiv(cols, Q);
  // Per-thread dB (and, with the token split, dA) partial sums.
  std::vector<float> dBt, dAt;
  if (dA) dBt.assign((size_t)nth * out * r, 0.f);
  if (dA && tsplit) dAt.assign((size_t)nth * r * cols, 0.f);
  auto body = [&](const std::vector<Mat>& dYs, const std::vector<Mat>& Xs, const std::vector<Mat>* dXs, float* dAp,
                  int64_t ld, float* dbt, int64_t b0, int64_t b1) {
    Scratch s1, s2;
    float* wp = s1.get(P * Q);
    float* gp = s2.get(P * Q);
    for (int64_t pan = b0; pan < b1; ++pan) {
      const int64_t i0 = pan * Q, qc = std::min(Q, cols - i0);
      for (int64_t o0 = 0; o0 < out; o0 += P) {
        const int64_t pr = std::min(P, out - o0);
        if (dXs) {
          build_tile_any(e, o0, pr, i0, qc, wp);
          const Mat w{wp, pr, qc, qc, 1};
          for (size_t b = 0; b < dYs.size(); ++b)
            gemm(1.f, dYs[b].sub(0, dYs[b].r, o0, pr), w, o0 == 0 ? 0.f : 1.f, (*dXs)[b].sub(0, (*dXs)[b].r, i0, qc));
        }
        if (dAp && !dYs.empty() && tile_any(e, o0, pr, i0, qc)) {
          const Mat g{gp, pr, qc, qc, 1};
          for (size_t b = 0; b < dYs.size(); ++b)
            gemm(1.f, dYs[b].sub(0, dYs[b].r, o0, pr).t(), Xs[b].sub(0, Xs[b].r, i0, qc), b == 0 ? 0.f : 1.f, g);
#ifdef SPARE_AVX512
          if (mask_contract_small(e, o0, pr, i0, qc, gp, dAp, ld, dbt)) continue;
#endif
          mask_tile(e, o0, pr, i0, qc, gp);
          // dA[:, i0:i0+qc] += s * B[o0:o0+pr]^T * G
          gemm(e.scale, Mat{const_cast<float*>(e.B) + o0 * r, r, pr, 1, r}, g, 1.f, Mat{dAp + i0, r, qc, ld, 1});
          // dB[o0:o0+pr] += s * G * A[:, i0:i0+qc]^T
          gemm(e.scale, g, Mat{const_cast<float*>(e.A) + i0, qc, r, 1, e.lda}, 1.f, Mat{dbt + o0 * r, pr, r, r, 1});
        }
      }
    }
  };
  if (tsplit) {
    at::parallel_for(0, nth, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        std::vector<Mat> dXs;
        if (dX) dXs = rows_share(*dX, t, nth);
        body(rows_share(dY, t, nth), rows_share(X, t, nth), dX ? &dXs : nullptr,
             dA ? dAt.data() + t * r * cols : nullptr, cols, dA ? dBt.data() + t * out * r : nullptr, 0, npan);
      }
    });
    if (dA)
      for (int64_t t = 0; t < nth; ++t)
        for (int64_t k = 0; k < r; ++k) {
          const float* src = dAt.data() + (t * r + k) * cols;
          float* dst = dA + k * ldda;
          for (int64_t j = 0; j < cols; ++j) dst[j] += src[j];
        }
  } else {
    at::parallel_for(0, npan, grain_for(Q * out * (4 * T + 4 * r)), [&](int64_t b0, int64_t b1) {
      const int64_t tid = at::get_thread_num();
      body(dY, X, dX, dA, ldda, dA ? dBt.data() + tid * out * r : nullptr, b0, b1);
    });
  }
  if (dA)
    for (int64_t t = 0; t < nth; ++t) {
      const float* src = dBt.data() + t * out * r;
      for (int64_t i = 0; i < out * r; ++i) dB[i] += src[i];
    }
}

void build_weight(const EngineArgs& e, float* dst) {
  const int64_t rows = std::max<int64_t>(1, kTileBudget / std::max<int64_t>(1, e.cols));
  at::parallel_for(0, cdiv(e.out, rows), grain_for(rows * e.cols * 2 * e.r), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * rows, pr = std::min(rows, e.out - o0);
      build_tile_any(e, o0, pr, 0, e.cols, dst + o0 * e.cols);
    }
  });
}

void contract_grad(const EngineArgs& e, float* G, float* dA, int64_t ldda, float* dB) {
  const int64_t out = e.out, cols = e.cols, r = e.r;
#ifdef SPARE_AVX512
  if (mask_contract_small(e, 0, out, 0, cols, G, dA, ldda, dB)) return;
#endif
  mask_tile(e, 0, out, 0, cols, G);
  const Mat g{G, out, cols, cols, 1};
  gemm(e.scale, Mat{const_cast<float*>(e.B), r, out, 1, r}, g, 1.f, Mat{dA, r, cols, ldda, 1});
  gemm(e.scale, g, Mat{const_cast<float*>(e.A), cols, r, 1, e.lda}, 1.f, Mat{dB, out, r, r, 1});
}

at::Tensor block_rows_packed(const at::Tensor& mask, int64_t block_i, int64_t cols) {
  auto m = mask.to(at::kBool).contiguous();
  const int64_t nbo = m.size(0), nbi = m.size(1), nbytes = cdiv(cols, 8);
  auto out = at::zeros({nbo, nbytes}, at::kByte);
  const bool* src = m.data_ptr<bool>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t p = 0; p < nbo; ++p)
    for (int64_t q = 0; q < nbi; ++q) {
      if (!src[p * nbi + q]) continue;
      const int64_t c1 = std::min(cols, (q + 1) * block_i);
      for (int64_t c = q * block_i; c < c1; ++c) dst[p * nbytes + (c >> 3)] |= (uint8_t)(1u << (c & 7));
    }
  return out;
}

void check_mask(const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
                int64_t block_i, int64_t out, int64_t cols) {
  TORCH_CHECK(kind >= 0 && kind <= 3, "spare_kernels_cpu: unknown mask kind ", kind);
  if (kind == kNone) return;
  TORCH_CHECK(mask.has_value() && mask->defined(), "spare_kernels_cpu: mask kind ", kind, " needs a mask tensor");
  const auto& m = *mask;
  TORCH_CHECK(m.device().is_cpu(), "spare_kernels_cpu: mask must be a CPU tensor");
  if (kind == kElement) {
    TORCH_CHECK(m.scalar_type() == at::kByte && m.dim() == 2 && m.size(0) == out &&
                    m.size(1) == cdiv(cols, 8),
                "spare_kernels_cpu: element mask must be uint8 (", out, ", ", cdiv(cols, 8),
                ") bit-packed, got ", m.scalar_type(), " ", m.sizes());
  } else if (kind == kBlock) {
    TORCH_CHECK(block_o > 0 && block_i > 0, "spare_kernels_cpu: block sizes must be positive");
    TORCH_CHECK(m.dim() == 2 && m.size(0) == cdiv(out, block_o) && m.size(1) == cdiv(cols, block_i),
                "spare_kernels_cpu: block mask must be (", cdiv(out, block_o), ", ",
                cdiv(cols, block_i), "), got ", m.sizes());
  } else {
    TORCH_CHECK(m.numel() == out, "spare_kernels_cpu: row mask must have ", out, " entries, got ", m.sizes());
  }
  if (kind == kBlock || kind == kRow)  // their bytes are read raw (any_set, block_rows_packed)
    TORCH_CHECK(m.scalar_type() == at::kBool, "spare_kernels_cpu: ", kind == kBlock ? "block" : "row",
                " mask must be bool, got ", m.scalar_type());
}

MaskBits mask_bits(const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i,
                   int64_t out, int64_t cols, at::Tensor& holder) {
  if (kind == kElement) {
    holder = mask.contiguous();
    return MaskBits{holder.data_ptr<uint8_t>(), cdiv(cols, 8), 1, 0};
  }
  if (kind == kRow) {  // a row mask is a block mask of (1 x cols) tiles
    holder = block_rows_packed(mask.reshape({out, 1}), cols, cols);
    return MaskBits{holder.data_ptr<uint8_t>(), cdiv(cols, 8), 1, 0};
  }
  TORCH_CHECK(kind == kBlock, "spare_kernels_cpu: internal error, mask_bits of kind ", kind);
  holder = block_rows_packed(mask, block_i, cols);
  return MaskBits{holder.data_ptr<uint8_t>(), cdiv(cols, 8), block_o, 0};
}

}  // namespace spare
