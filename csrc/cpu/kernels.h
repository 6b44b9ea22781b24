// CPU kernels shared by the op implementations in ops.cpp. All take raw pointers to
// contiguous buffers already converted to the accumulation type acc_t (float or double).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "common/codes.h"
#include "common/plain_aten.h"
#include "cpu/dot.h"

namespace aqlm_lora::cpu {

// Parallel loops hand each thread at least this many inner steps: waking a second thread costs
// more than a small weight's whole matmul (and far more on a loaded machine).
constexpr int64_t kMinParallelWork = int64_t{1} << 14;

inline int64_t grain_for(int64_t work_per_item, int64_t min_work = kMinParallelWork) {
  return std::max<int64_t>(1, min_work / std::max<int64_t>(1, work_per_item));
}

// Calls M(acc_t, code_t) for every (accumulation, code) type pair the kernels are built for, to
// instantiate the templates below once per pair.
#define AQLM_LORA_FOR_EACH_WEIGHT_TYPE(M) M(float, int8_t) M(float, int16_t) M(double, int8_t) M(double, int16_t)

// The AQLM weight in the accumulation type: codes [O, I, C], codebooks [C, K, og, ig], scales [O].
template <typename acc_t, typename code_t>
struct Weight {
  const code_t* codes;
  const acc_t* codebooks;
  const acc_t* scales;
  AqlmDims d;
};

// dst[(o - o0) * og + a, (i - i0) * ig + b] = W[o * og + a, i * ig + b] for o in [o0, o1),
// i in [i0, i1); dst has leading dimension ld. Single-threaded: callers parallelize over tiles.
template <typename acc_t, typename code_t>
void dequantize_tile(const Weight<acc_t, code_t>& w, int64_t o0, int64_t o1, int64_t i0, int64_t i1, acc_t* dst,
                     int64_t ld);

// The kernel that computes x @ W^T for one call (ARCHITECTURE.md prints the table of
// choose_kernel in decode.cpp). The few-row kernels read the codes without dequantizing W.
enum class Kernel {
  kGemm,          // blocked dequantize + GEMM (many rows, non-finite or huge x, non-finite scales)
  kDecodeLut,     // portable few-row kernel, lookup tables (nbits <= 8)
  kDecodeGather,  // portable few-row kernel, codebook gathers (nbits > 8)
  kAvx2Lut,       // AVX2/FMA lookup tables (float32 x)
  kAvx2Gather,    // AVX2/FMA codebook gathers (float32 x, out_group 1, in_group 8)
};

// x: the [N, in] rows in the accumulation type; x and scales are scanned (for Inf/NaN, and x for
// |x| >= 2**64) only when few enough rows.
Kernel choose_kernel(const AqlmDims& d, const at::Tensor& x, at::ScalarType codebooks, const at::Tensor& scales);

// Few enough rows for the few-row kernels, whatever the dtypes.
bool decode_fits(const AqlmDims& d, int64_t n_rows);

// kDecodeLut / kDecodeGather: y[n, :] = x[n, :] @ W^T for n < N few rows. x [N, in] and
// y [N, out] are contiguous; parallel over output groups.
template <typename acc_t, typename code_t>
void decode_gemm(const Weight<acc_t, code_t>& w, Kernel kernel, const acc_t* x, int64_t n_rows, acc_t* y);

// The LoRA expand the gather kernel can fuse into its epilogue: out += scaling * xa @ lora_B^T, with
// xa [N, r] and lora_B [out, r] contiguous float32.
struct LoraEpilogue {
  at::Tensor xa;
  at::Tensor lora_B;
  double scaling;
};

// Runs kAvx2Lut / kAvx2Gather: out [N, out] float32 = x @ W^T. With lora given and kernel
// kAvx2Gather, also adds the LoRA expand and returns true; otherwise returns false.
bool avx2_decode(Kernel kernel, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                 const at::Tensor& scales, const AqlmDims& d, at::Tensor& out, const LoraEpilogue* lora = nullptr);

// dst = src * keep / (1 - p) elementwise with the Philox mask of element indices [0, numel).
template <typename acc_t>
void apply_dropout(const acc_t* src, acc_t* dst, int64_t numel, double dropout_p, uint64_t seed, uint64_t offset);

void dropout_mask(bool* dst, int64_t numel, float dropout_p, uint64_t seed, uint64_t offset);

// The LoRA matmuls (lora_gemm.cpp), contiguous row-major, each output reduced in a fixed order so
// results do not depend on the thread count:
// y [N, r] = x [N, k] @ a [r, k]^T
template <typename acc_t>
void rows_dot(const acc_t* x, const acc_t* a, int64_t n_rows, int64_t r, int64_t k, acc_t* y);
// y [N, m] = (accumulate ? y : 0) + alpha * u [N, r] @ v [r, m]
template <typename acc_t>
void expand(const acc_t* u, const acc_t* v, int64_t n_rows, int64_t r, int64_t m, acc_t alpha, bool accumulate,
            acc_t* y);
// y [N, m] += alpha * u [N, r] @ w [m, r]^T, as r-long dots: for few rows, where transposing w
// would cost more than the products
template <typename acc_t>
void expand_rows(const acc_t* u, const acc_t* w, int64_t n_rows, int64_t r, int64_t m, acc_t alpha, acc_t* y);
// y [r, m] = alpha * u [N, r]^T @ v [N, m]
template <typename acc_t>
void outer_sum(const acc_t* u, const acc_t* v, int64_t n_rows, int64_t r, int64_t m, acc_t alpha, acc_t* y);
// dst [cols, rows] = src [rows, cols]^T (ATen's strided copy is ~5x slower for a [4096, 16] lora_B)
template <typename acc_t>
void transpose(const acc_t* src, int64_t rows, int64_t cols, acc_t* dst);

// lora_mixed_forward's LoRA part (multi_lora.cpp): row n uses adapter a = indices[n] (-1: none).
// All buffers contiguous, in acc_t; optional ones are nullptr when absent.
template <typename acc_t>
struct MixedLora {
  const acc_t* x;          // [N, in]
  const int64_t* indices;  // [N], values in [-1, K)
  const acc_t* lora_A;     // [K, r, in]
  const acc_t* lora_B_t;   // [K, r, out]
  const acc_t* lora_bias;  // [K, out] or nullptr
  const acc_t* scalings;   // [K]
  const acc_t* row_scale;  // [K, out] or nullptr
  const acc_t* bias;       // [out] or nullptr
  int64_t n, k, r, in, out;
};
// y [N, out] holds x @ W^T on entry; on exit y[n] = row_scale[a] * (y[n] + s[a] * (x[n] A[a]^T B[a]^T
// + lora_bias[a])) + bias for adapter rows, y[n] + bias for base rows.
template <typename acc_t>
void mixed_lora_rows(const MixedLora<acc_t>& m, acc_t* y);

}  // namespace aqlm_lora::cpu
