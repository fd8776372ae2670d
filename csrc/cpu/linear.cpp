// masked_lora_linear (+ backward): element masks through the tiled engine, block masks and
// row / none in factored (low-rank) form (row / block on small weights: the engine, see masked_engine).
#include "spare_cpu.h"

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#define SPARE_AVX512_LIN 1
#endif

namespace spare {

namespace {

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                  const at::Tensor& B) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && A.device().is_cpu() && B.device().is_cpu(),
              "spare_kernels_cpu: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "spare_kernels_cpu: activations must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(),
              "spare_kernels_cpu: weight dtype ", weight.scalar_type(), " != activation dtype ", x.scalar_type());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kBFloat16,
              "spare_kernels_cpu: lora_A must be float32 or bfloat16");
  TORCH_CHECK(B.scalar_type() == at::kFloat || B.scalar_type() == at::kBFloat16,
              "spare_kernels_cpu: lora_B must be float32 or bfloat16");
  TORCH_CHECK(B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == A.size(0),
              "spare_kernels_cpu: lora_B must be (out, r) = (", weight.size(0), ", ", A.size(0),
              "), got ", B.sizes());
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Block masks, factored: the mask is constant on bo x bi tiles, so with H_q = X_q A_q^T (N x r)
// per column block q and D_p = dY_p B_p (N x r) per row block p:
//   Y_p  += s (sum_{q on} H_q) B_p^T            dX_q += s (sum_{p on} D_p) A_q
//   dA_q  = s (sum_{p on} D_p)^T X_q            dB_p  = s dY_p^T (sum_{q on} H_q)
// Cost ~ N * r * (in + out) plus (on tiles) * N * r: the weight side vanishes and off tiles are
// never touched. All in fp32, straight from the (N, in) / (N, out) rows: no padded copies.
namespace {
// Hout (nb, N, r) [q, n, k] = sum_{j in block q} X[n, j] * V[k, j];  X (N, K) row stride ldx, V (r, K).
void seg_dot(const float* X, int64_t N, int64_t K, int64_t ldx, const float* V, int64_t r, int64_t bs,
             float* Hout) {
  const int64_t nb = cdiv(K, bs);
#ifdef SPARE_AVX512_LIN
  at::parallel_for(0, N, grain_for(2 * K * r), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* x = X + n * ldx;
      for (int64_t q = 0; q < nb; ++q) {
        const int64_t j0 = q * bs, j1 = std::min(K, j0 + bs);
        for (int64_t k0 = 0; k0 < r; k0 += 8) {
          const int64_t kr = std::min<int64_t>(8, r - k0);
          __m512 acc[8];
          for (int64_t k = 0; k < kr; ++k) acc[k] = _mm512_setzero_ps();
          for (int64_t j = j0; j < j1; j += 16) {
            const int64_t w = std::min<int64_t>(16, j1 - j);
            const __mmask16 m = (__mmask16)(w >= 16 ? 0xFFFFu : ((1u << w) - 1u));
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + j);
            for (int64_t k = 0; k < kr; ++k)
              acc[k] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, V + (k0 + k) * K + j), acc[k]);
          }
          float* h = Hout + (q * N + n) * r + k0;
          for (int64_t k = 0; k < kr; ++k) h[k] = _mm512_reduce_add_ps(acc[k]);
        }
      }
    }
  });
  return;
#endif
  at::parallel_for(0, N, grain_for(2 * K * r), [&](int64_t n0, int64_t n1) {
    std::vector<float> prod(K);
    for (int64_t n = n0; n < n1; ++n) {
      const float* x = X + n * ldx;
      for (int64_t k = 0; k < r; ++k) {
        const float* v = V + k * K;
        float* pr = prod.data();
#pragma omp simd
        for (int64_t j = 0; j < K; ++j) pr[j] = x[j] * v[j];
        for (int64_t q = 0; q < nb; ++q) {
          const int64_t j0 = q * bs, j1 = std::min(K, j0 + bs);
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = j0; j < j1; ++j) acc += pr[j];
          Hout[(q * N + n) * r + k] = acc;
        }
      }
    }
  });
}

