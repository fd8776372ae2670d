// The masked LoRA arithmetic every backend computes per weight entry (DESIGN §1), as __host__
// __device__ code: the CPU engine's scalar paths, the CUDA kernels and the host harness that runs the
// CUDA kernels' bodies in the CPU tests all call these. fp32 accumulation whatever the storage type.
#pragma once

#include "maskfmt.h"

namespace spare {

// Σ_r B[o, r] · A[r, c]: brow = &B[o, 0] (stride 1), a = &A[0, c] (stride lda between ranks).
template <typename TB, typename TA>
SPARE_HD inline float lora_dot(const TB* brow, const TA* a, int64_t lda, int64_t rank) {
  float acc = 0.f;
  for (int64_t k = 0; k < rank; ++k) acc += static_cast<float>(brow[k]) * static_cast<float>(a[k * lda]);
  return acc;
}

// One entry of the effective weight W + s · M ⊙ (B·A).
template <typename TB, typename TA>
SPARE_HD inline float effective_weight(float w, bool on, float scale, const TB* brow, const TA* a, int64_t lda,
                                       int64_t rank) {
  return on ? w + scale * lora_dot(brow, a, lda, rank) : w;
}

}  // namespace spare
