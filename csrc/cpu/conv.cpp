// masked_lora_conv2d (+ backward).
//  - none / row: factored, peft's conv LoRA (A a conv in->r, B a 1x1 conv r->out), oneDNN convs.
//  - block: factored per row block (stacked oneDNN convs, or im2col pieces).
//  - row / block on small weights (masked_engine), and element masks on weights of at most
//    kWholeTile entries per group: W_eff built whole, one oneDNN convolution.
//  - element masks on larger weights: the tiled masked engine over bounded im2col chunks (implicit
//    GEMM on cols = (C/groups)*kh*kw); 1x1 stride-1 unpadded convs skip im2col (a linear over pixels).
#include "spare_cpu.h"

#include <algorithm>
#include <cstring>

namespace spare {

namespace {

constexpr int64_t kColsBudget = 2 * 1024 * 1024;  // floats of unfolded input per chunk (8 MiB)

struct ConvGeom {
  int64_t N, C, H, W, out, cg, og, kh, kw, Ho, Wo, L, colsK, groups;
  int64_t sh, sw, ph, pw, dh, dw;
  bool pointwise;
};

ConvGeom geom(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
              at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "spare_kernels_cpu: conv2d needs 2-element stride / padding / dilation");
  TORCH_CHECK(groups >= 1, "spare_kernels_cpu: groups must be >= 1");
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "spare_kernels_cpu: conv2d expects x (N, C, H, W) and a 4-D weight");
  ConvGeom g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.out = weight.size(0); g.kh = weight.size(2); g.kw = weight.size(3);
  g.groups = groups;
  TORCH_CHECK(g.C % groups == 0 && g.out % groups == 0 && weight.size(1) * groups == g.C,
              "spare_kernels_cpu: conv2d channels/groups mismatch: x ", x.sizes(), ", weight ", weight.sizes(),
              ", groups ", groups);
  g.cg = g.C / groups; g.og = g.out / groups;
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1]; g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK(g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
              "spare_kernels_cpu: invalid conv stride / padding / dilation");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "spare_kernels_cpu: conv2d output would be empty");
  g.L = g.Ho * g.Wo;
  g.colsK = g.cg * g.kh * g.kw;
  g.pointwise = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  return g;
}

// cols (cg*kh*kw, lc) <- unfold of x[n, c0:c0+cg] for output pixels [l0, l0+lc).
void im2col(const ConvGeom& g, const float* x, int64_t n, int64_t c0, int64_t l0, int64_t lc, float* cols) {
  const int64_t rows = g.cg * g.kh * g.kw;
  at::parallel_for(0, rows, grain_for(4 * lc), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row / (g.kh * g.kw), i = (row / g.kw) % g.kh, j = row % g.kw;
      const float* src = x + ((n * g.C) + c0 + c) * g.H * g.W;
      float* dst = cols + row * lc;
      int64_t l = l0;
      while (l < l0 + lc) {
        const int64_t oh = l / g.Wo, ow0 = l % g.Wo;
        const int64_t owe = std::min(g.Wo, ow0 + (l0 + lc - l));
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        float* d = dst + (l - l0);
        if (ih < 0 || ih >= g.H) {
          std::fill(d, d + (owe - ow0), 0.f);
        } else {
          const float* s = src + ih * g.W;
          const int64_t off = j * g.dw - g.pw;  // iw = ow * sw + off
          // valid ow: 0 <= ow * sw + off < W
          int64_t lo = off >= 0 ? 0 : cdiv(-off, g.sw);
          int64_t hi = g.W - off <= 0 ? 0 : cdiv(g.W - off, g.sw);
          lo = std::min(std::max(lo, ow0), owe);
          hi = std::min(std::max(hi, lo), owe);
          std::fill(d, d + (lo - ow0), 0.f);
          if (g.sw == 1) {
            std::memcpy(d + (lo - ow0), s + lo + off, sizeof(float) * (hi - lo));
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow - ow0] = s[ow * g.sw + off];
          }
          std::fill(d + (hi - ow0), d + (owe - ow0), 0.f);
        }
        l += owe - ow0;
      }
    }
  });
}

