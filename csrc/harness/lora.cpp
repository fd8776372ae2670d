// Host harness of the CUDA backend's masked LoRA and saliency kernels (csrc/cuda/lora_kernels.h): each
// op runs a kernel's per-thread body over the grid and block the test gives, in order (phased for the
// block-synchronised contract kernel; atomics as plain adds), on CPU tensors. Test-only: built by
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

// The contract kernel on one chunk g (rows of G from row0), phase 1 for every thread of a block, then
// phase 2, block by block; grid as the launcher computes it, `threads` per block.
void contract(const at::Tensor& g, int64_t row0, const at::Tensor& A, const at::Tensor& B, const at::Tensor& mask,
              int64_t kind, int64_t block_o, int64_t block_i, double scale, at::Tensor& dA, at::Tensor& dB,
              int64_t threads) {
  const at::Tensor gc = g.to(at::kFloat).contiguous(), Af = A.to(at::kFloat).contiguous();
  const at::Tensor Bf = B.to(at::kFloat).contiguous(), m = mask.contiguous();
  TORCH_CHECK(dA.scalar_type() == at::kFloat && dA.is_contiguous() && dB.scalar_type() == at::kFloat &&
              dB.is_contiguous(), "spare_harness.contract: dA / dB must be contiguous float32");
  const int64_t rows = gc.size(0), cols = gc.size(1), rank = Af.size(0);
  spare::ContractParams<float, float> p{gc.const_data_ptr<float>(), m.const_data_ptr(), Af.const_data_ptr<float>(),
                                        Bf.const_data_ptr<float>(), dA.numel() ? dA.mutable_data_ptr<float>() : nullptr,
                                        dB.numel() ? dB.mutable_data_ptr<float>() : nullptr, row0, rows, cols, rank,
                                        gc.stride(0), kind, block_o, block_i, static_cast<float>(scale)};
  TORCH_CHECK(threads >= spare::kContractRows * spare::kContractRanks,
              "spare_harness.contract: phase 2 needs at least ", spare::kContractRows * spare::kContractRanks, " threads");
  std::vector<float> smem(spare::kContractRows * spare::kContractRanks * threads);
  const Dim3 grid{spare::cdiv(rank, spare::kContractRanks), spare::cdiv(rows, spare::kContractRows), 1};
  spare::for_each_block_phased(grid, Dim3{threads, 1, 1},
                               [&](const Thread& t) { spare::contract_phase1(t, p, smem.data()); },
                               [&](const Thread& t) { spare::contract_phase2(t, p, smem.data()); });
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
  m.def("contract(Tensor g, int row0, Tensor A, Tensor B, Tensor mask, int kind, int block_o, int block_i, "
        "float scale, Tensor(a!) dA, Tensor(b!) dB, int threads) -> ()");
  m.def("accumulate(Tensor(a!) acc, Tensor g, int stat, int blocks, int threads) -> ()");
  m.def("contract_tile() -> int[]", []() -> std::vector<int64_t> {
    return {spare::kContractThreads, spare::kContractRows, spare::kContractRanks};
  });
  SPARE_DEFINE_WIRE_FORMAT(m);
}

TORCH_LIBRARY_IMPL(spare_harness, CPU, m) {
  m.impl("weff", &weff);
  m.impl("contract", &contract);
  m.impl("accumulate", &accumulate);
}
