// The fixed-order dot product and axpy of lora_gemm.cpp. Plain types only, so the AVX2 decode file
// (which must not include ATen) can call them too.
#pragma once

#include <cstdint>

namespace aqlm_lora::cpu {

// Fixed-order dot product (8 partial sums, then their sum in order: the same bits on every CPU and
// thread count) and y += a * x. The LoRA kernels (lora_gemm.cpp, multi_lora.cpp) and the fused LoRA
// epilogue of the gather decode kernel (decode_avx2.cpp) share them.
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);
void axpy(float* __restrict y, const float* __restrict x, float a, int64_t n);
void axpy(double* __restrict y, const double* __restrict x, double a, int64_t n);

}  // namespace aqlm_lora::cpu
