// Interface of the AVX2/FMA/F16C/BMI2 few-token kernels (decode_avx2.cpp). Plain types only: that file
// is compiled for AVX2, so it must not instantiate ATen's inline code (which other files share).
#pragma once

#include <cstdint>

namespace aqlm_lora::cpu::simd {

enum class CodebookType { kFloat, kHalf, kBFloat16 };

// One few-token matmul y[n, o*og + a] = x[n] . W[o*og + a] with float accumulation.
struct DecodeProblem {
  const void* codes;  // [O, I, C], int8 or int16
  bool codes_int16;
  int64_t out_groups, in_groups, num_codebooks, codebook_size, out_group, in_group;
  const float* scales;  // [O]
  const float* x;       // [N, in]
  int64_t n_rows;
  float* y;  // [N, out]
  // Optional LoRA expand fused into the gather kernel's epilogue (out_group 1):
  // y[n, o] += lora_scaling * xa[n, :] . lora_B[o, :], summed like lora_gemm.cpp's row dots.
  const float* lora_xa = nullptr;  // [N, r]
  const float* lora_B = nullptr;   // [out, r]
  int64_t lora_rank = 0;
  float lora_scaling = 0.f;
};

bool avx2_supported();

// Lookup-table path (nbits <= 8). The table holds groups from i_base on, laid out as
// [((i - i_base) * C + c) * K + k][a * N + n]; build_lut_avx2 fills groups [i_begin, i_end).
// cb_t is the codebook transposed to [C][og][ig][K] in float; needs K % 8 == 0.
void build_lut_avx2(const DecodeProblem& p, const float* cb_t, int64_t i_base, int64_t i_begin, int64_t i_end,
                    float* lut);
// One token, out_group 1: partial[o] += the table entries of groups [i_begin, i_end) (table base i_begin).
void lut_partial_n1_avx2(const DecodeProblem& p, const float* lut, int64_t i_begin, int64_t i_end, int64_t o_begin,
                         int64_t o_end, float* partial);
// Any N and out_group, whole table (i_base 0): y = scales * sums.
void lut_rows_avx2(const DecodeProblem& p, const float* lut, int64_t o_begin, int64_t o_end);

// Codebook-gather path (any nbits) for out_group 1, in_group 8 and N <= 8, reading the codebooks
// [C, K, 1, 8] in their own dtype.
void gather_rows_avx2(const DecodeProblem& p, const void* codebooks, CodebookType type, int64_t o_begin,
                      int64_t o_end);

}  // namespace aqlm_lora::cpu::simd
