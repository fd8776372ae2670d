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
#include <vector>

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

// G = a·b with fp32 output whatever the input dtype: for 16-bit a, b this is mm.dtype (torch >= 2.8;
// declared in ATen/ops/mm.h of 2.13, documented for 2.14), which on CUDA runs cuBLAS with 16-bit
// inputs and an fp32 output and compute type (Blas.cpp: _mm_dtype_out_cuda -> addmm_out_cuda_impl ->
// gemm<bf16 or half, float>): the tensor-core rate, no upcast copies.
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
// dA (r, cols) / dB (out, r) fp32 (zero-filled; undefined when not wanted) from the masked weight
// gradient: gregion(o0, o1, c0, c1) -> G[o0:o1, c0:c1] ((o1 - o0, c1 - c0), fp32 or the activations'
// 16-bit type) over the regions the mask needs (contract_regions), in row chunks. Deterministic.
template <typename F>
void masked_contract(F&& gregion, int64_t out, int64_t cols, const at::Tensor& A2, const at::Tensor& B,
                     const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i, double scale,
                     int64_t quantum, at::Tensor& dA, at::Tensor& dB);
// dA / dB from one region of G: rows [row0, row0 + g.size(0)), columns [col0, col0 + g.size(1)).
void contract_chunk(const at::Tensor& g, int64_t row0, int64_t col0, const at::Tensor& A2f, const at::Tensor& Bf,
                    const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i, double scale,
                    at::Tensor& dA, at::Tensor& dB);
// The regions of G a mask needs: element masks the whole weight; block masks their runs of on tiles
// (spare::block_regions, from a host copy of the tile mask cached per mask tensor and version).
std::vector<spare::Region> contract_regions(const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i,
                                            int64_t out, int64_t cols, int64_t quantum);
// acc (fp32, numel entries) += Σ_i f(g[i]) over the n rows of g (n, numel).
void accumulate(at::Tensor& acc, const at::Tensor& g, int64_t stat);
int64_t stat_code(std::string_view stat);

template <typename F>
void masked_contract(F&& gregion, int64_t out, int64_t cols, const at::Tensor& A2, const at::Tensor& B,
                     const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i, double scale,
                     int64_t quantum, at::Tensor& dA, at::Tensor& dB) {
  const at::Tensor Af = A2.to(at::kFloat).contiguous(), Bf = B.to(at::kFloat).contiguous();
  for (const spare::Region& r : contract_regions(mask, kind, block_o, block_i, out, cols, quantum)) {
    const int64_t step = spare::contract_step(r.o1 - r.o0, r.c1 - r.c0, Af.size(0), kScratchEntries);
    for (int64_t o0 = r.o0; o0 < r.o1; o0 += step) {
      const int64_t o1 = std::min(r.o1, o0 + step);
      contract_chunk(gregion(o0, o1, r.c0, r.c1), o0, r.c0, Af, Bf, mask, kind, block_o, block_i, scale, dA, dB);
    }
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
