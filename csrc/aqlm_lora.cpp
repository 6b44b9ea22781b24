// Operator schemas of the aqlm_lora library, declared once for every backend.
// Kernels live in csrc/cpu/ and csrc/cuda/, each file with its own TORCH_LIBRARY_IMPL;
// fake (meta) kernels and autograd are registered from Python in aqlm_lora/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A module named _C that defines nothing: importing it loads this shared library, which runs the
// static TORCH_LIBRARY initializers below. Using the limited API keeps one wheel per platform.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(aqlm_lora, m) {
  // W[o*og + a, i*ig + b] = scales[o] * sum_c codebooks[c, codes[o, i, c] mod 2**nbits, a, b]
  m.def("dequantize(Tensor codes, Tensor codebooks, Tensor scales) -> Tensor");
  // input @ W^T + bias, input [..., in] -> [..., out]
  m.def("aqlm_gemm(Tensor input, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias) -> Tensor");
  // grad @ W, grad [..., out] -> [..., in]
  m.def("aqlm_gemm_t(Tensor grad, Tensor codes, Tensor codebooks, Tensor scales) -> Tensor");
  // Boolean keep-mask of Philox dropout for a tensor shaped like `input` (element index =
  // row-major position), identical on every backend for the same (seed, offset).
  m.def("dropout_mask(Tensor input, float dropout_p, SymInt seed, SymInt offset) -> Tensor");
  // Fused base + LoRA forward:
  //   out = input @ W^T + bias + scaling * (dropout(input) @ lora_A^T) @ lora_B^T + scaling * lora_bias
  // Returns (out [..., out], xa [N, r]) where xa = dropout(input) @ lora_A^T, saved for backward.
  m.def(
      "lora_forward(Tensor input, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B, Tensor? lora_bias, float scaling, float dropout_p, SymInt seed, "
      "SymInt offset) -> (Tensor, Tensor)");
  // Backward of lora_forward without lora_bias/bias (their gradients are sums of grad).
  // Returns (grad_input or an empty [0] tensor when input_grad is false, grad_A, grad_B).
  m.def(
      "lora_backward(Tensor grad, Tensor input, Tensor xa, Tensor codes, Tensor codebooks, "
      "Tensor scales, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, SymInt seed, "
      "SymInt offset, bool input_grad) -> (Tensor, Tensor, Tensor)");
  // Many adapters in one batch (one per row; Punica/S-LoRA's BGMV): the base x @ W^T once for all
  // rows, then per row n with a = indices[n] >= 0
  //   out[n] = row_scale[a] * (x[n] W^T + scalings[a] * ((x[n] lora_A[a]^T) lora_B_t[a] + lora_bias[a])) + bias
  // and out[n] = x[n] W^T + bias where indices[n] = -1. lora_A [K, r, in], lora_B_t [K, r, out]
  // (each adapter's B transposed, ranks zero-padded to r), lora_bias / row_scale [K, out] (row_scale:
  // DoRA's m / ||W + s B A||, ones for plain adapters), scalings [K], indices int64 [N].
  m.def(
      "lora_mixed_forward(Tensor input, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B_t, Tensor? lora_bias, Tensor scalings, Tensor? row_scale, "
      "Tensor indices) -> Tensor");
}