// Out[n, j] += s * sum_k Hb[q(j), n, k] * V[k, j];  Out (N, K) row stride ldo, Hb (nb, N, r), V (r, K).
void seg_axpy(float* Out, int64_t N, int64_t K, int64_t ldo, const float* Hb, const float* V, int64_t r,
              int64_t bs, float s) {
  const int64_t nb = cdiv(K, bs);
#ifdef SPARE_AVX512_LIN
  at::parallel_for(0, N, grain_for(2 * K * r), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* o = Out + n * ldo;
      for (int64_t q = 0; q < nb; ++q) {
        const int64_t j0 = q * bs, j1 = std::min(K, j0 + bs);
        const float* h = Hb + (q * N + n) * r;
        for (int64_t j = j0; j < j1; j += 16) {
          const int64_t w = std::min<int64_t>(16, j1 - j);
          const __mmask16 m = (__mmask16)(w >= 16 ? 0xFFFFu : ((1u << w) - 1u));
          __m512 ov = _mm512_maskz_loadu_ps(m, o + j);
          for (int64_t k = 0; k < r; ++k)
            ov = _mm512_fmadd_ps(_mm512_set1_ps(s * h[k]), _mm512_maskz_loadu_ps(m, V + k * K + j), ov);
          _mm512_mask_storeu_ps(o + j, m, ov);
        }
      }
    }
  });
  return;
#endif
  at::parallel_for(0, N, grain_for(2 * K * r), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* o = Out + n * ldo;
      for (int64_t q = 0; q < nb; ++q) {
        const int64_t j0 = q * bs, j1 = std::min(K, j0 + bs);
        const float* h = Hb + (q * N + n) * r;
        for (int64_t k = 0; k < r; ++k) {
          const float c = s * h[k];
          if (c == 0.f) continue;
          const float* v = V + k * K;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) o[j] += c * v[j];
        }
      }
    }
  });
}

// Out[k, j] = s * sum_n Hb[q(j), n, k] * X[n, j];  Out (r, K), X (N, K) row stride ldx, Hb (nb, N, r).
void seg_outer(float* Out, const float* Hb, const float* X, int64_t N, int64_t K, int64_t ldx, int64_t r,
               int64_t bs, float s) {
  const int64_t nb = cdiv(K, bs);
#ifdef SPARE_AVX512_LIN
  at::parallel_for(0, nb, grain_for(2 * N * bs * r), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t jb = q * bs, je = std::min(K, jb + bs);
      for (int64_t j0 = jb; j0 < je; j0 += 32) {  // 32 columns x 8 ranks in registers
        const int64_t w0 = std::min<int64_t>(16, je - j0), w1 = std::min<int64_t>(16, std::max<int64_t>(0, je - j0 - 16));
        const __mmask16 m0 = (__mmask16)(w0 >= 16 ? 0xFFFFu : ((1u << w0) - 1u));
        const __mmask16 m1 = (__mmask16)(w1 >= 16 ? 0xFFFFu : ((1u << w1) - 1u));
        for (int64_t k0 = 0; k0 < r; k0 += 8) {
          const int64_t kr = std::min<int64_t>(8, r - k0);
          __m512 a0[8], a1[8];
          for (int64_t k = 0; k < kr; ++k) a0[k] = a1[k] = _mm512_setzero_ps();
          for (int64_t n = 0; n < N; ++n) {
            const float* x = X + n * ldx + j0;
            const __m512 x0 = _mm512_maskz_loadu_ps(m0, x), x1 = _mm512_maskz_loadu_ps(m1, x + 16);
            const float* h = Hb + (q * N + n) * r + k0;
            for (int64_t k = 0; k < kr; ++k) {
              const __m512 c = _mm512_set1_ps(h[k]);
              a0[k] = _mm512_fmadd_ps(c, x0, a0[k]);
              a1[k] = _mm512_fmadd_ps(c, x1, a1[k]);
            }
          }
          const __m512 sv = _mm512_set1_ps(s);
          for (int64_t k = 0; k < kr; ++k) {
            float* o = Out + (k0 + k) * K + j0;
            _mm512_mask_storeu_ps(o, m0, _mm512_mul_ps(sv, a0[k]));
            if (m1) _mm512_mask_storeu_ps(o + 16, m1, _mm512_mul_ps(sv, a1[k]));
          }
        }
      }
    }
  });
  return;
#endif
  at::parallel_for(0, nb, grain_for(2 * N * bs * r), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j0 = q * bs, j1 = std::min(K, j0 + bs);
      for (int64_t k = 0; k < r; ++k) std::fill(Out + k * K + j0, Out + k * K + j1, 0.f);
      for (int64_t n = 0; n < N; ++n) {
        const float* x = X + n * ldx;
        const float* h = Hb + (q * N + n) * r;
        for (int64_t k = 0; k < r; ++k) {
          const float c = s * h[k];
          if (c == 0.f) continue;
          float* o = Out + k * K;
#pragma omp simd
          for (int64_t j = j0; j < j1; ++j) o[j] += c * x[j];
        }
      }
    }
  });
}
}  // namespace

