// The schemas of the backend ops, written once: every native library (spare_kernels_cpu,
// spare_kernels_cuda) defines its ops from these strings, so the contract of
// spare_kernels/backends/reference.py has one C++ spelling.
#pragma once

#include <vector>

#include "maskfmt.h"

#define SPARE_SCHEMA_MASKED_LORA_LINEAR                                                              \
  "masked_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "        \
  "Tensor? mask, int kind, int block_o, int block_i, float scale) -> Tensor"
#define SPARE_SCHEMA_MASKED_LORA_LINEAR_BACKWARD                                                     \
  "masked_lora_linear_backward(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, "                 \
  "Tensor lora_B, Tensor? mask, int kind, int block_o, int block_i, float scale, "                  \
  "bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)"
#define SPARE_SCHEMA_MASKED_LORA_CONV2D                                                              \
  "masked_lora_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "        \
  "Tensor? mask, int kind, int block_o, int block_i, float scale, int[] stride, "                   \
  "int[] padding, int[] dilation, int groups) -> Tensor"
#define SPARE_SCHEMA_MASKED_LORA_CONV2D_BACKWARD                                                     \
  "masked_lora_conv2d_backward(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, "                 \
  "Tensor lora_B, Tensor? mask, int kind, int block_o, int block_i, float scale, "                  \
  "int[] stride, int[] padding, int[] dilation, int groups, bool need_dx, bool need_dA, "           \
  "bool need_dB) -> (Tensor, Tensor, Tensor)"
#define SPARE_SCHEMA_SALIENCY_LINEAR "saliency_linear(Tensor(a!) acc, Tensor x, Tensor dy, str stat) -> ()"
#define SPARE_SCHEMA_SALIENCY_CONV2D                                                                 \
  "saliency_conv2d(Tensor(a!) acc, Tensor x, Tensor dy, str stat, int[] stride, "                   \
  "int[] padding, int[] dilation, int groups) -> ()"
// [kNone, kElement, kBlock, kRow, kBitsPerByte, kLsbFirst]: held to spare_kernels/maskfmt.py by a test.
#define SPARE_SCHEMA_WIRE_FORMAT "wire_format() -> int[]"

// The native CPU top-k engine (csrc/cpu/topk.cpp; spare_kernels_cpu only, not a backend op): masks of
// the k highest scores per group of consecutive tensors, and [first NaN tensor or -1, full passes,
// level that wrote candidates or -1].
#define SPARE_SCHEMA_TOPK_SELECT                                                                     \
  "topk_select(Tensor[] scores, int[] groups, int[] ks, int digit0, int cand_bytes) -> (Tensor[], int[])"

// Defines the six backend ops and wire_format() in library `m` (a torch::Library).
#define SPARE_DEFINE_BACKEND_OPS(m)                                                                  \
  do {                                                                                               \
    (m).def(SPARE_SCHEMA_MASKED_LORA_LINEAR);                                                        \
    (m).def(SPARE_SCHEMA_MASKED_LORA_LINEAR_BACKWARD);                                               \
    (m).def(SPARE_SCHEMA_MASKED_LORA_CONV2D);                                                        \
    (m).def(SPARE_SCHEMA_MASKED_LORA_CONV2D_BACKWARD);                                               \
    (m).def(SPARE_SCHEMA_SALIENCY_LINEAR);                                                           \
    (m).def(SPARE_SCHEMA_SALIENCY_CONV2D);                                                           \
    SPARE_DEFINE_WIRE_FORMAT(m);                                                                     \
  } while (0)

// Defines wire_format() in library `m`: the compiled constants of csrc/common/maskfmt.h.
#define SPARE_DEFINE_WIRE_FORMAT(m)                                                                  \
  (m).def(SPARE_SCHEMA_WIRE_FORMAT, []() -> std::vector<int64_t> {                                   \
    return {spare::kNone, spare::kElement, spare::kBlock, spare::kRow, spare::kBitsPerByte,          \
            spare::kLsbFirst};                                                                       \
  })
