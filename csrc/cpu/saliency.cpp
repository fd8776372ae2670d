// Saliency statistics of one weight over one backward pass (DESIGN §1):
//   grad_abs: acc += |sum_i g_i|   signed: acc += sum_i g_i
//   sample_abs: acc += sum_i |g_i| sample_sq: acc += sum_i g_i^2,   g_i = sum_t dy_t^T x_t.
// Per-sample statistics are accumulated tile by tile of the weight (a cache-sized scratch per
// thread), never as per-sample weight-sized tensors; T == 1 uses the rank-one identity (one GEMM).
#include "spare_cpu.h"

#include <algorithm>
#include <cmath>

namespace spare {

namespace {

enum Stat { kGradAbs, kSigned, kSampleAbs, kSampleSq };

Stat parse_stat(std::string_view s) {
  if (s == "grad_abs") return kGradAbs;
  if (s == "signed") return kSigned;
  if (s == "sample_abs") return kSampleAbs;
  if (s == "sample_sq") return kSampleSq;
  TORCH_CHECK(false, "spare_kernels_cpu: saliency stat must be one of grad_abs, signed, sample_abs, sample_sq; got '",
              std::string(s), "'");
}

void check_acc(const at::Tensor& acc) {
  TORCH_CHECK(acc.device().is_cpu() && acc.scalar_type() == at::kFloat && acc.is_contiguous(),
              "spare_kernels_cpu: saliency accumulator must be a contiguous float32 CPU tensor");
}

// acc (out x in, contiguous) += stat over samples: X[i] (T x in), dY[i] (T x out).
// Tiles of acc are distributed over threads; per tile, per sample: g = dY_i^T X_i into scratch.
void tiled_stat(float* acc, int64_t out, int64_t in, const std::vector<Mat>& X,
                const std::vector<Mat>& dY, Stat st) {
  if (out == 0 || in == 0 || X.empty()) return;
  const int64_t Q = std::min<int64_t>(in, 256);
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(out, (32 * 1024) / Q));
  const int64_t nqt = cdiv(in, Q), npt = cdiv(out, P);
  // Grouping all samples in one GEMM (beta = 1 over samples) for grad_abs / signed.
  const bool per_sample = (st == kSampleAbs || st == kSampleSq);
  at::parallel_for(0, npt * nqt, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf((size_t)P * Q + 16);
    float* g = buf.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = (t / nqt) * P, i0 = (t % nqt) * Q;
      const int64_t pr = std::min(P, out - o0), qc = std::min(Q, in - i0);
      const Mat gm{g, pr, qc, qc, 1};
      const Mat am{acc + o0 * in + i0, pr, qc, in, 1};
      if (st == kSigned) {
        for (size_t b = 0; b < X.size(); ++b)
          gemm(1.f, dY[b].sub(0, dY[b].r, o0, pr).t(), X[b].sub(0, X[b].r, i0, qc), 1.f, am);
        continue;
      }
      const size_t nsteps = per_sample ? X.size() : 1;
      for (size_t s = 0; s < nsteps; ++s) {
        if (per_sample) {
          gemm(1.f, dY[s].sub(0, dY[s].r, o0, pr).t(), X[s].sub(0, X[s].r, i0, qc), 0.f, gm);
        } else {
          for (size_t b = 0; b < X.size(); ++b)
            gemm(1.f, dY[b].sub(0, dY[b].r, o0, pr).t(), X[b].sub(0, X[b].r, i0, qc), b ? 1.f : 0.f, gm);
        }
        for (int64_t o = 0; o < pr; ++o) {
          float* a = acc + (o0 + o) * in + i0;
          const float* v = g + o * qc;
          if (st == kSampleSq) {
#pragma omp simd
            for (int64_t j = 0; j < qc; ++j) a[j] += v[j] * v[j];
          } else {
#pragma omp simd
            for (int64_t j = 0; j < qc; ++j) a[j] += std::fabs(v[j]);
          }
        }
      }
    }
  });
}
}  // namespace

