// Native CPU backend of spare_kernels: shared declarations.
//
// All masked work of the engine (element masks; row / block masks on small weights) is done in fp32
// (bf16 activations are widened on load), tile by tile: a (P x Q) tile of the effective weight
// W + s*M.(B*A) or of the weight gradient G = dY^T X is built in a cache-sized scratch and consumed at
// once by MKL sgemm, so no out x in fp32 tensor is written whole above kWholeTile entries.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../common/lora_tile.h"
#include "../common/maskfmt.h"

namespace spare {

// Every kernel entry holds one: the kernels choose their own precision (fp32 work under bf16
// activations), and autocast, when on (a call under it, or a backward called inside its region),
// would cast their internal aten calls down and break them.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// A strided fp32 matrix view; one of rs / cs must be 1 (BLAS layouts).
struct Mat {
  float* p;
  int64_t r, c, rs, cs;
  Mat sub(int64_t r0, int64_t nr, int64_t c0, int64_t nc) const {
    return Mat{p + r0 * rs + c0 * cs, nr, nc, rs, cs};
  }
  Mat t() const { return Mat{p, c, r, cs, rs}; }
};

inline Mat mat_of(const at::Tensor& t) {  // 2-D fp32 tensor
  return Mat{t.data_ptr<float>(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

// C = alpha * A * B + beta * C through MKL sgemm (single call, caller decides the threading).
void gemm(float alpha, const Mat& A, const Mat& B, float beta, const Mat& C);

// Bit-packed mask rows: local row o reads bits + ((o + row_off) / row_div) * nbytes.
// Element masks: row_div = 1; block masks are expanded per block row (row_div = block_o), row
// masks as blocks of (1 x cols).
struct MaskBits {
  const uint8_t* bits;
  int64_t nbytes, row_div, row_off;
  const uint8_t* row(int64_t o) const { return bits + ((o + row_off) / row_div) * nbytes; }
};

struct EngineArgs {
  int64_t out, cols, r;
  float scale;
  const void* W;       // (out, cols) rows, row stride ldw, fp32 or bf16
  bool w_bf16;
  int64_t ldw;
  const float* A;      // (r, cols), row stride lda
  int64_t lda;
  const float* B;      // (out, r), contiguous
  MaskBits mask;
};

// Y_b = X_b * W_eff^T (+ bias) for every b (X_b: T_b x cols, Y_b: T_b x out; Y_b overwritten).
void engine_forward(const EngineArgs& e, const std::vector<Mat>& X, const std::vector<Mat>& Y,
                    const float* bias = nullptr);
// dX_b = dY_b * W_eff (overwritten, if dX != nullptr);
// dA (r x cols, row stride ldda) += s * B^T (M.G);  dB (out x r, contiguous) += s * (M.G) A^T,
// with G = sum_b dY_b^T X_b (if dA != nullptr).
void engine_backward(const EngineArgs& e, const std::vector<Mat>& dY, const std::vector<Mat>& X,
                     const std::vector<Mat>* dX, float* dA, int64_t ldda, float* dB);

// Weights of at most kWholeTile floats are one tile: the effective weight (or the weight gradient)
// is built whole in an L2-sized scratch and the GEMM / convolution runs once on it (oneDNN for
// convs), instead of splitting a small layer into tiles whose GEMMs would be too small to be fast.
constexpr int64_t kWholeTile = 256 * 1024;
// At most this many tokens, element masks take the engine's one-pass streamed kernel instead.
constexpr int64_t kSmallT = 4;
// Linear with element mask: the single-tile path applies.
inline bool one_tile(int64_t tokens, int64_t out, int64_t cols) { return tokens > kSmallT && out * cols <= kWholeTile; }
// Row and block masks run factored (rank-r pieces, no out x in work), except on one-tile weights
// (for convs: per group) with fewer than kFactoredMin outputs or columns: there the extra rank-r
// GEMMs / convolutions cost more than building W_eff once (MiniCanvas's convolutions ran 1.2-3x
// slower factored), so they take the engine.
constexpr int64_t kFactoredMin = 128;
inline bool masked_engine(int64_t kind, int64_t out, int64_t cols) {
  return kind == kElement ||
         ((kind == kRow || kind == kBlock) && out * cols <= kWholeTile && std::min(out, cols) < kFactoredMin);
}
// dst (out x cols, contiguous) = W + s * M.(B*A).
void build_weight(const EngineArgs& e, float* dst);
// G (out x cols, contiguous) *= M, then dA (r x cols, row stride ldda) += s * B^T G and
// dB (out x r) += s * G A^T.
void contract_grad(const EngineArgs& e, float* G, float* dA, int64_t ldda, float* dB);

// Block mask (nbo, nbi) bool -> bit-packed per block row (nbo, ceil(cols/8)) uint8.
at::Tensor block_rows_packed(const at::Tensor& mask, int64_t block_i, int64_t cols);
// MaskBits of an element / block / row wire mask (keeps `holder` alive for the expanded rows).
MaskBits mask_bits(const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i,
                   int64_t out, int64_t cols, at::Tensor& holder);
void check_mask(const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
                int64_t block_i, int64_t out, int64_t cols);

// at::parallel_for grain so that items of `work` flops each only go parallel above ~64K flops:
// small layers run inline (no OpenMP region to wake up, which costs a lot on a loaded machine).
inline int64_t grain_for(int64_t work) {
  constexpr int64_t kMinWork = 1 << 16;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work));
}

inline at::Tensor f32c(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Whether any byte of a bool / uint8 mask is set: the all-zero-mask shortcut of the ops (a raw scan;
// at::any + item costs ~10 us of dispatch on the few-token layers).
inline bool any_set(const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous();
  const uint8_t* p = static_cast<const uint8_t*>(m.data_ptr());
  return std::any_of(p, p + m.numel(), [](uint8_t v) { return v != 0; });
}
inline at::Tensor empty_grad() { return at::empty({0}); }

// Ops.
at::Tensor masked_lora_linear(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                              const at::Tensor& lora_B, const std::optional<at::Tensor>& mask,
                              int64_t kind, int64_t block_o, int64_t block_i, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lora_linear_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
    int64_t block_i, double scale, bool need_dx, bool need_dA, bool need_dB);
at::Tensor masked_lora_conv2d(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                              const at::Tensor& lora_B, const std::optional<at::Tensor>& mask,
                              int64_t kind, int64_t block_o, int64_t block_i, double scale,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lora_conv2d_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
    int64_t block_i, double scale, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool need_dx, bool need_dA, bool need_dB);
void saliency_linear(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy,
                     std::string_view stat);
void saliency_conv2d(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy,
                     std::string_view stat, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups);


}  // namespace spare