// dx[n, c0:c0+cg] += fold(dcols) for output pixels [l0, l0+lc) (threads own channels: no races).
void col2im(const ConvGeom& g, const float* dcols, int64_t n, int64_t c0, int64_t l0, int64_t lc, float* dx) {
  at::parallel_for(0, g.cg, grain_for(4 * lc * g.kh * g.kw), [&](int64_t ca, int64_t cb) {
    for (int64_t c = ca; c < cb; ++c) {
      float* dst = dx + ((n * g.C) + c0 + c) * g.H * g.W;
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          const float* s = dcols + ((c * g.kh + i) * g.kw + j) * lc;
          int64_t l = l0;
          while (l < l0 + lc) {
            const int64_t oh = l / g.Wo, ow0 = l % g.Wo;
            const int64_t owe = std::min(g.Wo, ow0 + (l0 + lc - l));
            const int64_t ih = oh * g.sh - g.ph + i * g.dh;
            if (ih >= 0 && ih < g.H) {
              float* d = dst + ih * g.W;
              const float* sv = s + (l - l0);
              const int64_t off = j * g.dw - g.pw;
              int64_t lo = off >= 0 ? 0 : cdiv(-off, g.sw);
              int64_t hi = g.W - off <= 0 ? 0 : cdiv(g.W - off, g.sw);
              lo = std::min(std::max(lo, ow0), owe);
              hi = std::min(std::max(hi, lo), owe);
              if (g.sw == 1) {
                float* dd = d + off;
#pragma omp simd
                for (int64_t ow = lo; ow < hi; ++ow) dd[ow] += sv[ow - ow0];
              } else {
                for (int64_t ow = lo; ow < hi; ++ow) d[ow * g.sw + off] += sv[ow - ow0];
              }
            }
            l += owe - ow0;
          }
        }
    }
  });
}

struct Piece { int64_t n, l0, lc; };

// Pieces (sample, pixel range) grouped into chunks of at most kColsBudget unfolded floats.
std::vector<std::vector<Piece>> chunks_of(const ConvGeom& g) {
  std::vector<std::vector<Piece>> chunks;
  const int64_t budget = g.pointwise ? (int64_t)1 << 62 : kColsBudget;
  const int64_t lc = std::max<int64_t>(1, std::min<int64_t>(g.L, budget / std::max<int64_t>(1, g.colsK)));
  int64_t used = budget;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t l0 = 0; l0 < g.L; l0 += lc) {
      const int64_t c = std::min(lc, g.L - l0);
      if (used + c * g.colsK > budget || chunks.empty()) {
        chunks.emplace_back();
        used = 0;
      }
      chunks.back().push_back(Piece{n, l0, c});
      used += c * g.colsK;
    }
  return chunks;
}

void check_adapters(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                    const ConvGeom& g) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && A.device().is_cpu() && B.device().is_cpu(),
              "spare_kernels_cpu: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "spare_kernels_cpu: activations must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "spare_kernels_cpu: weight dtype must match activations");
  TORCH_CHECK((A.scalar_type() == at::kFloat || A.scalar_type() == at::kBFloat16) &&
                  (B.scalar_type() == at::kFloat || B.scalar_type() == at::kBFloat16),
              "spare_kernels_cpu: adapters must be float32 or bfloat16");
  TORCH_CHECK(A.dim() == 4 && A.size(1) == g.cg && A.size(2) == g.kh && A.size(3) == g.kw,
              "spare_kernels_cpu: lora_A must be (r, C/groups, kh, kw), got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == g.out && B.size(1) == A.size(0),
              "spare_kernels_cpu: lora_B must be (out, r), got ", B.sizes());
}

at::Tensor conv_A_factored(const at::Tensor& A, int64_t groups, at::ScalarType dt) {
  auto a = A.to(dt);
  return groups > 1 ? a.repeat({groups, 1, 1, 1}) : a;
}

// torch's bf16 CPU convolution is wrong on some small shapes (torch 2.13: a (1, 6, 5, 3) input, a
// (2, 3, 1, 3) weight, stride (1, 2), groups 2 gives a 100% error, and now and then 1e38 from
// uninitialised memory; tests/test_property.py found it). Every convolution here therefore runs bf16
// operands in fp32 and rounds the result once: the bf16 paths pay two casts of the operands.
inline bool lowp(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }
inline at::Tensor f32(const at::Tensor& t) { return lowp(t) ? t.to(at::kFloat) : t; }

at::Tensor conv_fw(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, at::IntArrayRef s,
                   at::IntArrayRef p, at::IntArrayRef d, int64_t groups) {
  if (!lowp(x) && !lowp(w)) return at::conv2d(x, w, b, s, p, d, groups);
  const bool hb = b.has_value() && b->defined();
  return at::conv2d(f32(x), f32(w), hb ? std::optional<at::Tensor>(f32(*b)) : std::optional<at::Tensor>(), s, p, d,
                    groups)
      .to(x.scalar_type());
}

