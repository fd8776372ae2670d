// Saliency statistics on CUDA (DESIGN §1): the weight gradients come from cuBLAS (linear) or cuDNN
// (conv); one fused kernel folds them into the fp32 statistic.
// - grad_abs / signed: one GEMM (or cuDNN weight gradient) of the whole batch, then acc += |G| or G.
// - sample_abs / sample_sq: per-sample gradients of a chunk of samples into a scratch of at most
//   kScratchEntries entries (a batched GEMM; for convs one grouped cuDNN weight gradient with the
//   samples as groups), then acc += Σ_i |g_i| or g_i². Tokens-per-sample 1 (linear): |g_i| = |dy_i|⊗|x_i|,
//   so the whole batch is one GEMM.
#include "spare_cuda.h"

#include "lora_kernels.h"

namespace spare_cuda {

namespace {

template <typename TG>
__global__ void accumulate_kernel(spare::AccumulateParams<TG> p) {
  spare::accumulate_body(spare::this_thread(), p);
}

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
