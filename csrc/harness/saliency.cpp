// Host harness of the CUDA backend's per-sample saliency tile kernel (csrc/cuda/saliency_kernels.h): the
// block body run for every (tile, sample group) block in order with the scalar MMA (ScalarMma) in place
// of WMMA, then the fixed-order reduction of the group partials, on CPU tensors. The split and the
// parameters come from the same helpers saliency.cu calls. Test-only: built by tests/harness.py.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <limits>
#include <memory>
#include <vector>

#include "cuda/saliency_kernels.h"

namespace {

template <typename TG>
int64_t run_tiles(at::Tensor& acc, spare::SampleTileParams<TG> p, int64_t target_blocks, int64_t max_partial) {
  const int64_t numel = p.OUT * p.IN, tiles = spare::sal_tiles(p.OUT, p.IN);
  const spare::SalSplit sp = spare::sal_split(p.S, tiles, numel, target_blocks, max_partial);
  p.spg = sp.spg;
  p.groups = sp.groups;
  at::Tensor part;
  if (p.groups > 1) {   // NaN where no block wrote: an unwritten partial entry poisons acc
    part = at::full({p.groups, numel}, std::numeric_limits<float>::quiet_NaN(), acc.options());
    p.out = part.mutable_data_ptr<float>();
  } else {
    p.out = acc.mutable_data_ptr<float>();
  }
  std::vector<TG> sa(spare::kSalStageElems), sb(spare::kSalStageElems);
  std::vector<float> so(spare::kSalOutFloats);
  using Mma = spare::ScalarMma<TG>;
  auto block = std::make_unique<spare::HostBlock<typename Mma::Frag>>();
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t tile = 0; tile < tiles; ++tile)
      spare::sample_tile_block<Mma>(*block, p, tile, g, sa.data(), sb.data(), so.data());
  if (p.groups > 1) {
    const spare::SampleReduceParams r{part.const_data_ptr<float>(), acc.mutable_data_ptr<float>(), numel, p.groups};
    // a small grid: the entries are grid-strided, as on a GPU for weights above the grid's size
    spare::for_each_thread(spare::Dim3{3, 1, 1}, spare::Dim3{32, 1, 1},
                           [&](const spare::Thread& t) { spare::sample_reduce_body(t, r); });
  }
  return p.groups;
}

void check(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous(), "spare_harness.sal_tiles: acc float32");
  TORCH_CHECK(x.scalar_type() == dy.scalar_type() && x.is_contiguous() && dy.is_contiguous(),
              "spare_harness.sal_tiles: x and dy contiguous, one dtype");
}

// acc (OUT, IN) += Σ_i |g_i| or g_i²; x (S, T, IN), dy (S, T, OUT) 16-bit. Returns the groups used.
int64_t sal_tiles_linear(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy, int64_t square,
                         int64_t target_blocks, int64_t max_partial) {
  check(acc, x, dy);
  int64_t groups = 0;
  auto go = [&](auto tag) {
    using scalar_t = decltype(tag);
    groups = run_tiles(acc, spare::sal_linear_params(x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                                     x.size(0), x.size(1), dy.size(2), x.size(2), square != 0),
                       target_blocks, max_partial);
  };
  if (x.scalar_type() == at::kHalf)
    go(at::Half{});
  else if (x.scalar_type() == at::kBFloat16)
    go(at::BFloat16{});
  else
    TORCH_CHECK(false, "spare_harness.sal_tiles_linear: x must be float16 or bfloat16, got ", x.scalar_type());
  return groups;
}

// acc (OUT, C, KH, KW) += ...; x (S, C, H, W), dy (S, OUT, OH, OW) 16-bit, groups == 1.
int64_t sal_tiles_conv(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t square, int64_t target_blocks,
                       int64_t max_partial) {
  check(acc, x, dy);
  TORCH_CHECK(acc.dim() == 4 && acc.size(1) == x.size(1) && stride.size() == 2 && padding.size() == 2 &&
              dilation.size() == 2, "spare_harness.sal_tiles_conv: acc (OUT, C, KH, KW) with groups == 1");
  int64_t groups = 0;
  auto go = [&](auto tag) {
    using scalar_t = decltype(tag);
    groups = run_tiles(acc, spare::sal_conv_params(x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                                   x.size(0), x.size(1), x.size(2), x.size(3), acc.size(0),
                                                   acc.size(2), acc.size(3), dy.size(2), dy.size(3), stride.data(),
                                                   padding.data(), dilation.data(), square != 0),
                       target_blocks, max_partial);
  };
  if (x.scalar_type() == at::kHalf)
    go(at::Half{});
  else if (x.scalar_type() == at::kBFloat16)
    go(at::BFloat16{});
  else
    TORCH_CHECK(false, "spare_harness.sal_tiles_conv: x must be float16 or bfloat16, got ", x.scalar_type());
  return groups;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spare_harness, m) {
  m.def("sal_tiles_linear(Tensor(a!) acc, Tensor x, Tensor dy, int square, int target_blocks, int max_partial) -> int");
  m.def("sal_tiles_conv(Tensor(a!) acc, Tensor x, Tensor dy, int[] stride, int[] padding, int[] dilation, "
        "int square, int target_blocks, int max_partial) -> int");
  m.def("sal_split(int S, int tiles, int numel, int target_blocks, int max_partial) -> int[]",
        [](int64_t S, int64_t tiles, int64_t numel, int64_t target, int64_t max_partial) -> std::vector<int64_t> {
          const spare::SalSplit sp = spare::sal_split(S, tiles, numel, target, max_partial);
          return {sp.spg, sp.groups};
        });
  m.def("sal_use_tiles(int tokens, bool sixteen_bit) -> bool",
        [](int64_t tokens, bool sixteen) { return spare::sal_use_tiles(tokens, sixteen); });
  m.def("sal_tile() -> int[]", []() -> std::vector<int64_t> {
    return {spare::kSalTileO, spare::kSalTileI, spare::kSalStepT, spare::kSalThreads};
  });
}

TORCH_LIBRARY_IMPL(spare_harness, CPU, m) {
  m.impl("sal_tiles_linear", &sal_tiles_linear);
  m.impl("sal_tiles_conv", &sal_tiles_conv);
}