namespace {
// Small-matrix helpers: at this size ATen's per-call overhead (~5-10 us for a strided copy or a
// tiny mm) is larger than the work, and the few-token layers call them several times per step.
at::Tensor transpose2d(const at::Tensor& t) {  // (a, b) fp32 contiguous -> (b, a)
  const int64_t a = t.size(0), b = t.size(1);
  auto o = at::empty({b, a}, t.options());
  const float* src = t.data_ptr<float>();
  float* dst = o.data_ptr<float>();
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j) dst[j * a + i] = src[i * b + j];
  return o;
}

// Out (np, L) = Mask (np, nq) @ H (nq, L) with a bool tile mask (transposed: (nq, np) @ (np, L)).
at::Tensor tile_mix(const at::Tensor& tiles, const at::Tensor& H, bool transposed) {
  const int64_t P = tiles.size(0), Q = tiles.size(1), L = H.size(1);
  const int64_t rows = transposed ? Q : P, inner = transposed ? P : Q;
  if (rows * inner * L > (1 << 20)) {
    auto mf = tiles.to(at::kFloat);
    return at::mm(transposed ? mf.t() : mf, H);
  }
  auto out = at::zeros({rows, L}, H.options());
  const bool* m = tiles.data_ptr<bool>();
  const float* h = H.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t p = 0; p < rows; ++p)
    for (int64_t q = 0; q < inner; ++q) {
      if (!(transposed ? m[q * Q + p] : m[p * Q + q])) continue;
      const float* src = h + q * L;
      float* dst = o + p * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) dst[l] += src[l];
    }
  return out;
}
}  // namespace

struct BlockFact {
  int64_t N, out, cols, r, bo, bi, np, nq;
  at::Tensor tiles;   // (np, nq) bool
  at::Tensor Bt;      // (r, out)
  const at::Tensor& xf;  // (N, cols) fp32 contiguous
  const at::Tensor& Af;  // (r, cols) fp32 contiguous
  BlockFact(const at::Tensor& xf_, const at::Tensor& Af_, const at::Tensor& Bf, const at::Tensor& mask,
            int64_t bo_, int64_t bi_)
      : xf(xf_), Af(Af_) {
    N = xf.size(0);
    cols = xf.size(1);
    out = Bf.size(0);
    r = Af.size(0);
    bo = bo_;
    bi = bi_;
    np = cdiv(out, bo);
    nq = cdiv(cols, bi);
    tiles = mask.to(at::kBool).contiguous().reshape({np, nq});
    Bt = transpose2d(Bf);
  }
  at::Tensor hP() const {  // (np, N, r) = sum_{q on} X_q A_q^T
    auto H = at::empty({nq, N, r}, xf.options());
    seg_dot(xf.data_ptr<float>(), N, cols, cols, Af.data_ptr<float>(), r, bi, H.data_ptr<float>());
    return tile_mix(tiles, H.view({nq, N * r}), false).view({np, N, r});
  }
  void forward_add(at::Tensor& y, double s) const {  // y (N, out) fp32 contiguous
    auto h = hP();
    seg_axpy(y.data_ptr<float>(), N, out, out, h.data_ptr<float>(), Bt.data_ptr<float>(), r, bo, (float)s);
  }
  at::Tensor E(const at::Tensor& dyf) const {  // (nq, N, r) = sum_{p on} dY_p B_p
    auto D = at::empty({np, N, r}, xf.options());
    seg_dot(dyf.data_ptr<float>(), N, out, out, Bt.data_ptr<float>(), r, bo, D.data_ptr<float>());
    return tile_mix(tiles, D.view({np, N * r}), true).view({nq, N, r});
  }
  void dx_add(at::Tensor& dx, const at::Tensor& E_, double s) const {  // dx (N, cols) fp32 contiguous
    seg_axpy(dx.data_ptr<float>(), N, cols, cols, E_.data_ptr<float>(), Af.data_ptr<float>(), r, bi, (float)s);
  }
  at::Tensor dA(const at::Tensor& E_, double s) const {  // (r, cols): dA_q = s E_q^T X_q
    auto d = at::empty({r, cols}, xf.options());
    seg_outer(d.data_ptr<float>(), E_.data_ptr<float>(), xf.data_ptr<float>(), N, cols, cols, r, bi, (float)s);
    return d;
  }
  at::Tensor dB(const at::Tensor& dyf, double s) const {  // (out, r): dB_p = s dY_p^T hP_p
    auto h = hP();
    auto d = at::empty({r, out}, xf.options());
    seg_outer(d.data_ptr<float>(), h.data_ptr<float>(), dyf.data_ptr<float>(), N, out, out, r, bo, (float)s);
    return transpose2d(d);
  }
};

