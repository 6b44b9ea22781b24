// Host launchers of the aqlm_lora CUDA kernels; ops.cu composes them into the six ops.
// Every launcher runs on the current stream, launches nothing for empty work, and checks the
// launch. None synchronises with the host.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common.cuh"

namespace aqlm_lora {
namespace cuda {

// ---- dequantize.cu ---------------------------------------------------------------------------------
// Writes the block of W made of rows [row0, row0 + nrows) and in-groups [group0, group0 + ngroups)
// into `tile` ([nrows, ngroups * in_group], contiguous, 16-byte aligned, any float dtype),
// accumulating in float32 (float64 when the tile or the codebooks are float64).
void dequantize_tile(const WeightRef& w, int64_t row0, int64_t nrows, int64_t group0, int64_t ngroups,
                     const at::Tensor& tile);

// ---- decode.cu ------------------------------------------------------------------------------------
// Up to this many tokens use the decode GEMV kernels (which read each code once for all tokens);
// more use dequantized tiles + cuBLAS. Measured on an H200 (benchmarks/results/gpu/run2): the GEMV
// kernels' time grows with N (x is re-read per row), so at N = 1 they beat dequantize + cuBLAS on
// every shape and scheme (0.53-0.86x), at N = 2 they are within 0.89-1.08x of it (1x16) and
// 0.99-1.21x (2x8), and from N = 3 they lose on all but one shape (up to 2.8x at N = 8).
constexpr int64_t kDecodeMaxRows = 2;

// The kernel that computes x @ W^T (+ LoRA) for one call; the table is choose_kernel's comment in
// decode.cu (and ARCHITECTURE.md).
enum class Kernel {
  kTiledGemm,      // dequantized tiles + cuBLAS (ops.cu)
  kGemvSharedIg8,  // in_group 8, nbits <= 8: codebooks staged in shared memory
  kGemvGlobalIg8,  // in_group 8, codebooks read from global memory
  kGemvGeneric,    // any other group shape
};

// n_rows: rows of x; lora_decodable: no LoRA, or lora_A/lora_B in float32/16/bf16.
Kernel choose_kernel(const AqlmDims& d, int64_t n_rows, at::ScalarType x, const at::Tensor& codebooks,
                     bool lora_decodable);

// xa[n, j] = sum_k dropout(x)[n, k] * lora_A[j, k] in float32. x: [N, in] float32 contiguous;
// lora_A: [r, in] float32/float16/bfloat16 contiguous; xa: [N, r] float32 contiguous; xa_out:
// undefined, xa itself, or [N, r] contiguous in another float dtype that gets the same values.
void lora_shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p, uint64_t seed, uint64_t offset,
                 const at::Tensor& xa, const at::Tensor& xa_out);

// y[n, row] = x[n] . W[row] + bias[row] + scaling * (xa[n] . lora_B[row] + lora_bias[row]), one
// warp per output row, every code read once for all N <= kDecodeMaxRows tokens.
// x: [N, in] float32, 16-byte aligned; w.scales, bias, lora_bias: contiguous, any float dtype,
// bias/lora_bias may be undefined; xa: float32 [N, r] or undefined (no LoRA expand); lora_B:
// [out, r] contiguous float32/16/bf16; y: [N, out] contiguous float32/16/bf16.
void decode_gemv(Kernel kernel, const at::Tensor& x, const WeightRef& w, const at::Tensor& bias,
                 const at::Tensor& lora_bias,
                 const at::Tensor& xa, const at::Tensor& lora_B, float scaling, const at::Tensor& y);

// ---- dropout.cu ---------------------------------------------------------------------------------
// mask[i] = dropout_keep(seed, offset, i, p) for every element of the contiguous bool `mask`.
void dropout_mask_fill(const at::Tensor& mask, double dropout_p, uint64_t seed, uint64_t offset);

// t[i] = t[i] * keep(i) / (1 - p) in place, i = row-major position (t contiguous, any float dtype).
void dropout_scale_inplace(const at::Tensor& t, double dropout_p, uint64_t seed, uint64_t offset);

}  // namespace cuda
}  // namespace aqlm_lora
