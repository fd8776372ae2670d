// Host harness of the CUDA backend's masked LoRA and saliency kernels (csrc/cuda/lora_kernels.h): each
// op runs a kernel's per-thread body over the grid and block the test gives, in order or reversed
// (phased for the block-synchronised contract kernel), on CPU tensors. Test-only: built by
// tests/harness.py, never installed.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "common/schemas.h"
#include "cuda/lora_kernels.h"

namespace {

using spare::Dim3;
using spare::Thread;

Dim3 dim3_of(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() >= 1 && v.size() <= 3, "spare_harness: ", name, " must have 1 to 3 entries");
  Dim3 d;
  d.x = v[0];
  if (v.size() > 1) d.y = v[1];
  if (v.size() > 2) d.z = v[2];
  return d;
}

// weff_body over `grid` x `block`: w (rows, cols) of the output dtype, A (r, cols) / B (rows, r) fp32.
at::Tensor weff(const at::Tensor& w, const at::Tensor& A, const at::Tensor& B, const at::Tensor& mask, int64_t kind,
                int64_t block_o, int64_t block_i, double scale, at::IntArrayRef grid, at::IntArrayRef block) {
  const at::Tensor wc = w.contiguous(), Af = A.to(at::kFloat).contiguous(), Bf = B.to(at::kFloat).contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::full_like(wc, -12345.f);   // entries no thread wrote stand out
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "weff", [&] {
    spare::WeffParams<scalar_t, float, float, scalar_t> p{wc.const_data_ptr<scalar_t>(), Af.const_data_ptr<float>(),
                                                          Bf.const_data_ptr<float>(), m.const_data_ptr(),
                                                          out.mutable_data_ptr<scalar_t>(), wc.size(0), wc.size(1),
                                                          Af.size(0), wc.stride(0), kind, block_o, block_i,
                                                          static_cast<float>(scale)};
    spare::for_each_thread(dim3_of(grid, "grid"), dim3_of(block, "block"),
                           [&](const Thread& t) { spare::weff_body(t, p); });
  });
  return out;
}

// Blocks of `grid` in launch order, or reversed: a GPU runs them in any order, so a result that does not
// depend on it must come out bit-identical both ways.
template <typename F>
void for_each_block(spare::Dim3 grid, bool reverse, F&& f) {
  const int64_t n = grid.x * grid.y * grid.z;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = reverse ? n - 1 - i : i;
    f(Dim3{j % grid.x, (j / grid.x) % grid.y, j / (grid.x * grid.y)});
  }
}

// What lora.cu's contract_chunk launches for one region g of G (rows from row0, columns from col0; fp32 or
// 16-bit): the contract kernel (phase 1 for every thread of a block, then phase 2, block by block,
// `threads` per block) into dA partials that start as `fill` (every entry must be overwritten), then the
// reduction kernel over `reduce_blocks` x `reduce_threads`; blocks in reverse order when asked.
void contract(const at::Tensor& g, int64_t row0, int64_t col0, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i, double scale, at::Tensor& dA,
              at::Tensor& dB, int64_t threads, int64_t reduce_blocks, int64_t reduce_threads, double fill,
              bool reverse) {
  // a region sliced out of a whole G keeps its row stride (ldg > gcols), as a strided GEMM output would
  const at::Tensor gc = g.stride(1) == 1 ? g : g.contiguous(), Af = A.to(at::kFloat).contiguous();
  const at::Tensor Bf = B.to(at::kFloat).contiguous(), m = mask.contiguous();
  TORCH_CHECK(dA.scalar_type() == at::kFloat && dA.is_contiguous() && dB.scalar_type() == at::kFloat &&
              dB.is_contiguous(), "spare_harness.contract: dA / dB must be contiguous float32");
  const int64_t rows = gc.size(0), gcols = gc.size(1), rank = Af.size(0), cols = Af.size(1);
  TORCH_CHECK(col0 >= 0 && col0 + gcols <= cols, "spare_harness.contract: region columns out of range");
  TORCH_CHECK(threads >= spare::kContractRows * spare::kContractRanks,
              "spare_harness.contract: phase 2 needs at least ", spare::kContractRows * spare::kContractRanks, " threads");
  const int64_t tiles = spare::cdiv(rows, spare::kContractRows);
  at::Tensor part = at::full({tiles, rank, gcols}, fill, Af.options());
  float* part_ptr = dA.numel() ? part.mutable_data_ptr<float>() : nullptr;
  std::vector<float> smem(spare::kContractRows * spare::kContractRanks * threads);
  const Dim3 grid{spare::cdiv(rank, spare::kContractRanks), tiles, 1}, block{threads, 1, 1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "contract", [&] {
    spare::ContractParams<scalar_t, float, float> p{gc.const_data_ptr<scalar_t>(), m.const_data_ptr(),
                                                    Af.const_data_ptr<float>(), Bf.const_data_ptr<float>(), part_ptr,
                                                    dB.numel() ? dB.mutable_data_ptr<float>() : nullptr, row0, rows,
                                                    col0, gcols, cols, rank, gc.stride(0), kind, block_o, block_i,
                                                    static_cast<float>(scale)};
    for_each_block(grid, reverse, [&](Dim3 b) {
      for (int64_t tx = 0; tx < threads; ++tx) spare::contract_phase1(Thread{b, Dim3{tx, 1, 1}, grid, block}, p, smem.data());
      for (int64_t tx = 0; tx < threads; ++tx) spare::contract_phase2(Thread{b, Dim3{tx, 1, 1}, grid, block}, p, smem.data());
    });
  });
  if (part_ptr == nullptr) return;
  const spare::ReduceParams rp{part.const_data_ptr<float>(), dA.mutable_data_ptr<float>(), tiles, rank, gcols, col0,
                               cols, static_cast<float>(scale)};
  const Dim3 rgrid{reduce_blocks, 1, 1}, rblock{reduce_threads, 1, 1};
  for_each_block(rgrid, reverse, [&](Dim3 b) {
    for (int64_t i = 0; i < reduce_threads; ++i) {
      const int64_t tx = reverse ? reduce_threads - 1 - i : i;
      spare::contract_reduce_body(Thread{b, Dim3{tx, 1, 1}, rgrid, rblock}, rp);
    }
  });
}

