// The library spare_kernels_cuda: the backend ops' schemas (csrc/common/schemas.h, shared with the CPU
// library), their CUDA implementations, and the Python module stub that loading spare_kernels._C_cuda
// needs (importing it registers torch.ops.spare_kernels_cuda.*). topk.cu adds the top-k ops as a
// fragment of the same library.
#include <Python.h>
#include <torch/library.h>

#include "../common/schemas.h"
#include "spare_cuda.h"

#define SPARE_CONCAT_(a, b) a##b
#define SPARE_CONCAT(a, b) SPARE_CONCAT_(a, b)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C_cuda
#endif
#define SPARE_STR_(a) #a
#define SPARE_STR(a) SPARE_STR_(a)

static struct PyModuleDef spare_cuda_module = {PyModuleDef_HEAD_INIT, SPARE_STR(TORCH_EXTENSION_NAME),
                                               "spare_kernels CUDA kernels (torch.ops.spare_kernels_cuda)", -1,
                                               nullptr};

PyMODINIT_FUNC SPARE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&spare_cuda_module); }

TORCH_LIBRARY(spare_kernels_cuda, m) { SPARE_DEFINE_BACKEND_OPS(m); }

TORCH_LIBRARY_IMPL(spare_kernels_cuda, CUDA, m) {
  m.impl("masked_lora_linear", &spare_cuda::masked_lora_linear);
  m.impl("masked_lora_linear_backward", &spare_cuda::masked_lora_linear_backward);
  m.impl("masked_lora_conv2d", &spare_cuda::masked_lora_conv2d);
  m.impl("masked_lora_conv2d_backward", &spare_cuda::masked_lora_conv2d_backward);
  m.impl("saliency_linear", &spare_cuda::saliency_linear);
  m.impl("saliency_conv2d", &spare_cuda::saliency_conv2d);
}
