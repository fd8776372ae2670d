// Host-side checks of the top-k ops' int64 tables, shared by the CUDA ops (csrc/cuda/topk.cu) and their
// host harness (csrc/harness/topk.cpp), which differ only in the device the tables live on.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace spare::topk {

// `t` is a contiguous int64 table on a `device` tensor: (n, cols) when cols > 0, else 1-D.
inline void check_table(const at::Tensor& t, int64_t cols, const char* op, const char* what, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, ": ", what, " must be a ", c10::DeviceTypeName(device),
              " tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", what, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
  if (cols > 0) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, op, ": ", what, " must be (n, ", cols, "), got ", t.sizes());
  } else {
    TORCH_CHECK(t.dim() == 1, op, ": ", what, " must be 1-D, got ", t.sizes());
  }
}

}  // namespace spare::topk
