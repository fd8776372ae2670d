// Saliency statistics on CUDA (DESIGN §1).
// - grad_abs / signed: one GEMM (cuBLAS, 16-bit in, fp32 out) or cuDNN weight gradient of the whole batch,
//   then acc += |G| or G.
// - sample_abs / sample_sq, 16-bit inputs, at most kSalTileMaxTokens tokens (pixels) per sample, convs with
//   groups == 1: the tile kernel of saliency_kernels.h: each block accumulates its weight tile's per-sample
//   gradient in WMMA fragments (bf16 / fp16 in, fp32 accumulate) and folds |g_i| or g_i² into the tile's
//   statistic before the next sample; no per-sample gradient in memory. When the weight has too few tiles
//   to fill the GPU, the samples are split over blocks and the partials added in group order
//   (deterministic). Why the token bound: saliency_kernels.h, sal_use_tiles.
// - the other per-sample cases (many tokens, fp32 inputs, grouped convs): per-sample gradients of a chunk of
//   samples into a scratch of at most kScratchEntries entries (a batched GEMM; for convs one grouped cuDNN
//   weight gradient with the samples as groups), then acc += Σ_i |g_i| or g_i²: the scratch traffic adds
//   ≈ 1200/T of the GEMM's time (≲ 0.3 at T = 4096; less while the chunk stays in L2), and there cuBLAS's
//   GEMM outruns the tile kernel's. Tokens-per-sample 1 (linear): |g_i| = |dy_i|⊗|x_i|, one GEMM.
#include "spare_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <mma.h>

#include <limits>

#include "lora_kernels.h"
#include "saliency_kernels.h"

namespace spare_cuda {

namespace {

template <typename TG>
__global__ void accumulate_kernel(spare::AccumulateParams<TG> p) {
  spare::accumulate_body(spare::this_thread(), p);
}

// ------------------------------------------------------------------------------ per-sample tile kernel
template <typename TG>
struct WmmaIn;
template <>
struct WmmaIn<c10::Half> {
  using type = __half;
};
template <>
struct WmmaIn<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// The device's MMA policy of sample_tile_block: WMMA 16×16×16, 16-bit in (same bits as c10's types), fp32
// accumulate; fragments are warp-collective, every lane calls these.
template <typename TG>
struct WmmaMma {
  using In = typename WmmaIn<TG>::type;
  using Frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, In, nvcuda::wmma::col_major>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, In, nvcuda::wmma::row_major>;
  static_assert(sizeof(In) == sizeof(TG), "c10's 16-bit types and CUDA's share their bits");
  __device__ static void zero(Frag& f) { nvcuda::wmma::fill_fragment(f, 0.f); }
  __device__ static void load_a(AFrag& a, const TG* p, int64_t ld) {
    nvcuda::wmma::load_matrix_sync(a, reinterpret_cast<const In*>(p), static_cast<unsigned>(ld));
  }
  __device__ static void load_b(BFrag& b, const TG* p, int64_t ld) {
    nvcuda::wmma::load_matrix_sync(b, reinterpret_cast<const In*>(p), static_cast<unsigned>(ld));
  }
  __device__ static void mma(Frag& c, const AFrag& a, const BFrag& b) { nvcuda::wmma::mma_sync(c, a, b, c); }
  // element e of g and of tot are the same (row, col): both accumulator fragments of one shape
  __device__ static void fold(Frag& tot, const Frag& g, bool square) {
#pragma unroll
    for (int e = 0; e < Frag::num_elements; ++e) tot.x[e] += square ? g.x[e] * g.x[e] : fabsf(g.x[e]);
  }
  __device__ static void store(float* dst, int64_t ld, const Frag& f) {
    nvcuda::wmma::store_matrix_sync(dst, f, static_cast<unsigned>(ld), nvcuda::wmma::mem_row_major);
  }
};

// The device's block policy: this thread's warp state in registers; barriers between phases.
template <typename Frag>
struct DeviceBlock {
  spare::SalWarpState<Frag> st;
  template <typename F>
  __device__ void threads(F&& f) {
    f(static_cast<int64_t>(threadIdx.x));
    __syncthreads();
  }
  template <typename F>
  __device__ void warps(F&& f) {
    f(static_cast<int64_t>(threadIdx.x / 32), st, spare::Lanes{static_cast<int64_t>(threadIdx.x % 32), 32});
  }
  __device__ void sync() { __syncthreads(); }
};

// grid (tiles, groups), kSalThreads threads; 2 × 4.5 KiB of 16-bit staging + 4 KiB of fragment slots.
// ptxas -v (nvcc 13): fp16 128 registers, bf16 166 (asking for 4 blocks per SM, i.e. ≤ 128, spilled ≈ 290 B).
template <typename TG>
__global__ void __launch_bounds__(spare::kSalThreads) sample_tile_kernel(spare::SampleTileParams<TG> p) {
  __shared__ __align__(32) uint16_t sa[spare::kSalStageElems];
  __shared__ __align__(32) uint16_t sb[spare::kSalStageElems];
  __shared__ __align__(32) float so[spare::kSalOutFloats];
  static_assert(sizeof(TG) == sizeof(uint16_t), "16-bit activations only");
  DeviceBlock<typename WmmaMma<TG>::Frag> b;
  spare::sample_tile_block<WmmaMma<TG>>(b, p, blockIdx.x, blockIdx.y, reinterpret_cast<TG*>(sa),
                                        reinterpret_cast<TG*>(sb), so);
}

__global__ void sample_reduce_kernel(spare::SampleReduceParams p) {
  spare::sample_reduce_body(spare::this_thread(), p);
}

int64_t sm_count(const at::Device& dev) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev.index()));
  return n;
}

