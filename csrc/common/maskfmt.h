// Mask wire format shared by every native backend (CPU and CUDA): the C++ twin of
// spare_kernels/maskfmt.py. tests/test_maskfmt.py checks both agree through wire_format() of each
// library that is built (and of the host harness, which compiles this header without nvcc).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPARE_HD __host__ __device__
#else
#define SPARE_HD
#endif

namespace spare {

enum MaskKind : int64_t { kNone = 0, kElement = 1, kBlock = 2, kRow = 3 };

constexpr int64_t kBitsPerByte = 8;
constexpr bool kLsbFirst = true;  // bit b of byte j of a row is column 8*j + b

SPARE_HD inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
SPARE_HD inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// Bytes per packed element-mask row of `cols` columns (rows are byte-aligned).
SPARE_HD inline int64_t mask_row_bytes(int64_t cols) { return cdiv(cols, kBitsPerByte); }

// Whether column c of a packed element-mask row is on.
SPARE_HD inline bool mask_bit(const uint8_t* row, int64_t c) { return (row[c >> 3] >> (c & 7)) & 1; }

// Whether entry (o, c) of a block mask ((nbo, nbi) bool, tiles of block_o x block_i) is on.
SPARE_HD inline bool block_on(const bool* tiles, int64_t nbi, int64_t block_o, int64_t block_i, int64_t o,
                              int64_t c) {
  return tiles[(o / block_o) * nbi + c / block_i];
}

// Whether entry (o, c) of a wire mask of any kind is on (kNone: every entry).
SPARE_HD inline bool mask_on(int64_t kind, const void* data, int64_t cols, int64_t block_o, int64_t block_i,
                             int64_t o, int64_t c) {
  switch (kind) {
    case kElement:
      return mask_bit(static_cast<const uint8_t*>(data) + o * mask_row_bytes(cols), c);
    case kBlock:
      return block_on(static_cast<const bool*>(data), cdiv(cols, block_i), block_o, block_i, o, c);
    case kRow:
      return static_cast<const bool*>(data)[o];
    default:
      return true;
  }
}

}  // namespace spare