// conv2d_input / conv2d_weight through convolution_backward (bf16 in fp32, as conv_fw).
at::Tensor conv_dinput(const at::Tensor& like_x, const at::Tensor& w, const at::Tensor& dy, at::IntArrayRef s,
                       at::IntArrayRef p, at::IntArrayRef d, int64_t groups) {
  if (!lowp(dy) && !lowp(w))
    return std::get<0>(at::convolution_backward(dy, like_x, w, std::nullopt, s, p, d, false, {0, 0}, groups,
                                                {true, false, false}));
  // only like_x's shape is read: an uninitialised fp32 stand-in, not a copy
  auto shape = at::empty(like_x.sizes(), dy.options().dtype(at::kFloat));
  return std::get<0>(at::convolution_backward(f32(dy), shape, f32(w), std::nullopt, s, p, d, false, {0, 0}, groups,
                                              {true, false, false}))
      .to(like_x.scalar_type());
}
at::Tensor conv_dweight(const at::Tensor& x, const at::Tensor& like_w, const at::Tensor& dy, at::IntArrayRef s,
                        at::IntArrayRef p, at::IntArrayRef d, int64_t groups) {
  if (!lowp(dy) && !lowp(x))
    return std::get<1>(at::convolution_backward(dy, x, like_w, std::nullopt, s, p, d, false, {0, 0}, groups,
                                                {false, true, false}));
  return std::get<1>(at::convolution_backward(f32(dy), f32(x), f32(like_w), std::nullopt, s, p, d, false, {0, 0},
                                              groups, {false, true, false}))
      .to(like_w.scalar_type());
}

EngineArgs engine_args(const ConvGeom& g, const at::Tensor& W, const at::Tensor& Af, const at::Tensor& Bf,
                       const MaskBits& mb, double scale, int64_t grp) {
  const int64_t r = Af.size(0);
  const size_t esz = W.scalar_type() == at::kBFloat16 ? 2 : 4;
  MaskBits m = mb;
  m.row_off = grp * g.og;
  return EngineArgs{g.og, g.colsK, r, (float)scale,
                    static_cast<const char*>(W.data_ptr()) + (size_t)(grp * g.og * g.colsK) * esz,
                    W.scalar_type() == at::kBFloat16, g.colsK, Af.data_ptr<float>(), g.colsK,
                    Bf.data_ptr<float>() + grp * g.og * r, m};
}

// W_eff = W + s*M.(B*A) whole (out, cg, kh, kw) fp32: the single-tile path of small weights.
at::Tensor effective_weight(const ConvGeom& g, const at::Tensor& W, const at::Tensor& Af, const at::Tensor& Bf,
                            const MaskBits& mb, double scale) {
  auto Weff = at::empty({g.out, g.cg, g.kh, g.kw}, Af.options());
  for (int64_t grp = 0; grp < g.groups; ++grp)
    build_weight(engine_args(g, W, Af, Bf, mb, scale, grp), Weff.data_ptr<float>() + grp * g.og * g.colsK);
  return Weff;
}

// ---- block masks, factored (see linear.cpp): per piece of output pixels, with the unfolded input
// C (colsK x lc): H_q = A_q C_q (r x lc), hP = mask . H; D_p = B_p^T dY_p, E = mask^T . D.
struct BlockConv {
  const ConvGeom& g;
  int64_t r, bo, bi, np, nq;
  const float* A;  // (r, colsK)
  const float* B;  // (out, r)
  at::Tensor maskf;  // (np, nq)
  float s;
  BlockConv(const ConvGeom& g_, const at::Tensor& Af, const at::Tensor& Bf, const at::Tensor& mask, int64_t bo_,
            int64_t bi_, double scale)
      : g(g_), r(Af.size(0)), bo(bo_), bi(bi_), np(cdiv(g_.out, bo_)), nq(cdiv(g_.colsK, bi_)),
        A(Af.data_ptr<float>()), B(Bf.data_ptr<float>()), maskf(mask.to(at::kFloat).reshape({np, nq}).contiguous()),
        s((float)scale) {}
  // Row blocks of group grp and their row ranges.
  int64_t lc_hint = 1;  // pixels per piece, for the parallel grain
  template <typename F>
  void for_row_blocks(int64_t grp, const F& f) const {
    const int64_t r0 = grp * g.og, r1 = r0 + g.og;
    const int64_t p0 = r0 / bo, p1 = cdiv(r1, bo);
    at::parallel_for(p0, p1, grain_for(2 * bo * r * lc_hint), [&](int64_t a, int64_t b) {
      for (int64_t p = a; p < b; ++p) f(p, std::max(r0, p * bo), std::min(r1, (p + 1) * bo));
    });
  }
  template <typename F>
  void for_col_blocks(const F& f) const {
    at::parallel_for(0, nq, grain_for(2 * bi * r * lc_hint), [&](int64_t a, int64_t b) {
      for (int64_t q = a; q < b; ++q) f(q, q * bi, std::min(bi, g.colsK - q * bi));
    });
  }
  at::Tensor hP(const Mat& C, int64_t lc) const {  // (np, r*lc)
    auto H = at::empty({nq, r * lc}, at::kFloat);
    float* h = H.data_ptr<float>();
    for_col_blocks([&](int64_t q, int64_t j0, int64_t bc) {
      gemm(1.f, Mat{const_cast<float*>(A) + j0, r, bc, g.colsK, 1}, C.sub(j0, bc, 0, lc), 0.f,
           Mat{h + q * r * lc, r, lc, lc, 1});
    });
    return at::mm(maskf, H);
  }
  at::Tensor E(const Mat& dY, int64_t lc, int64_t grp) const {  // (nq, r*lc); dY (out x lc) global rows
    auto D = at::zeros({np, r * lc}, at::kFloat);
    float* d = D.data_ptr<float>();
    for_row_blocks(grp, [&](int64_t p, int64_t ra, int64_t rb) {
      gemm(1.f, Mat{const_cast<float*>(B) + ra * r, rb - ra, r, r, 1}.t(), dY.sub(ra, rb - ra, 0, lc), 0.f,
           Mat{d + p * r * lc, r, lc, lc, 1});
    });
    return at::mm(maskf.t(), D);
  }
};