// acc += Σ_i |g_i| or g_i² through the tile kernel; p's pointers and shapes set, out / split filled here.
template <typename TG>
void launch_sample_tiles(at::Tensor& acc, spare::SampleTileParams<TG> p) {
  const int64_t numel = p.OUT * p.IN, tiles = spare::sal_tiles(p.OUT, p.IN);
  if (numel == 0) return;   // an empty weight: no blocks to launch
  TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(), "spare_kernels_cuda.saliency: weight too large");
  const spare::SalSplit sp = spare::sal_split(p.S, tiles, numel, spare::kSalBlocksPerSM * sm_count(acc.device()),
                                              kScratchEntries);
  p.spg = sp.spg;
  p.groups = sp.groups;
  at::Tensor part;
  if (p.groups > 1) {
    part = at::empty({p.groups, numel}, acc.options());   // every entry written by its group's blocks
    p.out = part.mutable_data_ptr<float>();
  } else {
    p.out = acc.mutable_data_ptr<float>();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  sample_tile_kernel<TG><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.groups)), spare::kSalThreads, 0,
                           stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.groups > 1) {
    const spare::SampleReduceParams r{part.const_data_ptr<float>(), acc.mutable_data_ptr<float>(), numel, p.groups};
    const int64_t blocks = std::min<int64_t>(spare::cdiv(numel, spare::kAccThreads), 132 * 16);
    sample_reduce_kernel<<<static_cast<unsigned>(blocks), spare::kAccThreads, 0, stream>>>(r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool sixteen_bit(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

#define SPARE_DISPATCH_16BIT(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_acc(const char* op, const at::Tensor& acc) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous(), "spare_kernels_cuda.", op,
              ": acc must be a contiguous float32 tensor, got ", acc.scalar_type(),
              acc.is_contiguous() ? "" : " (not contiguous)");
}

bool per_sample(int64_t stat) { return stat == spare::kSampleAbs || stat == spare::kSampleSq; }

}  // namespace

int64_t stat_code(std::string_view stat) {
  if (stat == "grad_abs") return spare::kGradAbs;
  if (stat == "signed") return spare::kSigned;
  if (stat == "sample_abs") return spare::kSampleAbs;
  if (stat == "sample_sq") return spare::kSampleSq;
  TORCH_CHECK(false, "spare_kernels_cuda: stat must be one of grad_abs, signed, sample_abs, sample_sq; got '",
              std::string(stat), "'");
  return -1;
}

