// CUDA backend of spare_kernels (extension spare_kernels._C_cuda, library spare_kernels_cuda):
// vendor GEMMs and convolutions through ATen (cuBLAS, cuDNN) plus the kernels of lora_kernels.h for
// every mask-dependent step. Same contract as spare_kernels/backends/reference.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "../common/maskfmt.h"
#include "lora_kernels.h"

// The activation dtypes the backend serves (the registry sends fp64 to the reference): one
// instantiation each, no fp64 code compiled for nothing.
#define SPARE_DISPATCH_ACTIVATION(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                        \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace spare_cuda {

// Every op holds one: the kernels pick their own precision, and autocast (a call under it, or a
// backward run inside its region) would cast their internal ATen calls down.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Bound on every weight-sized temporary (a chunk of G, the per-sample gradient scratch of saliency):
// 2^24 fp32 entries = 64 MiB, about a third of SD-1.5's largest weight gradient in fp32, so the
// chunk's GEMM stays large enough for cuBLAS to reach peak while memory stays bounded. Not yet tuned
// on a GPU.
constexpr int64_t kScratchEntries = int64_t{1} << 24;

// Rows per chunk of an (rows, cols) fp32 temporary within kScratchEntries (a multiple of 16 rows,
// the contract kernel's row tile, unless the whole matrix fits).
inline int64_t chunk_rows(int64_t rows, int64_t cols) {
  if (rows * cols <= kScratchEntries) return rows;
  const int64_t r = std::max<int64_t>(16, kScratchEntries / std::max<int64_t>(cols, 1) / 16 * 16);
  return std::min(rows, r);
}

// G = a·b with fp32 output whatever the input dtype (cuBLAS accumulates in fp32 and keeps it).
inline at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}
inline at::Tensor bmm_f32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::bmm(a, b) : at::bmm(a, b, at::kFloat);
}

void check_inputs(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts);
void check_mask(const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o, int64_t block_i,
                int64_t out, int64_t cols, const at::Device& dev);

// W + s·M⊙(B·A) as an (out, cols) contiguous tensor of `dtype` (element / block masks).
at::Tensor effective_weight(const at::Tensor& w2, const at::Tensor& A2, const at::Tensor& B,
                            const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i,
                            double scale, at::ScalarType dtype);
// dA (r, cols) / dB (out, r) fp32 accumulators (undefined when not wanted) from the masked weight
// gradient, G produced chunk by chunk by gchunk(o0, o1) -> (o1 - o0, cols) fp32.
template <typename F>
void masked_contract(F&& gchunk, int64_t out, int64_t cols, const at::Tensor& A2, const at::Tensor& B,
                     const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i, double scale,
                     at::Tensor& dA, at::Tensor& dB);
void contract_chunk(const at::Tensor& g, int64_t row0, const at::Tensor& A2f, const at::Tensor& Bf,
                    const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i, double scale,
                    at::Tensor& dA, at::Tensor& dB);
// acc (fp32, numel entries) += Σ_i f(g[i]) over the n rows of g (n, numel).
void accumulate(at::Tensor& acc, const at::Tensor& g, int64_t stat);
int64_t stat_code(std::string_view stat);

template <typename F>
void masked_contract(F&& gchunk, int64_t out, int64_t cols, const at::Tensor& A2, const at::Tensor& B,
                     const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i, double scale,
                     at::Tensor& dA, at::Tensor& dB) {
  const at::Tensor Af = A2.to(at::kFloat).contiguous(), Bf = B.to(at::kFloat).contiguous();
  const int64_t step = std::min(chunk_rows(out, cols), spare::kContractMaxRows);
  for (int64_t o0 = 0; o0 < out; o0 += step) {
    const int64_t o1 = std::min(out, o0 + step);
    contract_chunk(gchunk(o0, o1), o0, Af, Bf, mask, kind, block_o, block_i, scale, dA, dB);
  }
}

at::Tensor masked_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
                              int64_t block_i, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lora_linear_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
    int64_t block_i, double scale, bool need_dx, bool need_dA, bool need_dB);
at::Tensor masked_lora_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
                              int64_t block_i, double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lora_conv2d_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
    int64_t block_i, double scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool need_dx, bool need_dA, bool need_dB);
void saliency_linear(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy, std::string_view stat);
void saliency_conv2d(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy, std::string_view stat,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace spare_cuda