void saliency_linear(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy, std::string_view stat) {
  const NoAutocast no_autocast;
  const Stat st = parse_stat(stat);
  check_acc(acc);
  TORCH_CHECK(x.dim() == 3 && dy.dim() == 3 && x.size(0) == dy.size(0) && x.size(1) == dy.size(1),
              "spare_kernels_cpu: saliency_linear expects x (S, T, in), dy (S, T, out); got ", x.sizes(),
              ", ", dy.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "spare_kernels_cpu: saliency activations must be float32 or bfloat16");
  TORCH_CHECK(x.device().is_cpu() && dy.device().is_cpu(), "spare_kernels_cpu: CPU tensors expected");
  const int64_t S = x.size(0), T = x.size(1), in = x.size(2), out = dy.size(2);
  TORCH_CHECK(acc.dim() == 2 && acc.size(0) == out && acc.size(1) == in,
              "spare_kernels_cpu: saliency accumulator must be (", out, ", ", in, "), got ", acc.sizes());
  if (S == 0 || T == 0) return;
  auto xf = f32c(x), dyf = f32c(dy);
  Mat am{acc.data_ptr<float>(), out, in, in, 1};
  if ((st == kSampleAbs || st == kSampleSq) && T == 1) {
    // g_i = dy_i (x) x_i is rank one: |g_i| = |dy_i| (x) |x_i|, g_i^2 = dy_i^2 (x) x_i^2.
    auto a = st == kSampleAbs ? dyf.view({S, out}).abs() : dyf.view({S, out}).square();
    auto b = st == kSampleAbs ? xf.view({S, in}).abs() : xf.view({S, in}).square();
    gemm(1.f, mat_of(a).t(), mat_of(b), 1.f, am);  // MKL threads this one
    return;
  }
  if (st == kSigned) {
    gemm(1.f, Mat{dyf.data_ptr<float>(), S * T, out, out, 1}.t(), Mat{xf.data_ptr<float>(), S * T, in, in, 1}, 1.f, am);
    return;
  }
  std::vector<Mat> X, dY;
  if (st == kGradAbs) {
    X.push_back(Mat{xf.data_ptr<float>(), S * T, in, in, 1});
    dY.push_back(Mat{dyf.data_ptr<float>(), S * T, out, out, 1});
  } else {
    for (int64_t i = 0; i < S; ++i) {
      X.push_back(Mat{xf.data_ptr<float>() + i * T * in, T, in, in, 1});
      dY.push_back(Mat{dyf.data_ptr<float>() + i * T * out, T, out, out, 1});
    }
  }
  tiled_stat(acc.data_ptr<float>(), out, in, X, dY, st);
}

void saliency_conv2d(at::Tensor& acc, const at::Tensor& x, const at::Tensor& dy, std::string_view stat,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const NoAutocast no_autocast;
  const Stat st = parse_stat(stat);
  check_acc(acc);
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4 && acc.dim() == 4 && x.size(0) == dy.size(0),
              "spare_kernels_cpu: saliency_conv2d expects x (S, C, H, W), dy (S, out, H', W'), acc 4-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "spare_kernels_cpu: saliency activations must be float32 or bfloat16");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && groups >= 1,
              "spare_kernels_cpu: saliency_conv2d needs 2-element stride/padding/dilation");
  TORCH_CHECK(acc.size(0) == dy.size(1) && acc.size(1) * groups == x.size(1),
              "spare_kernels_cpu: saliency accumulator shape ", acc.sizes(), " does not match x ", x.sizes(),
              " / dy ", dy.sizes(), " with groups=", groups);
  const int64_t S = x.size(0), C = x.size(1), out = dy.size(1);
  if (S == 0) return;
  auto xf = f32c(x), dyf = f32c(dy);
  const bool pointwise = acc.size(2) == 1 && acc.size(3) == 1 && stride[0] == 1 && stride[1] == 1 &&
                         padding[0] == 0 && padding[1] == 0 && groups == 1;
  if (pointwise) {
    // 1x1 conv = linear over pixels: g_i = dy_i (out x HW) . x_i^T (HW x C).
    const int64_t HW = x.size(2) * x.size(3);
    TORCH_CHECK(dy.size(2) * dy.size(3) == HW, "spare_kernels_cpu: saliency_conv2d output size mismatch");
    std::vector<Mat> X, dY;
    for (int64_t i = 0; i < S; ++i) {
      X.push_back(Mat{xf.data_ptr<float>() + i * C * HW, HW, C, 1, HW});
      dY.push_back(Mat{dyf.data_ptr<float>() + i * out * HW, HW, out, 1, HW});
    }
    if (st == kGradAbs || st == kSigned || HW > 1) {
      tiled_stat(acc.data_ptr<float>(), out, C, X, dY, st);
    } else {
      auto a = st == kSampleAbs ? dyf.view({S, out}).abs() : dyf.view({S, out}).square();
      auto b = st == kSampleAbs ? xf.view({S, C}).abs() : xf.view({S, C}).square();
      gemm(1.f, mat_of(a).t(), mat_of(b), 1.f, Mat{acc.data_ptr<float>(), out, C, C, 1});
    }
    return;
  }
  auto wgrad = [&](const at::Tensor& xs, const at::Tensor& dys) {
    return std::get<1>(at::convolution_backward(dys, xs, acc, std::nullopt, stride, padding, dilation, false,
                                                {0, 0}, groups, {false, true, false}));
  };
  if (st == kGradAbs || st == kSigned) {
    auto g = wgrad(xf, dyf);
    if (st == kGradAbs) g.abs_();
    acc.add_(g);
    return;
  }
  for (int64_t i = 0; i < S; ++i) {  // one weight-sized temporary at a time
    auto g = wgrad(xf.narrow(0, i, 1), dyf.narrow(0, i, 1));
    if (st == kSampleAbs) acc.add_(g.abs_());
    else acc.addcmul_(g, g);
  }
}

}  // namespace spare
