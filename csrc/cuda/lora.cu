// Masked LoRA linear / conv2d on CUDA: base GEMMs and convolutions through ATen (cuBLAS, cuDNN); the
// effective weight and the masked weight-gradient contraction through the kernels of lora_kernels.h.
// Element and block masks: W_eff = W + s·M⊙(B·A) built in one pass in the activation dtype (no fp32
// delta), used by one GEMM / convolution forward and for dx; dA / dB from regions of G, in row chunks of
// at most kScratchEntries, through the fused mask-and-contract kernel and a fixed-order reduction
// (deterministic). Linear G: 16-bit in, fp32 out; conv G: the activations' dtype (16-bit wgrad). Block
// masks compute G only over their runs of on tile rows and those runs' column spans (block_regions).
// Row masks and no mask: factored (x·Aᵀ, then B), never an out×in tensor.
#include "spare_cuda.h"

#include "lora_kernels.h"

#include <algorithm>
#include <array>
#include <mutex>
#include <vector>

namespace spare_cuda {

using spare::Thread;

namespace {

template <typename TW, typename TA, typename TB, typename TO>
__global__ void weff_kernel(spare::WeffParams<TW, TA, TB, TO> p) {
  spare::weff_body(spare::this_thread(), p);
}

template <typename TG, typename TA, typename TB>
__global__ void __launch_bounds__(spare::kContractThreads) contract_kernel(spare::ContractParams<TG, TA, TB> p) {
  __shared__ float smem[spare::kContractSmem];
  const Thread t = spare::this_thread();
  spare::contract_phase1(t, p, smem);
  __syncthreads();
  spare::contract_phase2(t, p, smem);
}

__global__ void contract_reduce_kernel(spare::ReduceParams p) {
  spare::contract_reduce_body(spare::this_thread(), p);
}

}  // namespace

void check_inputs(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const at::Tensor* first = nullptr;
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->is_cuda(), "spare_kernels_cuda.", op, ": ", name, " must be a CUDA tensor, got ", t->device());
    if (first == nullptr) first = t;
    TORCH_CHECK(t->device() == first->device(), "spare_kernels_cuda.", op, ": ", name, " is on ", t->device(),
                " but the other inputs are on ", first->device());
  }
}

void check_mask(const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o, int64_t block_i,
                int64_t out, int64_t cols, const at::Device& dev) {
  TORCH_CHECK(kind >= spare::kNone && kind <= spare::kRow, "spare_kernels_cuda: unknown mask kind ", kind);
  if (kind == spare::kNone) return;
  TORCH_CHECK(mask.has_value(), "spare_kernels_cuda: mask kind ", kind, " needs mask data");
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == dev, "spare_kernels_cuda: mask is on ", m.device(), ", inputs on ", dev);
  if (kind == spare::kElement) {
    TORCH_CHECK(m.scalar_type() == at::kByte && m.dim() == 2 && m.size(0) == out &&
                    m.size(1) == spare::mask_row_bytes(cols),
                "spare_kernels_cuda: element mask must be uint8 (", out, ", ", spare::mask_row_bytes(cols),
                "), got ", m.scalar_type(), " ", m.sizes());
  } else if (kind == spare::kBlock) {
    TORCH_CHECK(block_o > 0 && block_i > 0, "spare_kernels_cuda: block sizes must be positive, got ", block_o,
                "x", block_i);
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == spare::cdiv(out, block_o) &&
                    m.size(1) == spare::cdiv(cols, block_i),
                "spare_kernels_cuda: block mask must be bool (", spare::cdiv(out, block_o), ", ",
                spare::cdiv(cols, block_i), "), got ", m.scalar_type(), " ", m.sizes());
  } else {
    TORCH_CHECK(m.scalar_type() == at::kBool && m.numel() == out, "spare_kernels_cuda: row mask must be bool with ",
                out, " entries, got ", m.scalar_type(), " ", m.sizes());
  }
}

