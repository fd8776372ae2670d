// The library spare_kernels_cpu: schemas, CPU kernels, and the Python module stub that loading
// spare_kernels._C needs (importing it registers torch.ops.spare_kernels_cpu.*).
#include <Python.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/schemas.h"
#include "spare_cpu.h"

#define SPARE_CONCAT_(a, b) a##b
#define SPARE_CONCAT(a, b) SPARE_CONCAT_(a, b)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define SPARE_STR_(a) #a
#define SPARE_STR(a) SPARE_STR_(a)

static struct PyModuleDef spare_module = {PyModuleDef_HEAD_INIT, SPARE_STR(TORCH_EXTENSION_NAME),
                                          "spare_kernels native CPU kernels (torch.ops.spare_kernels_cpu)",
                                          -1, nullptr};

PyMODINIT_FUNC SPARE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&spare_module); }

namespace spare {
// csrc/cpu/topk.cpp
std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> topk_select(const std::vector<at::Tensor>& scores,
                                                                      at::IntArrayRef groups, at::IntArrayRef ks,
                                                                      int64_t digit0, int64_t cand_bytes);
}  // namespace spare

TORCH_LIBRARY(spare_kernels_cpu, m) {
  SPARE_DEFINE_BACKEND_OPS(m);
  m.def(SPARE_SCHEMA_TOPK_SELECT);
}

TORCH_LIBRARY_IMPL(spare_kernels_cpu, CPU, m) {
  m.impl("masked_lora_linear", &spare::masked_lora_linear);
  m.impl("masked_lora_linear_backward", &spare::masked_lora_linear_backward);
  m.impl("masked_lora_conv2d", &spare::masked_lora_conv2d);
  m.impl("masked_lora_conv2d_backward", &spare::masked_lora_conv2d_backward);
  m.impl("saliency_linear", &spare::saliency_linear);
  m.impl("saliency_conv2d", &spare::saliency_conv2d);
  m.impl("topk_select", &spare::topk_select);
}