void accumulate(at::Tensor& acc, const at::Tensor& g, int64_t stat) {
  const int64_t n = g.size(0), numel = acc.numel();
  if (n == 0 || numel == 0) return;
  const at::Tensor gc = g.reshape({n, numel});
  const at::Tensor gg = gc.stride(1) == 1 ? gc : gc.contiguous();
  // Enough blocks to fill the GPU several times over (132 SMs on an H100 x 16), grid-strided beyond.
  const int64_t blocks = std::min<int64_t>(spare::cdiv(numel, spare::kAccThreads), 132 * 16);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  SPARE_DISPATCH_ACTIVATION(gg.scalar_type(), "spare_kernels_cuda.accumulate", [&] {
    spare::AccumulateParams<scalar_t> p{gg.const_data_ptr<scalar_t>(), acc.mutable_data_ptr<float>(), n, numel,
                                        gg.stride(0), stat};
    accumulate_kernel<<<static_cast<unsigned>(blocks), spare::kAccThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void saliency_linear(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy, std::string_view stat_name) {
  check_inputs("saliency_linear", {{"acc", &acc}, {"x", &x}, {"dy", &dy}});
  check_acc("saliency_linear", acc);
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  const int64_t stat = stat_code(stat_name);
  TORCH_CHECK(x.dim() == 3 && dy.dim() == 3 && x.size(0) == dy.size(0) && x.size(1) == dy.size(1),
              "spare_kernels_cuda.saliency_linear: x (S, T, in) and dy (S, T, out) expected, got ", x.sizes(),
              " and ", dy.sizes());
  const int64_t S = x.size(0), T = x.size(1), in = x.size(2), out = dy.size(2);
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == out && acc.size(1) == in, "spare_kernels_cuda.saliency_linear: acc (",
              out, ", ", in, ") expected, got ", acc.sizes());
  if (S == 0 || T == 0) return;
  const auto dt = x.scalar_type();
  const at::Tensor dyd = dy.to(dt);
  if (!per_sample(stat)) {
    const at::Tensor dyt = dyd.reshape({S * T, out}).t(), x2 = x.reshape({S * T, in});
    const int64_t step = chunk_rows(out, in);
    for (int64_t o0 = 0; o0 < out; o0 += step) {
      const int64_t o1 = std::min(out, o0 + step);
      at::Tensor a = acc.slice(0, o0, o1);   // rows of a contiguous acc: contiguous
      if (stat == spare::kSigned)
        a.add_(mm_f32(dyt.slice(0, o0, o1), x2));
      else
        accumulate(a, mm_f32(dyt.slice(0, o0, o1), x2).unsqueeze(0), stat);
    }
    return;
  }
  if (spare::sal_use_tiles(T, sixteen_bit(dt))) {
    const at::Tensor xc = x.contiguous(), dc = dyd.contiguous();
    SPARE_DISPATCH_16BIT(dt, "spare_kernels_cuda.saliency_linear", [&] {
      launch_sample_tiles(acc, spare::sal_linear_params(xc.const_data_ptr<scalar_t>(), dc.const_data_ptr<scalar_t>(),
                                                        S, T, out, in, stat == spare::kSampleSq));
    });
    return;
  }
  if (T == 1) {  // rank one per sample: Σ_i f(dy_i)ᵀ f(x_i) is one GEMM
    const at::Tensor d = dyd.reshape({S, out}).to(at::kFloat), xx = x.reshape({S, in}).to(at::kFloat);
    if (stat == spare::kSampleAbs)
      acc.addmm_(d.abs().t(), xx.abs());
    else
      acc.addmm_(d.square().t(), xx.square());
    return;
  }
  // Samples per chunk so that the (sc, rows, in) fp32 scratch stays within kScratchEntries; a single
  // sample's gradient above it is split by rows.
  const int64_t rows = chunk_rows(out, in);
  const int64_t sc = std::max<int64_t>(1, std::min<int64_t>(S, kScratchEntries / std::max<int64_t>(rows * in, 1)));
  const at::Tensor dyt = dyd.transpose(1, 2);   // (S, out, T)
  for (int64_t o0 = 0; o0 < out; o0 += rows) {
    const int64_t o1 = std::min(out, o0 + rows);
    at::Tensor a = acc.slice(0, o0, o1);
    for (int64_t s0 = 0; s0 < S; s0 += sc) {
      const int64_t s1 = std::min(S, s0 + sc);
      accumulate(a, bmm_f32(dyt.slice(0, s0, s1).slice(1, o0, o1), x.slice(0, s0, s1)), stat);
    }
  }
}

void saliency_conv2d(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy, std::string_view stat_name,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_inputs("saliency_conv2d", {{"acc", &acc}, {"x", &x}, {"dy", &dy}});
  check_acc("saliency_conv2d", acc);
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocast no_autocast;
  const int64_t stat = stat_code(stat_name);
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4 && acc.dim() == 4 && x.size(0) == dy.size(0),
              "spare_kernels_cuda.saliency_conv2d: x (S, C, H, W), dy (S, out, H', W') and acc (weight shape) "
              "expected, got ", x.sizes(), ", ", dy.sizes(), ", ", acc.sizes());
  const int64_t S = x.size(0), out = acc.size(0);
  TORCH_CHECK(dy.size(1) == out && x.size(1) == acc.size(1) * groups && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "spare_kernels_cuda.saliency_conv2d: acc (out, C/groups, kh, kw), x (S, C, H, W), dy (S, out, H', W') "
              "and 2-entry stride/padding/dilation expected, got ", acc.sizes(), ", ", x.sizes(), ", ", dy.sizes());
  if (S == 0) return;
  // The weight gradients in fp32 like the reference's: cuDNN on fp32 copies of x and dy (16-bit values
  // are exact in fp32 and TF32), never rounded to 16 bits before |·| or ².
  const std::vector<int64_t> no_pad(2, 0);
  if (!per_sample(stat)) {
    // acc has the weight's shape and dtype: the weight argument, which only gives the shape
    const at::Tensor g = std::get<1>(at::convolution_backward(dy.to(at::kFloat), x.to(at::kFloat), acc, std::nullopt,
                                                              stride, padding, dilation, false, no_pad, groups,
                                                              {false, true, false}));
    if (stat == spare::kSigned)
      acc.add_(g);
    else
      accumulate(acc, g.unsqueeze(0), stat);
    return;
  }
  const int64_t OH = dy.size(2), OW = dy.size(3);
  if (groups == 1 && spare::sal_use_tiles(OH * OW, sixteen_bit(x.scalar_type()))) {
    const at::Tensor xc = x.contiguous(), dc = dy.to(x.scalar_type()).contiguous();
    SPARE_DISPATCH_16BIT(x.scalar_type(), "spare_kernels_cuda.saliency_conv2d", [&] {
      launch_sample_tiles(acc, spare::sal_conv_params(xc.const_data_ptr<scalar_t>(), dc.const_data_ptr<scalar_t>(), S,
                                                      x.size(1), x.size(2), x.size(3), out, acc.size(2), acc.size(3),
                                                      OH, OW, stride.data(), padding.data(), dilation.data(),
                                                      stat == spare::kSampleSq));
    });
    return;
  }
  // sc samples at once as one convolution with sc·groups groups: its weight gradient is the sc
  // per-sample gradients stacked along the output channels.
  const int64_t numel = acc.numel();
  const int64_t sc = std::max<int64_t>(1, std::min<int64_t>(S, kScratchEntries / std::max<int64_t>(numel, 1)));
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), Ho = dy.size(2), Wo = dy.size(3);
  std::vector<int64_t> wsz(acc.sizes().begin(), acc.sizes().end());
  for (int64_t s0 = 0; s0 < S; s0 += sc) {
    const int64_t s1 = std::min(S, s0 + sc), n = s1 - s0;
    wsz[0] = out * n;
    const at::Tensor xs = x.slice(0, s0, s1).to(at::kFloat).reshape({1, n * C, H, W});
    const at::Tensor ds = dy.slice(0, s0, s1).to(at::kFloat).reshape({1, n * out, Ho, Wo});
    const at::Tensor w = at::empty(wsz, acc.options());
    const at::Tensor g = std::get<1>(at::convolution_backward(ds, xs, w, std::nullopt, stride, padding, dilation,
                                                              false, no_pad, groups * n, {false, true, false}));
    accumulate(acc, g.reshape({n, numel}), stat);
  }
}

}  // namespace spare_cuda
