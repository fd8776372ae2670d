// Mask wire format shared by every native backend (CPU now, CUDA later): the C++ twin of
// spare_kernels/maskfmt.py. tests/test_maskfmt.py checks both agree through wire_format().
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

// Whether column c of a packed element-mask row is on.
SPARE_HD inline bool mask_bit(const uint8_t* row, int64_t c) { return (row[c >> 3] >> (c & 7)) & 1; }

}  // namespace spare