// spare::block_regions of a (nbo, nbi) bool tile mask, flattened [o0, o1, c0, c1, ...].
std::vector<int64_t> block_regions(const at::Tensor& tiles, int64_t out, int64_t cols, int64_t block_o,
                                   int64_t block_i, int64_t quantum, int64_t merge_rows) {
  const at::Tensor t = tiles.to(at::kBool).contiguous();
  TORCH_CHECK(t.dim() == 2 && t.size(0) == spare::cdiv(out, block_o) && t.size(1) == spare::cdiv(cols, block_i),
              "spare_harness.block_regions: tile mask shape");
  std::vector<spare::Region> regions;
  spare::block_regions(t.const_data_ptr<bool>(), out, cols, block_o, block_i, quantum, merge_rows, regions);
  std::vector<int64_t> flat;
  for (const auto& r : regions) flat.insert(flat.end(), {r.o0, r.o1, r.c0, r.c1});
  return flat;
}

// accumulate_body: acc (numel,) fp32 += Σ_i f(g[i]) over g (n, numel).
void accumulate(at::Tensor& acc, const at::Tensor& g, int64_t stat, int64_t blocks, int64_t threads) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous(), "spare_harness.accumulate: acc float32");
  const at::Tensor gc = g.reshape({g.size(0), acc.numel()}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "accumulate", [&] {
    spare::AccumulateParams<scalar_t> p{gc.const_data_ptr<scalar_t>(), acc.mutable_data_ptr<float>(), gc.size(0),
                                        acc.numel(), gc.stride(0), stat};
    spare::for_each_thread(Dim3{blocks, 1, 1}, Dim3{threads, 1, 1},
                           [&](const Thread& t) { spare::accumulate_body(t, p); });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spare_harness, m) {
  m.def("weff(Tensor w, Tensor A, Tensor B, Tensor mask, int kind, int block_o, int block_i, float scale, "
        "int[] grid, int[] block) -> Tensor");
  m.def("contract(Tensor g, int row0, int col0, Tensor A, Tensor B, Tensor mask, int kind, int block_o, "
        "int block_i, float scale, Tensor(a!) dA, Tensor(b!) dB, int threads, int reduce_blocks, int reduce_threads, "
        "float fill, bool reverse) -> ()");
  m.def("block_regions(Tensor tiles, int out, int cols, int block_o, int block_i, int quantum, int merge_rows) "
        "-> int[]");
  m.def("accumulate(Tensor(a!) acc, Tensor g, int stat, int blocks, int threads) -> ()");
  m.def("contract_step(int rows, int gcols, int rank, int scratch) -> int", [](int64_t rows, int64_t gcols,
                                                                             int64_t rank, int64_t scratch) {
    return spare::contract_step(rows, gcols, rank, scratch);
  });
  m.def("contract_tile() -> int[]", []() -> std::vector<int64_t> {
    return {spare::kContractThreads, spare::kContractRows, spare::kContractRanks, spare::kReduceThreads};
  });
  SPARE_DEFINE_WIRE_FORMAT(m);
}

TORCH_LIBRARY_IMPL(spare_harness, CPU, m) {
  m.impl("weff", &weff);
  m.impl("contract", &contract);
  m.impl("block_regions", &block_regions);
  m.impl("accumulate", &accumulate);
}