void im2col_or_view(const ConvGeom& g, float* xp, const Piece& pc, int64_t grp, std::vector<float>& buf, Mat& C) {
  if (g.pointwise) {
    C = Mat{xp + (pc.n * g.C + grp * g.cg) * g.L + pc.l0, g.colsK, pc.lc, g.L, 1};
  } else {
    if ((int64_t)buf.size() < g.colsK * pc.lc) buf.resize(g.colsK * pc.lc);
    im2col(g, xp, pc.n, grp * g.cg, pc.l0, pc.lc, buf.data());
    C = Mat{buf.data(), g.colsK, pc.lc, pc.lc, 1};
  }
}

int64_t piece_len(const ConvGeom& g) {
  return g.pointwise ? g.L : std::max<int64_t>(1, std::min<int64_t>(g.L, kColsBudget / std::max<int64_t>(1, g.colsK)));
}

// Pieces of at most kColsBudget unfolded floats, one sample each.
std::vector<Piece> pieces_of(const ConvGeom& g) {
  std::vector<Piece> v;
  const int64_t lc = piece_len(g);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t l0 = 0; l0 < g.L; l0 += lc) v.push_back(Piece{n, l0, std::min(lc, g.L - l0)});
  return v;
}

// ---- block masks through oneDNN convs, for layers with few row blocks (np * r small):
// row block p sees A masked by its column pattern m_p, so with A_stack = [A . m_p]_p (np*r output
// channels) the delta is a grouped 1x1 conv (groups = np) of conv(x, A_stack) by B. Costs r/bo of a
// base conv per pass instead of the im2col passes; groups == 1 only.
struct BlockStack {
  int64_t np, r, bo, out, colsK;
  at::Tensor Mstack;  // (np, colsK) fp32 column pattern of each row block
  at::Tensor Astack;  // (np*r, C, kh, kw) fp32
  at::Tensor Bg;      // (np*bo, r, 1, 1) fp32
  BlockStack(const ConvGeom& g, const at::Tensor& Af /*(r, colsK)*/, const at::Tensor& Bf, const at::Tensor& mask,
             int64_t bo_, int64_t bi) {
    r = Af.size(0);
    bo = bo_;
    out = g.out;
    colsK = g.colsK;
    np = cdiv(out, bo);
    Mstack = mask.to(at::kFloat).reshape({np, -1}).repeat_interleave(bi, 1).narrow(1, 0, colsK).contiguous();
    Astack = (Af.unsqueeze(0) * Mstack.unsqueeze(1)).reshape({np * r, g.cg, g.kh, g.kw});
    auto Bp = np * bo == out ? Bf : at::constant_pad_nd(Bf, {0, 0, 0, np * bo - out});
    Bg = Bp.reshape({np * bo, r, 1, 1}).contiguous();
  }
  at::Tensor pad_out(const at::Tensor& t) const {  // (N, out, ...) -> (N, np*bo, ...)
    return np * bo == out ? t : at::constant_pad_nd(t, {0, 0, 0, 0, 0, np * bo - out});
  }
};

bool use_block_stack(const ConvGeom& g, int64_t r, int64_t bo) {
  return g.groups == 1 && cdiv(g.out, bo) * r <= 160;
}
}  // namespace