at::Tensor masked_lora_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                              const at::Tensor& lora_B, const std::optional<at::Tensor>& mask,
                              int64_t kind, int64_t block_o, int64_t block_i, double scale) {
  const NoAutocast no_autocast;
  check_common(x, weight, lora_A, lora_B);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_A.dim() == 2 && x.size(1) == weight.size(1) &&
                  lora_A.size(1) == weight.size(1),
              "spare_kernels_cpu: masked_lora_linear expects x (N, in), weight (out, in), lora_A (r, in); got ",
              x.sizes(), ", ", weight.sizes(), ", ", lora_A.sizes());
  const int64_t N = x.size(0), out = weight.size(0), cols = weight.size(1), r = lora_A.size(0);
  check_mask(mask, kind, block_o, block_i, out, cols);
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->numel() == out && bias->scalar_type() == x.scalar_type(),
                "spare_kernels_cpu: bias must be (out,) in the activation dtype");
  const auto dt = x.scalar_type();
  const bool engine = masked_engine(kind, out, cols);
  if (kind == kNone || (kind == kRow && !engine)) {
    auto y = at::linear(x, weight, bias);
    auto h = at::mm(x, lora_A.to(dt).t());  // (N, r)
    auto Bm = lora_B.to(dt);
    if (kind == kRow) Bm = Bm * mask->reshape({out, 1}).to(dt);
    return y.addmm_(h, Bm.t(), 1.0, scale);
  }
  // An all-zero mask is exactly the frozen layer (bit for bit the same GEMM as the base model's).
  if (dt == at::kFloat && !any_set(*mask)) return at::linear(x, weight, bias);
  auto Af = f32c(lora_A), Bf = f32c(lora_B);
  if (!engine) {  // block, factored
    auto xf = f32c(x);
    auto y = at::linear(x, weight, bias);
    if (dt != at::kFloat) y = y.to(at::kFloat);
    y = y.contiguous();
    BlockFact(xf, Af, Bf, *mask, block_o, block_i).forward_add(y, scale);
    return y.to(dt);
  }
  // the engine: element masks, and row / block masks on small weights
  auto xf = f32c(x);
  auto W = weight.contiguous();
  at::Tensor holder;
  EngineArgs e{out, cols, r, (float)scale, W.data_ptr(), dt == at::kBFloat16, cols,
               Af.data_ptr<float>(), cols, Bf.data_ptr<float>(),
               mask_bits(*mask, kind, block_o, block_i, out, cols, holder)};
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) bf = f32c(*bias);
  if (one_tile(N, out, cols)) {  // one tile: W_eff whole, one GEMM
    auto Weff = at::empty({out, cols}, xf.options());
    build_weight(e, Weff.data_ptr<float>());
    return at::linear(xf, Weff, bf.defined() ? std::optional<at::Tensor>(bf) : std::optional<at::Tensor>()).to(dt);
  }
  auto y = at::empty({N, out}, x.options().dtype(at::kFloat));
  if (N > 0) engine_forward(e, {mat_of(xf)}, {mat_of(y)}, bf.defined() ? bf.data_ptr<float>() : nullptr);
  return y.to(dt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lora_linear_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
    int64_t block_i, double scale, bool need_dx, bool need_dA, bool need_dB) {
  const NoAutocast no_autocast;
  check_common(x, weight, lora_A, lora_B);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_A.dim() == 2 && x.size(1) == weight.size(1) &&
                  lora_A.size(1) == weight.size(1),
              "spare_kernels_cpu: masked_lora_linear_backward expects x (N, in), weight (out, in), lora_A (r, in)");
  const int64_t N = x.size(0), out = weight.size(0), cols = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == N && dy.size(1) == out && dy.scalar_type() == x.scalar_type(),
              "spare_kernels_cpu: dy must be (N, out) in the activation dtype, got ", dy.sizes());
  check_mask(mask, kind, block_o, block_i, out, cols);
  const auto dt = x.scalar_type();
  const bool engine = masked_engine(kind, out, cols);
  at::Tensor dx = empty_grad(), dA = empty_grad(), dB = empty_grad();
  if (kind == kNone || (kind == kRow && !engine)) {
    // The scale (and a row mask) goes on the rank-r side: B_s = s * diag(m) B (out x r) and the (out x r)
    // dB, never an (N x out) pass over dy (peft pays that pass, dy * scaling; measured 3-8% of the
    // layer's forward+backward at 64-128 tokens x 5120 -> 1280).
    auto A = lora_A.to(dt), B = lora_B.to(dt);
    at::Tensor rowm;
    if (kind == kRow) rowm = mask->reshape({out, 1}).to(dt);
    auto Bs = kind == kRow ? B * (rowm * scale) : B * scale;
    auto dh = at::mm(dy, Bs);  // (N, r) = s dY diag(m) B
    if (need_dB) {
      auto g = at::mm(dy.t(), at::mm(x, A.t()));  // (out, r) = dY^T X A^T
      if (kind == kRow) g.mul_(rowm * scale);
      else g.mul_(scale);
      dB = g.to(lora_B.scalar_type());
    }
    if (need_dA) dA = at::mm(dh.t(), x).to(lora_A.scalar_type());
    if (need_dx) dx = at::mm(dy, weight).addmm_(dh, A);
    return {dx, dA, dB};
  }
  if (dt == at::kFloat && !any_set(*mask)) {  // all-zero mask: the frozen layer, no adapter grads
    if (need_dx) dx = at::mm(dy, weight);
    if (need_dA) dA = at::zeros_like(lora_A);
    if (need_dB) dB = at::zeros_like(lora_B);
    return {dx, dA, dB};
  }
  auto Af = f32c(lora_A), Bf = f32c(lora_B);
  auto xf = f32c(x), dyf = f32c(dy);
  if (!engine) {  // block, factored
    BlockFact bf(xf, Af, Bf, *mask, block_o, block_i);
    at::Tensor E;
    if (need_dx || need_dA) E = bf.E(dyf);
    if (need_dx) {
      auto d = at::mm(dy, weight);
      if (dt != at::kFloat) d = d.to(at::kFloat);
      d = d.contiguous();
      bf.dx_add(d, E, scale);
      dx = d.to(dt);
    }
    if (need_dA) dA = bf.dA(E, scale).to(lora_A.scalar_type());
    if (need_dB) dB = bf.dB(dyf, scale).to(lora_B.scalar_type());
    return {dx, dA, dB};
  }
  auto W = weight.contiguous();
  at::Tensor holder;
  EngineArgs e{out, cols, r, (float)scale, W.data_ptr(), dt == at::kBFloat16, cols,
               Af.data_ptr<float>(), cols, Bf.data_ptr<float>(),
               mask_bits(*mask, kind, block_o, block_i, out, cols, holder)};
  at::Tensor dxf, dAf, dBf;
  const bool need_ab = need_dA || need_dB;
  if (one_tile(N, out, cols)) {  // one tile: dx = dY W_eff, G = dY^T X contracted
    if (need_dx) {
      auto Weff = at::empty({out, cols}, xf.options());
      build_weight(e, Weff.data_ptr<float>());
      dx = at::mm(dyf, Weff).to(dt);
    }
    if (need_ab) {
      auto G = at::mm(dyf.t(), xf).contiguous();
      dAf = at::zeros({r, cols}, x.options().dtype(at::kFloat));
      dBf = at::zeros({out, r}, x.options().dtype(at::kFloat));
      contract_grad(e, G.data_ptr<float>(), dAf.data_ptr<float>(), cols, dBf.data_ptr<float>());
      if (need_dA) dA = dAf.to(lora_A.scalar_type());
      if (need_dB) dB = dBf.to(lora_B.scalar_type());
    }
    return {dx, dA, dB};
  }
  std::vector<Mat> dXm;
  if (need_dx) {
    dxf = at::empty({N, cols}, x.options().dtype(at::kFloat));
    dXm.push_back(mat_of(dxf));
  }
  if (need_ab) {
    dAf = at::zeros({r, cols}, x.options().dtype(at::kFloat));
    dBf = at::zeros({out, r}, x.options().dtype(at::kFloat));
  }
  if (N > 0 && (need_dx || need_ab))
    engine_backward(e, {mat_of(dyf)}, {mat_of(xf)}, need_dx ? &dXm : nullptr,
                    need_ab ? dAf.data_ptr<float>() : nullptr, cols, need_ab ? dBf.data_ptr<float>() : nullptr);
  else if (need_dx)
    dxf.zero_();
  if (need_dx) dx = dxf.to(dt);
  if (need_dA) dA = dAf.to(lora_A.scalar_type());
  if (need_dB) dB = dBf.to(lora_B.scalar_type());
  return {dx, dA, dB};
}

}  // namespace spare
