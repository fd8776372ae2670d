// Eager autograd of the CPU kernels, in C++ (ops masked_lora_{linear,conv2d}_autograd).
//
// The same forward and backward kernels the Python autograd.Function of ops/masked_lora.py calls,
// without Python in the loop: that Function's apply + its backward node cost ~80 us per layer call
// on this CPU, more than many layers' kernels. Contract (checked by the caller, ops/masked_lora.py):
// fp32/bf16 activations, contiguous tensors, frozen weight and bias (their gradients, when wanted,
// go through the Python Function). Gradients: dx, dA, dB, each only when autograd asks for it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "spare_cpu.h"

namespace spare {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor opt(const at::Tensor& t) { return t.numel() == 0 ? at::Tensor() : t; }
// What both ops keep for backward. The packed mask rides in saved_data (an IValue):
// save_for_backward of an absent (undefined) tensor fails in get_saved_variables.
void save(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
          const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& m, double scale,
          std::vector<int64_t> args) {
  ctx->save_for_backward({x, weight, A, B});
  ctx->saved_data["mask"] = m.has_value() ? c10::IValue(*m) : c10::IValue();
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["args"] = std::move(args);
}
std::optional<at::Tensor> mask_of(AutogradContext* ctx) {
  const auto& v = ctx->saved_data["mask"];
  return v.isTensor() ? std::optional<at::Tensor>(v.toTensor()) : std::nullopt;
}

// needs_input_grad counts only the tensors present: x, weight, [bias], A, B, [mask].
struct Need {
  bool dx, dA, dB;
};
Need needs(AutogradContext* ctx) {
  const int64_t a = ctx->saved_data["has_bias"].toBool() ? 3 : 2;
  return Need{ctx->needs_input_grad(0), ctx->needs_input_grad(a), ctx->needs_input_grad(a + 1)};
}

// A create_graph backward (grad mode on in backward) must itself be differentiable, which the kernels
// are not: it runs the reference's formulas instead, defined in Python as
// spare_kernels::<op>_backward_differentiable (CompositeImplicitAutograd: autograd records its ops).
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
Grads linear_backward_differentiable(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& m,
                                     int64_t kind, int64_t bo, int64_t bi, double scale, Need n) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("spare_kernels::masked_lora_linear_backward_differentiable", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                                    double, bool, bool, bool)>();
  return op.call(dy, x, w, A, B, m, kind, bo, bi, scale, n.dx, n.dA, n.dB);
}
Grads conv2d_backward_differentiable(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& m,
                                     int64_t kind, int64_t bo, int64_t bi, double scale, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, Need n) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("spare_kernels::masked_lora_conv2d_backward_differentiable", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                                    double, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, bool, bool,
                                    bool)>();
  return op.call(dy, x, w, A, B, m, kind, bo, bi, scale, stride, padding, dilation, groups, n.dx, n.dA, n.dB);
}

struct LinearFn : public torch::autograd::Function<LinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                            const std::optional<at::Tensor>& mask, int64_t kind, int64_t bo, int64_t bi,
                            double scale) {
    save(ctx, x, weight, bias, A, B, mask, scale, {kind, bo, bi});
    return masked_lora_linear(x, weight, bias, A, B, mask, kind, bo, bi, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto a = ctx->saved_data["args"].toIntVector();
    const Need n = needs(ctx);
    const double scale = ctx->saved_data["scale"].toDouble();
    auto [dx, dA, dB] =
        at::GradMode::is_enabled()
            ? linear_backward_differentiable(grads[0].contiguous(), s[0], s[1], s[2], s[3], mask_of(ctx), a[0], a[1],
                                             a[2], scale, n)
            : masked_lora_linear_backward(grads[0].contiguous(), s[0], s[1], s[2], s[3], mask_of(ctx), a[0], a[1],
                                          a[2], scale, n.dx, n.dA, n.dB);
    return {opt(dx), at::Tensor(), at::Tensor(), opt(dA), opt(dB), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

struct ConvFn : public torch::autograd::Function<ConvFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                            const std::optional<at::Tensor>& mask, int64_t kind, int64_t bo, int64_t bi,
                            double scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
    TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                "spare_kernels_cpu: conv2d needs 2-element stride / padding / dilation");
    save(ctx, x, weight, bias, A, B, mask, scale,
         {kind, bo, bi, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups});
    return masked_lora_conv2d(x, weight, bias, A, B.view({B.size(0), B.size(1)}), mask, kind, bo, bi, scale, stride,
                              padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto a = ctx->saved_data["args"].toIntVector();
    const Need n = needs(ctx);
    const at::Tensor& B = s[3];  // (out, r) or peft's (out, r, 1, 1)
    const double scale = ctx->saved_data["scale"].toDouble();
    const std::vector<int64_t> stride{a[3], a[4]}, padding{a[5], a[6]}, dilation{a[7], a[8]};
    auto [dx, dA, dB] =
        at::GradMode::is_enabled()
            ? conv2d_backward_differentiable(grads[0].contiguous(), s[0], s[1], s[2], B.view({B.size(0), B.size(1)}),
                                             mask_of(ctx), a[0], a[1], a[2], scale, stride, padding, dilation, a[9], n)
            : masked_lora_conv2d_backward(grads[0].contiguous(), s[0], s[1], s[2], B.view({B.size(0), B.size(1)}),
                                          mask_of(ctx), a[0], a[1], a[2], scale, stride, padding, dilation, a[9],
                                          n.dx, n.dA, n.dB);
    variable_list out(14);
    out[0] = opt(dx);
    out[3] = opt(dA);
    out[4] = dB.numel() ? dB.view(B.sizes()) : at::Tensor();
    return out;
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& mask,
                           int64_t kind, int64_t bo, int64_t bi, double scale) {
  return LinearFn::apply(x, weight, bias, A, B, mask, kind, bo, bi, scale);
}

at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& mask,
                           int64_t kind, int64_t bo, int64_t bi, double scale, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return ConvFn::apply(x, weight, bias, A, B, mask, kind, bo, bi, scale, stride, padding, dilation, groups);
}

}  // namespace
}  // namespace spare

TORCH_LIBRARY_FRAGMENT(spare_kernels_cpu, m) {
  m.def("masked_lora_linear_autograd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "Tensor? mask, int kind, int block_o, int block_i, float scale) -> Tensor");
  m.def("masked_lora_conv2d_autograd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "Tensor? mask, int kind, int block_o, int block_i, float scale, int[] stride, "
        "int[] padding, int[] dilation, int groups) -> Tensor");
}

// One kernel for autograd and plain calls alike (Function::apply records a node only when an input
// requires grad and grad mode is on).
TORCH_LIBRARY_IMPL(spare_kernels_cpu, CompositeImplicitAutograd, m) {
  m.impl("masked_lora_linear_autograd", &spare::linear_autograd);
  m.impl("masked_lora_conv2d_autograd", &spare::conv2d_autograd);
}