at::Tensor masked_lora_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o, int64_t block_i,
                              double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  const NoAutocast no_autocast;
  const ConvGeom g = geom(x, weight, stride, padding, dilation, groups);
  check_adapters(x, weight, lora_A, lora_B, g);
  check_mask(mask, kind, block_o, block_i, g.out, g.colsK);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->numel() == g.out && bias->scalar_type() == x.scalar_type(),
                "spare_kernels_cpu: bias must be (out,) in the activation dtype");
  const auto dt = x.scalar_type();
  const int64_t r = lora_A.size(0);
  const bool engine = masked_engine(kind, g.og, g.colsK);
  if (kind == kNone || (kind == kRow && !engine)) {
    auto y = conv_fw(x, weight, bias, stride, padding, dilation, groups);
    auto z = conv_fw(x, conv_A_factored(lora_A, groups, dt), std::optional<at::Tensor>(), stride, padding, dilation, groups);
    auto B4 = lora_B.to(dt);
    if (kind == kRow) B4 = B4 * mask->reshape({g.out, 1}).to(dt);
    auto lo = conv_fw(z, B4.view({g.out, r, 1, 1}), std::optional<at::Tensor>(), at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0}, at::IntArrayRef{1, 1}, groups);
    return y.add_(lo, scale);
  }
  if (dt == at::kFloat && !any_set(*mask))  // all-zero mask: exactly the frozen conv
    return conv_fw(x, weight, bias, stride, padding, dilation, groups);
  auto xf = f32c(x);
  auto W = weight.contiguous();
  auto Af = lora_A.to(at::kFloat).reshape({r, g.colsK}).contiguous();
  auto Bf = f32c(lora_B);
  if (!engine && use_block_stack(g, r, block_o)) {
    const BlockStack bs(g, Af, Bf, *mask, block_o, block_i);
    auto y = conv_fw(x, weight, bias, stride, padding, dilation, groups).to(at::kFloat);
    auto z = conv_fw(xf, bs.Astack, std::optional<at::Tensor>(), stride, padding, dilation, 1);
    auto lo = conv_fw(z, bs.Bg, std::optional<at::Tensor>(), at::IntArrayRef{1, 1}, at::IntArrayRef{0, 0},
                         at::IntArrayRef{1, 1}, bs.np);
    return y.add_(lo.narrow(1, 0, g.out), scale).to(dt);
  }
  if (!engine) {  // block, factored
    auto yf = conv_fw(x, weight, bias, stride, padding, dilation, groups).to(at::kFloat).contiguous();
    BlockConv bc(g, Af, Bf, *mask, block_o, block_i, scale);
    bc.lc_hint = piece_len(g);
    std::vector<float> buf;
    float* yp = yf.data_ptr<float>();
    for (int64_t grp = 0; grp < groups; ++grp)
      for (const auto& pc : pieces_of(g)) {
        Mat C;
        im2col_or_view(g, xf.data_ptr<float>(), pc, grp, buf, C);
        auto hP = bc.hP(C, pc.lc);
        float* h = hP.data_ptr<float>();
        bc.for_row_blocks(grp, [&](int64_t p, int64_t ra, int64_t rb) {
          gemm(bc.s, Mat{Bf.data_ptr<float>() + ra * r, rb - ra, r, r, 1}, Mat{h + p * r * pc.lc, r, pc.lc, pc.lc, 1},
               1.f, Mat{yp + (pc.n * g.out + ra) * g.L + pc.l0, rb - ra, pc.lc, g.L, 1});
        });
      }
    return yf.to(dt);
  }
  at::Tensor holder;
  const MaskBits mb = mask_bits(*mask, kind, block_o, block_i, g.out, g.colsK, holder);
  if (g.og * g.colsK <= kWholeTile) {  // one tile: build W_eff, one oneDNN convolution
    auto Weff = effective_weight(g, W, Af, Bf, mb, scale);
    at::Tensor bf;
    if (has_bias) bf = f32c(*bias);
    return conv_fw(xf, Weff, bf.defined() ? std::optional<at::Tensor>(bf) : std::optional<at::Tensor>(),
                      stride, padding, dilation, groups).to(dt);
  }
  auto yf = at::empty({g.N, g.out, g.Ho, g.Wo}, x.options().dtype(at::kFloat));
  at::Tensor bf;
  if (has_bias) bf = f32c(*bias);
  float* xp = xf.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  const auto chunks = chunks_of(g);
  std::vector<float> colbuf;
  for (int64_t grp = 0; grp < groups; ++grp) {
    const EngineArgs e = engine_args(g, W, Af, Bf, mb, scale, grp);
    for (const auto& ch : chunks) {
      std::vector<Mat> X, Y;
      if (!g.pointwise) {
        int64_t tot = 0;
        for (const auto& pc : ch) tot += pc.lc * g.colsK;
        if ((int64_t)colbuf.size() < tot) colbuf.resize(tot);
      }
      int64_t off = 0;
      for (const auto& pc : ch) {
        if (g.pointwise) {
          X.push_back(Mat{xp + (pc.n * g.C + grp * g.cg) * g.L + pc.l0, pc.lc, g.cg, 1, g.L});
        } else {
          float* cols = colbuf.data() + off;
          im2col(g, xp, pc.n, grp * g.cg, pc.l0, pc.lc, cols);
          X.push_back(Mat{cols, pc.lc, g.colsK, 1, pc.lc});
          off += pc.lc * g.colsK;
        }
        Y.push_back(Mat{yp + (pc.n * g.out + grp * g.og) * g.L + pc.l0, pc.lc, g.og, 1, g.L});
      }
      engine_forward(e, X, Y, bf.defined() ? bf.data_ptr<float>() + grp * g.og : nullptr);
    }
  }
  return yf.to(dt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lora_conv2d_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
    int64_t block_i, double scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool need_dx, bool need_dA, bool need_dB) {
  const NoAutocast no_autocast;
  const ConvGeom g = geom(x, weight, stride, padding, dilation, groups);
  check_adapters(x, weight, lora_A, lora_B, g);
  check_mask(mask, kind, block_o, block_i, g.out, g.colsK);
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == g.N && dy.size(1) == g.out && dy.size(2) == g.Ho &&
                  dy.size(3) == g.Wo && dy.scalar_type() == x.scalar_type(),
              "spare_kernels_cpu: dy must be (", g.N, ", ", g.out, ", ", g.Ho, ", ", g.Wo,
              ") in the activation dtype, got ", dy.sizes());
  const auto dt = x.scalar_type();
  const int64_t r = lora_A.size(0);
  const bool engine = masked_engine(kind, g.og, g.colsK);
  at::Tensor dx = empty_grad(), dA = empty_grad(), dB = empty_grad();
  if (kind == kNone || (kind == kRow && !engine)) {
    auto Af = conv_A_factored(lora_A, groups, dt);
    auto B4 = lora_B.to(dt).view({g.out, r, 1, 1});
    at::Tensor dys = kind == kRow ? dy * (mask->reshape({1, g.out, 1, 1}).to(dt) * scale) : dy * scale;
    auto z_like = at::empty({g.N, groups * r, g.Ho, g.Wo}, x.options());
    auto dz = conv_dinput(z_like, B4, dys, {1, 1}, {0, 0}, {1, 1}, groups);
    if (need_dB) {
      auto z = conv_fw(x, Af, std::optional<at::Tensor>(), stride, padding, dilation, groups);
      dB = conv_dweight(z, B4, dys, {1, 1}, {0, 0}, {1, 1}, groups).reshape({g.out, r}).to(lora_B.scalar_type());
    }
    if (need_dA) {
      auto dAf = conv_dweight(x, Af, dz, stride, padding, dilation, groups);
      dA = dAf.view({groups, r, g.cg, g.kh, g.kw}).sum(0).to(lora_A.scalar_type());
    }
    if (need_dx)
      dx = conv_dinput(x, weight, dy, stride, padding, dilation, groups)
               .add_(conv_dinput(x, Af, dz, stride, padding, dilation, groups));
    return {dx, dA, dB};
  }
  const bool need_ab = need_dA || need_dB;
  if (!need_dx && !need_ab) return {dx, dA, dB};
  if (dt == at::kFloat && !any_set(*mask)) {  // all-zero mask: the frozen conv, no adapter grads
    if (need_dx) dx = conv_dinput(x, weight, dy, stride, padding, dilation, groups);
    if (need_dA) dA = at::zeros_like(lora_A);
    if (need_dB) dB = at::zeros_like(lora_B);
    return {dx, dA, dB};
  }
  auto xf = f32c(x), dyf = f32c(dy);
  auto W = weight.contiguous();
  auto Af = lora_A.to(at::kFloat).reshape({r, g.colsK}).contiguous();
  auto Bf = f32c(lora_B);
  if (!engine && use_block_stack(g, r, block_o)) {
    const BlockStack bs(g, Af, Bf, *mask, block_o, block_i);
    auto dys = bs.pad_out(dyf * scale);
    const std::vector<int64_t> one{1, 1}, zero{0, 0};
    auto z_like = at::empty({g.N, bs.np * r, g.Ho, g.Wo}, xf.options());
    at::Tensor dz;
    if (need_dx || need_dA) dz = conv_dinput(z_like, bs.Bg, dys, one, zero, one, bs.np);
    if (need_dx) {
      auto d = conv_dinput(x, weight, dy, stride, padding, dilation, 1).to(at::kFloat);
      dx = d.add_(conv_dinput(xf, bs.Astack, dz, stride, padding, dilation, 1)).to(dt);
    }
    if (need_dA) {
      auto das = conv_dweight(xf, bs.Astack, dz, stride, padding, dilation, 1).reshape({bs.np, r, g.colsK});
      dA = (das * bs.Mstack.unsqueeze(1)).sum(0).view(lora_A.sizes()).to(lora_A.scalar_type());
    }
    if (need_dB) {
      auto z = conv_fw(xf, bs.Astack, std::optional<at::Tensor>(), stride, padding, dilation, 1);
      dB = conv_dweight(z, bs.Bg, dys, one, zero, one, bs.np).reshape({bs.np * block_o, r}).narrow(0, 0, g.out)
               .to(lora_B.scalar_type());
    }
    return {dx, dA, dB};
  }
  if (!engine) {  // block, factored
    at::Tensor dxf, dAf, dBf;
    if (need_dx) dxf = conv_dinput(x, weight, dy, stride, padding, dilation, groups).to(at::kFloat).contiguous();
    if (need_dA) dAf = at::zeros({r, g.colsK}, at::kFloat);
    if (need_dB) dBf = at::zeros({g.out, r}, at::kFloat);
    BlockConv bc(g, Af, Bf, *mask, block_o, block_i, scale);
    bc.lc_hint = piece_len(g);
    std::vector<float> buf, dbuf;
    float* xp = xf.data_ptr<float>();
    float* dyp = dyf.data_ptr<float>();
    for (int64_t grp = 0; grp < groups; ++grp)
      for (const auto& pc : pieces_of(g)) {
        const int64_t lc = pc.lc;
        const Mat dY{dyp + pc.n * g.out * g.L + pc.l0, g.out, lc, g.L, 1};
        Mat C{nullptr, g.colsK, lc, lc, 1};
        if (need_dA || need_dB) im2col_or_view(g, xp, pc, grp, buf, C);
        if (need_dx || need_dA) {
          auto E = bc.E(dY, lc, grp);
          float* e = E.data_ptr<float>();
          if (need_dx) {
            Mat dC;
            float beta = 1.f;
            if (g.pointwise) {
              dC = Mat{dxf.data_ptr<float>() + (pc.n * g.C + grp * g.cg) * g.L + pc.l0, g.colsK, lc, g.L, 1};
            } else {
              if ((int64_t)dbuf.size() < g.colsK * lc) dbuf.resize(g.colsK * lc);
              dC = Mat{dbuf.data(), g.colsK, lc, lc, 1};
              beta = 0.f;
            }
            bc.for_col_blocks([&](int64_t q, int64_t j0, int64_t bcn) {
              gemm(bc.s, Mat{Af.data_ptr<float>() + j0, r, bcn, g.colsK, 1}.t(), Mat{e + q * r * lc, r, lc, lc, 1},
                   beta, dC.sub(j0, bcn, 0, lc));
            });
            if (!g.pointwise) col2im(g, dbuf.data(), pc.n, grp * g.cg, pc.l0, lc, dxf.data_ptr<float>());
          }
          if (need_dA) {
            float* da = dAf.data_ptr<float>();
            bc.for_col_blocks([&](int64_t q, int64_t j0, int64_t bcn) {
              gemm(bc.s, Mat{e + q * r * lc, r, lc, lc, 1}, C.sub(j0, bcn, 0, lc).t(), 1.f,
                   Mat{da + j0, r, bcn, g.colsK, 1});
            });
          }
        }
        if (need_dB) {
          auto hP = bc.hP(C, lc);
          float* h = hP.data_ptr<float>();
          float* db = dBf.data_ptr<float>();
          bc.for_row_blocks(grp, [&](int64_t p, int64_t ra, int64_t rb) {
            gemm(bc.s, dY.sub(ra, rb - ra, 0, lc), Mat{h + p * r * lc, r, lc, lc, 1}.t(), 1.f,
                 Mat{db + ra * r, rb - ra, r, r, 1});
          });
        }
      }
    if (need_dx) dx = dxf.to(dt);
    if (need_dA) dA = dAf.view(lora_A.sizes()).to(lora_A.scalar_type());
    if (need_dB) dB = dBf.to(lora_B.scalar_type());
    return {dx, dA, dB};
  }
  at::Tensor holder;
  const MaskBits mb = mask_bits(*mask, kind, block_o, block_i, g.out, g.colsK, holder);
  if (g.og * g.colsK <= kWholeTile) {  // one tile: oneDNN's backward on W_eff, then G contracted
    auto Weff = effective_weight(g, W, Af, Bf, mb, scale);
    auto grads = at::convolution_backward(dyf, xf, Weff, std::nullopt, stride, padding, dilation, false,
                                          at::IntArrayRef{0, 0}, groups, {need_dx, need_ab, false});
    if (need_dx) dx = std::get<0>(grads).to(dt);
    if (need_ab) {
      auto G = std::get<1>(grads).contiguous();
      auto dAf = at::zeros({r, g.colsK}, x.options().dtype(at::kFloat));
      auto dBf = at::zeros({g.out, r}, x.options().dtype(at::kFloat));
      for (int64_t grp = 0; grp < groups; ++grp)
        contract_grad(engine_args(g, W, Af, Bf, mb, scale, grp), G.data_ptr<float>() + grp * g.og * g.colsK,
                      dAf.data_ptr<float>(), g.colsK, dBf.data_ptr<float>() + grp * g.og * r);
      if (need_dA) dA = dAf.view(lora_A.sizes()).to(lora_A.scalar_type());
      if (need_dB) dB = dBf.to(lora_B.scalar_type());
    }
    return {dx, dA, dB};
  }
  at::Tensor dxf, dAf, dBf;
  if (need_dx) dxf = at::zeros({g.N, g.C, g.H, g.W}, x.options().dtype(at::kFloat));
  if (need_ab) {
    dAf = at::zeros({r, g.colsK}, x.options().dtype(at::kFloat));
    dBf = at::zeros({g.out, r}, x.options().dtype(at::kFloat));
  }
  float* xp = xf.data_ptr<float>();
  float* dyp = dyf.data_ptr<float>();
  float* dxp = need_dx ? dxf.data_ptr<float>() : nullptr;
  const auto chunks = chunks_of(g);
  std::vector<float> colbuf, dcolbuf;
  for (int64_t grp = 0; grp < groups; ++grp) {
    const EngineArgs e = engine_args(g, W, Af, Bf, mb, scale, grp);
    for (const auto& ch : chunks) {
      std::vector<Mat> X, dY, dX;
      if (!g.pointwise) {
        int64_t tot = 0;
        for (const auto& pc : ch) tot += pc.lc * g.colsK;
        if (need_ab && (int64_t)colbuf.size() < tot) colbuf.resize(tot);
        if (need_dx && (int64_t)dcolbuf.size() < tot) dcolbuf.resize(tot);
      }
      int64_t off = 0;
      for (const auto& pc : ch) {
        if (g.pointwise) {
          X.push_back(Mat{xp + (pc.n * g.C + grp * g.cg) * g.L + pc.l0, pc.lc, g.cg, 1, g.L});
          if (need_dx) dX.push_back(Mat{dxp + (pc.n * g.C + grp * g.cg) * g.L + pc.l0, pc.lc, g.cg, 1, g.L});
        } else {
          if (need_ab) {
            float* cols = colbuf.data() + off;
            im2col(g, xp, pc.n, grp * g.cg, pc.l0, pc.lc, cols);
            X.push_back(Mat{cols, pc.lc, g.colsK, 1, pc.lc});
          } else {
            X.push_back(Mat{nullptr, pc.lc, g.colsK, 1, pc.lc});
          }
          if (need_dx) dX.push_back(Mat{dcolbuf.data() + off, pc.lc, g.colsK, 1, pc.lc});
          off += pc.lc * g.colsK;
        }
        dY.push_back(Mat{dyp + (pc.n * g.out + grp * g.og) * g.L + pc.l0, pc.lc, g.og, 1, g.L});
      }
      engine_backward(e, dY, X, need_dx ? &dX : nullptr, need_ab ? dAf.data_ptr<float>() : nullptr, g.colsK,
                      need_ab ? dBf.data_ptr<float>() + grp * g.og * r : nullptr);
      if (need_dx && !g.pointwise) {
        off = 0;
        for (const auto& pc : ch) {
          col2im(g, dcolbuf.data() + off, pc.n, grp * g.cg, pc.l0, pc.lc, dxp);
          off += pc.lc * g.colsK;
        }
      }
    }
  }
  if (need_dx) dx = dxf.to(dt);
  if (need_dA) dA = dAf.view(lora_A.sizes()).to(lora_A.scalar_type());
  if (need_dB) dB = dBf.to(lora_B.scalar_type());
  return {dx, dA, dB};
}

}  // namespace spare