at::Tensor effective_weight(const at::Tensor& w2, const at::Tensor& A2, const at::Tensor& B, const at::Tensor& mask,
                            int64_t kind, int64_t block_o, int64_t block_i, double scale, at::ScalarType dtype) {
  const int64_t rows = w2.size(0), cols = w2.size(1), rank = A2.size(0);
  // W in the output dtype first (a no-op in the usual case, weight dtype == activation dtype): one
  // storage type per instantiation instead of nine.
  at::Tensor w = w2.to(dtype);
  if (w.stride(1) != 1) w = w.contiguous();
  const at::Tensor Af = A2.to(at::kFloat).contiguous(), Bf = B.to(at::kFloat).contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty({rows, cols}, w.options());
  if (out.numel() == 0) return out;
  const dim3 grid(static_cast<unsigned>(spare::cdiv(cols, spare::kWeffThreads)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SPARE_DISPATCH_ACTIVATION(dtype, "spare_kernels_cuda.effective_weight", [&] {
    spare::WeffParams<scalar_t, float, float, scalar_t> p{w.const_data_ptr<scalar_t>(), Af.const_data_ptr<float>(),
                                                          Bf.const_data_ptr<float>(), m.const_data_ptr(),
                                                          out.mutable_data_ptr<scalar_t>(), rows, cols, rank,
                                                          w.stride(0), kind, block_o, block_i,
                                                          static_cast<float>(scale)};
    weff_kernel<<<grid, spare::kWeffThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void contract_chunk(const at::Tensor& g, int64_t row0, int64_t col0, const at::Tensor& Af, const at::Tensor& Bf,
                    const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i, double scale,
                    at::Tensor& dA, at::Tensor& dB) {
  const int64_t rows = g.size(0), gcols = g.size(1), rank = Af.size(0), cols = Af.size(1);
  if (rows == 0 || gcols == 0 || rank == 0) return;
  TORCH_CHECK(g.stride(1) == 1 && col0 >= 0 && col0 + gcols <= cols && rows <= spare::kContractMaxRows,
              "spare_kernels_cuda: internal error, G region layout");
  const at::Tensor m = mask.contiguous();
  const int64_t tiles = spare::cdiv(rows, spare::kContractRows);
  // dA partials, one (rank, gcols) slab per row tile: every entry is stored by one thread (no zero fill)
  const at::Tensor part = dA.defined() ? at::empty({tiles, rank, gcols}, Af.options()) : at::Tensor();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(spare::cdiv(rank, spare::kContractRanks)), static_cast<unsigned>(tiles));
  SPARE_DISPATCH_ACTIVATION(g.scalar_type(), "spare_kernels_cuda.contract", [&] {
    spare::ContractParams<scalar_t, float, float> p{g.const_data_ptr<scalar_t>(), m.const_data_ptr(),
                                                    Af.const_data_ptr<float>(), Bf.const_data_ptr<float>(),
                                                    part.defined() ? part.mutable_data_ptr<float>() : nullptr,
                                                    dB.defined() ? dB.mutable_data_ptr<float>() : nullptr,
                                                    row0, rows, col0, gcols, cols, rank, g.stride(0), kind,
                                                    block_o, block_i, static_cast<float>(scale)};
    contract_kernel<<<grid, spare::kContractThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!dA.defined()) return;
  // grid-strided: at most kReduceBlocks blocks (8 per SM of an H100's 132 fill it; more only add tails)
  constexpr int64_t kReduceBlocks = 8 * 132;
  const spare::ReduceParams rp{part.const_data_ptr<float>(), dA.mutable_data_ptr<float>(), tiles, rank, gcols,
                               col0, cols, static_cast<float>(scale)};
  const auto blocks = std::min(spare::cdiv(rank * gcols, spare::kReduceThreads), kReduceBlocks);
  contract_reduce_kernel<<<static_cast<unsigned>(blocks), spare::kReduceThreads, 0, stream>>>(rp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// Block regions per mask tensor: the tile mask lives on the GPU and the regions are planned on the host,
// so a miss costs one device-to-host copy (a synchronisation); masks are fixed while an adapter trains,
// so each mask is copied once. Keyed by the tensor (a weak reference: a freed mask never matches a new
// one at the same address), its version counter (an in-place change replans) and the geometry.
struct RegionPlan {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> mask;
  uint32_t version;
  std::array<int64_t, 5> geometry;
  std::vector<spare::Region> regions;
};
std::mutex plan_mutex;
std::vector<RegionPlan> plans;
constexpr size_t kMaxPlans = 4096;   // SD-1.5 has < 300 patchable layers; a bound, not a working size

// Runs of on tile rows closer than this are merged into one GEMM: the gap's extra rows cost
// 2·N·span·gap FLOPs, a second GEMM re-reads x (N·span·2 B); they break even at gap ≈ mma16 rate /
// bandwidth ≈ 790e12 / 3.0e12 ≈ 263 rows on an H100 (costmodel.H100), before the second launch's cost.
constexpr int64_t kMergeRows = 256;

}  // namespace

std::vector<spare::Region> contract_regions(const at::Tensor& mask, int64_t kind, int64_t block_o, int64_t block_i,
                                            int64_t out, int64_t cols, int64_t quantum) {
  if (kind != spare::kBlock) return {spare::Region{0, out, 0, cols}};
  const std::array<int64_t, 5> geometry{block_o, block_i, out, cols, quantum};
  // an inference tensor has no version counter (and cannot change outside inference mode)
  c10::TensorImpl* impl = mask.unsafeGetTensorImpl();
  const uint32_t version = mask.is_inference() ? 0 : impl->version_counter().current_version();
  {
    const std::lock_guard<std::mutex> lock(plan_mutex);
    for (const RegionPlan& p : plans)
      if (!p.mask.expired() && p.mask._unsafe_get_target() == impl &&
          p.version == version && p.geometry == geometry)
        return p.regions;
  }
  const at::Tensor host = mask.to(at::kCPU).contiguous();
  std::vector<spare::Region> regions;
  spare::block_regions(host.const_data_ptr<bool>(), out, cols, block_o, block_i, quantum, kMergeRows, regions);
  const std::lock_guard<std::mutex> lock(plan_mutex);
  plans.erase(std::remove_if(plans.begin(), plans.end(), [](const RegionPlan& p) { return p.mask.expired(); }),
              plans.end());
  if (plans.size() >= kMaxPlans) plans.clear();
  plans.push_back(RegionPlan{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                 mask.getIntrusivePtr()),
                             version, geometry, regions});
  return regions;
}

namespace {

bool masked(int64_t kind) { return kind == spare::kElement || kind == spare::kBlock; }

// lora_B of the factored paths with a row mask's rows zeroed (exact: the factor is 0 or 1), in dtype;
// the scale stays an fp32 scalar (GEMM alpha, scalar multiply), never rounded to dtype.
at::Tensor masked_B(const at::Tensor& B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t out,
                    at::ScalarType dtype) {
  at::Tensor b = B.reshape({out, -1}).to(dtype);
  return kind == spare::kRow ? b * mask->reshape({out, 1}).to(dtype) : b;
}

// Shapes the kernels index by raw pointer: refused by name rather than read out of bounds.
void check_adapter(const char* op, const at::Tensor& A, const at::Tensor& B, int64_t out, int64_t cols) {
  const int64_t r = A.size(0);
  TORCH_CHECK(A.numel() == r * cols, "spare_kernels_cuda.", op, ": lora_A must have ", cols,
              " entries per rank (the weight's columns), got ", A.sizes());
  TORCH_CHECK(B.numel() == out * r, "spare_kernels_cuda.", op, ": lora_B must be (", out, ", ", r, "), got ",
              B.sizes());
}

at::Tensor empty_like_none(const at::Tensor& x) { return at::empty({0}, x.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& x, at::Tensor dx, at::Tensor dA,
                                                      at::Tensor dB, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B) {
  return {dx.defined() ? dx : empty_like_none(x), dA.defined() ? dA.to(lora_A.scalar_type()) : empty_like_none(x),
          dB.defined() ? dB.to(lora_B.scalar_type()) : empty_like_none(x)};
}

// A conv's LoRA A applied to every group (ΔW[o] only sees the inputs of o's group: DESIGN §1).
at::Tensor conv_A_factored(const at::Tensor& A, int64_t groups, at::ScalarType dtype) {
  at::Tensor a = A.to(dtype);
  return groups > 1 ? a.repeat({groups, 1, 1, 1}) : a;
}

void check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && groups > 0 && x.size(1) == weight.size(1) * groups &&
                  weight.size(0) % groups == 0,
              "spare_kernels_cuda.", op, ": x (N, C, H, W) and weight (out, C/groups, kh, kw) expected, got ",
              x.sizes(), " and ", weight.sizes(), " with groups ", groups);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "spare_kernels_cuda.", op,
              ": stride, padding and dilation must have 2 entries each");
}

}  // namespace

// ---------------------------------------------------------------------------------------- linear
at::Tensor masked_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
                              int64_t block_i, double scale) {
  check_inputs("masked_lora_linear", {{"x", &x}, {"weight", &weight}, {"lora_A", &lora_A}, {"lora_B", &lora_B}});
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  const int64_t out = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols, "spare_kernels_cuda.masked_lora_linear: x must be (N, ", cols,
              "), got ", x.sizes());
  check_adapter("masked_lora_linear", lora_A, lora_B, out, cols);
  check_mask(mask, kind, block_o, block_i, out, cols, x.device());
  const auto dt = x.scalar_type();
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->to(dt)) : std::nullopt;
  if (masked(kind)) {
    const at::Tensor w = effective_weight(weight, lora_A, lora_B, *mask, kind, block_o, block_i, scale, dt);
    return at::linear(x, w, b);
  }
  at::Tensor y = at::linear(x, weight.to(dt), b);
  const at::Tensor h = at::mm(x, lora_A.to(dt).t());                                    // (N, r)
  return y.addmm_(h, masked_B(lora_B, mask, kind, out, dt).t(), 1, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lora_linear_backward(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
    int64_t block_i, double scale, bool need_dx, bool need_dA, bool need_dB) {
  check_inputs("masked_lora_linear_backward",
               {{"dy", &dy_in}, {"x", &x}, {"weight", &weight}, {"lora_A", &lora_A}, {"lora_B", &lora_B}});
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  const int64_t out = weight.size(0), cols = weight.size(1), r = lora_A.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols && dy_in.dim() == 2 && dy_in.size(0) == x.size(0) &&
                  dy_in.size(1) == out,
              "spare_kernels_cuda.masked_lora_linear_backward: x (N, ", cols, ") and dy (N, ", out, ") expected, got ",
              x.sizes(), " and ", dy_in.sizes());
  check_adapter("masked_lora_linear_backward", lora_A, lora_B, out, cols);
  check_mask(mask, kind, block_o, block_i, out, cols, x.device());
  const auto dt = x.scalar_type();
  const at::Tensor dy = dy_in.to(dt);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx, dA, dB;
  if (masked(kind)) {
    if (need_dA || need_dB) {
      if (need_dA) dA = at::zeros({r, cols}, f32);
      // zeros: the regions skip a block mask's off rows (dB) and columns (dA), and a weight without
      // columns writes none
      if (need_dB) dB = at::zeros({out, r}, f32);
      // G[o0:o1, c0:c1] = dy[:, o0:o1]ᵀ · x[:, c0:c1]: strided views (cuBLAS takes the leading
      // dimensions), 16-bit in, fp32 out (mm_f32)
      const at::Tensor dyt = dy.t();
      masked_contract([&](int64_t o0, int64_t o1, int64_t c0, int64_t c1) {
        return mm_f32(dyt.slice(0, o0, o1), x.slice(1, c0, c1));
      }, out, cols, lora_A, lora_B, *mask, kind, block_o, block_i, scale, 1, dA, dB);
    }
    if (need_dx)
      dx = at::mm(dy, effective_weight(weight, lora_A, lora_B, *mask, kind, block_o, block_i, scale, dt));
    return finish(x, dx, dA, dB, lora_A, lora_B);
  }
  const at::Tensor A = lora_A.to(dt), B = lora_B.to(dt);
  at::Tensor dys = dy * scale;                                                          // (N, out)
  if (kind == spare::kRow) dys.mul_(mask->reshape({1, out}).to(dt));
  const at::Tensor dh = at::mm(dys, B);                                                 // (N, r)
  if (need_dB) dB = at::mm(dys.t(), at::mm(x, A.t()));
  if (need_dA) dA = at::mm(dh.t(), x);
  if (need_dx) dx = at::mm(dy, weight.to(dt)).addmm_(dh, A);
  return finish(x, dx, dA, dB, lora_A, lora_B);
}

// ---------------------------------------------------------------------------------------- conv2d
at::Tensor masked_lora_conv2d(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
                              int64_t block_i, double scale, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups) {
  check_inputs("masked_lora_conv2d", {{"x", &x}, {"weight", &weight}, {"lora_A", &lora_A}, {"lora_B", &lora_B}});
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  const int64_t out = weight.size(0), cols = weight[0].numel(), r = lora_A.size(0);
  check_conv("masked_lora_conv2d", x, weight, stride, padding, dilation, groups);
  check_adapter("masked_lora_conv2d", lora_A, lora_B, out, cols);
  check_mask(mask, kind, block_o, block_i, out, cols, x.device());
  const auto dt = x.scalar_type();
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->to(dt)) : std::nullopt;
  if (masked(kind)) {
    const at::Tensor w = effective_weight(weight.reshape({out, cols}), lora_A.reshape({r, cols}), lora_B, *mask,
                                          kind, block_o, block_i, scale, dt);
    return at::conv2d(x, w.view(weight.sizes()), b, stride, padding, dilation, groups);
  }
  at::Tensor y = at::conv2d(x, weight.to(dt), b, stride, padding, dilation, groups);
  const at::Tensor z = at::conv2d(x, conv_A_factored(lora_A, groups, dt), std::nullopt, stride, padding, dilation,
                                  groups);
  const at::Tensor Bs = masked_B(lora_B, mask, kind, out, dt);
  const std::vector<int64_t> one(2, 1), zero(2, 0);
  return y.add_(at::conv2d(z, Bs.unsqueeze(-1).unsqueeze(-1), std::nullopt, one, zero, one, groups), scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_lora_conv2d_backward(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& mask, int64_t kind, int64_t block_o,
    int64_t block_i, double scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool need_dx, bool need_dA, bool need_dB) {
  check_inputs("masked_lora_conv2d_backward",
               {{"dy", &dy_in}, {"x", &x}, {"weight", &weight}, {"lora_A", &lora_A}, {"lora_B", &lora_B}});
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  const int64_t out = weight.size(0), cols = weight[0].numel(), r = lora_A.size(0);
  check_conv("masked_lora_conv2d_backward", x, weight, stride, padding, dilation, groups);
  TORCH_CHECK(dy_in.dim() == 4 && dy_in.size(0) == x.size(0) && dy_in.size(1) == out,
              "spare_kernels_cuda.masked_lora_conv2d_backward: dy must be (", x.size(0), ", ", out, ", H', W'), got ",
              dy_in.sizes());
  check_adapter("masked_lora_conv2d_backward", lora_A, lora_B, out, cols);
  check_mask(mask, kind, block_o, block_i, out, cols, x.device());
  const auto dt = x.scalar_type();
  const at::Tensor dy = dy_in.to(dt);
  const auto f32 = x.options().dtype(at::kFloat);
  const std::vector<int64_t> no_pad(2, 0);
  at::Tensor dx, dA, dB;
  if (masked(kind)) {
    if (need_dA || need_dB) {
      if (need_dA) dA = at::zeros({r, cols}, f32);
      // zeros: the regions skip a block mask's off rows (dB) and columns (dA), and a weight without
      // columns writes none
      if (need_dB) dB = at::zeros({out, r}, f32);
      // cuDNN's weight gradient of output channels [o0, o1) x input channels [c0, c1) / (kh·kw) (whole
      // groups: a slice of channels of a grouped conv is not a conv; SD-1.5's convs have one group),
      // on the activations' own dtype: for 16-bit activations the 16-bit wgrad (fp32 accumulation in
      // cuDNN, G rounded to 16 bits on output: half the bytes and twice the rate of an fp32/TF32 wgrad on
      // upcast copies; the contraction reads it in fp32; fp16's range as torch's own fp16 conv backward:
      // an entry past 65504 becomes inf, which a GradScaler sees and backs off), for fp32 activations as
      // before. The weight argument only gives the region's shape.
      const int64_t kk = weight.size(2) * weight.size(3);
      std::vector<int64_t> wsz(weight.sizes().begin(), weight.sizes().end());
      auto gregion = [&](int64_t o0, int64_t o1, int64_t c0, int64_t c1) {
        const bool all_o = o0 == 0 && o1 == out, all_c = c0 == 0 && c1 == cols;
        const at::Tensor dyc = all_o ? dy : dy.slice(1, o0, o1);
        const at::Tensor xc = all_c ? x : x.slice(1, c0 / kk, c1 / kk);
        wsz[0] = o1 - o0;
        wsz[1] = (c1 - c0) / kk;
        const auto grads = at::convolution_backward(dyc, xc, at::empty(wsz, x.options()), std::nullopt, stride,
                                                    padding, dilation, false, no_pad, groups, {false, true, false});
        return std::get<1>(grads).reshape({o1 - o0, c1 - c0});
      };
      if (groups == 1) {
        masked_contract(gregion, out, cols, lora_A.reshape({r, cols}), lora_B, *mask, kind, block_o, block_i,
                        scale, kk, dA, dB);
      } else {
        contract_chunk(gregion(0, out, 0, cols), 0, 0, lora_A.reshape({r, cols}).to(at::kFloat).contiguous(),
                       lora_B.to(at::kFloat).contiguous(), *mask, kind, block_o, block_i, scale, dA, dB);
      }
      if (need_dA) dA = dA.view(lora_A.sizes());
    }
    if (need_dx) {
      const at::Tensor w = effective_weight(weight.reshape({out, cols}), lora_A.reshape({r, cols}), lora_B, *mask,
                                            kind, block_o, block_i, scale, dt);
      dx = std::get<0>(at::convolution_backward(dy, x, w.view(weight.sizes()), std::nullopt, stride, padding,
                                                dilation, false, no_pad, groups, {true, false, false}));
    }
    return finish(x, dx, dA, dB, lora_A, lora_B);
  }
  const at::Tensor Af = conv_A_factored(lora_A, groups, dt);
  const at::Tensor B4 = lora_B.reshape({out, r}).to(dt).unsqueeze(-1).unsqueeze(-1);
  at::Tensor dys = dy * scale;
  if (kind == spare::kRow) dys.mul_(mask->reshape({1, out, 1, 1}).to(dt));
  const std::vector<int64_t> one(2, 1);
  // dz = conv_transpose(dys, B): the gradient of the rank-r intermediate z = conv(x, A).
  at::Tensor dz;
  if (need_dA || need_dx) dz = at::conv_transpose2d(dys, B4, std::nullopt, one, no_pad, no_pad, groups, one);
  if (need_dB) {
    const at::Tensor z = at::conv2d(x, Af, std::nullopt, stride, padding, dilation, groups);
    dB = std::get<1>(at::convolution_backward(dys, z, B4, std::nullopt, one, no_pad, one, false, no_pad, groups,
                                              {false, true, false}))
             .reshape({out, r});
  }
  if (need_dA) {
    const at::Tensor dAf = std::get<1>(at::convolution_backward(dz, x, Af, std::nullopt, stride, padding, dilation,
                                                                false, no_pad, groups, {false, true, false}));
    dA = dAf.reshape({groups, r, -1}).sum(0).view(lora_A.sizes());
  }
  if (need_dx) {
    dx = std::get<0>(at::convolution_backward(dy, x, weight.to(dt), std::nullopt, stride, padding, dilation, false,
                                              no_pad, groups, {true, false, false}))
             .add_(std::get<0>(at::convolution_backward(dz, x, Af, std::nullopt, stride, padding, dilation, false,
                                                        no_pad, groups, {true, false, false})));
  }
  return finish(x, dx, dA, dB, lora_A, lora_B);
}

}  // namespace spare_cuda
