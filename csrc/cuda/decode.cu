// Decode GEMV kernels (few tokens):
//   y[n, row] = x[n] . W[row] + bias[row] + s * (xa[n] . lora_B[row] + lora_bias[row]).
//
// One warp per output row (grid-stride over rows); its lanes walk the in-groups (or the columns),
// decode each code once and FMA the codebook row with all N <= kDecodeMaxRows tokens, so the
// codes (the bulk of the bytes) are read once per call whatever N is. x is float32 (converted by
// the caller); the epilogue applies the scale, adds bias, lora_bias and the LoRA expand (reading
// them in their own dtypes) and stores in the output dtype.
//
//   gemv_ig8_global_kernel  in_group 8, codebook rows gathered from global memory through the
//                           read-only cache / L2 (1x16: 65536 x 8 halves = 1 MiB stays in L2);
//                           4 in-groups per lane in flight to hide the gather latency.
//   gemv_ig8_smem_kernel    in_group 8, nbits <= 8: all codebooks staged in shared memory as
//                           float32 (2x8 g8: 16 KiB), when they fit; else the global kernel.
//   gemv_generic_kernel     any num_codebooks / nbits / out_group / in_group: lanes walk columns.
//
// lora_shrink_kernel computes xa = dropout(x) A^T (float32, one block per (token, rank) pair),
// regenerating the Philox mask on the fly; the GEMV epilogue then adds s * xa . lora_B[row].
#include <cstdlib>

#include "common/dropout.h"
#include "common/philox.h"
#include "kernels.cuh"

namespace aqlm_lora {
namespace cuda {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kWarpsPerBlock = kGemvThreads / 32;
// Largest token count one kernel instantiation handles (NT = 1 or NT = 8).
constexpr int kMaxNT = 8;
static_assert(kDecodeMaxRows >= 1 && kDecodeMaxRows <= kMaxNT, "decode kernels handle at most 8 tokens");

struct GemvArgs {
  const float* x;  // [N, in] float32, 16-byte aligned rows (in is a multiple of 8 on the ig8 kernels)
  int64_t n_tokens, in_features, out_features;
  int64_t in_groups, num_codebooks, codebook_size, out_group, in_group;
  uint32_t mask;  // codebook_size - 1
  const void* codes;      // [O, I, C] int8/int16
  const void* codebooks;  // [C, K, og, ig]
  const void* scales;     // [O], any float dtype (scales_kind)
  FloatKind scales_kind;
  const void* bias;  // [out] or nullptr
  FloatKind bias_kind;
  const void* lora_bias;  // [out] or nullptr; added times scaling
  FloatKind lora_bias_kind;
  const float* xa;  // [N, r] or nullptr when there is no LoRA expand
  const void* lora_B;  // [out, r]
  FloatKind lora_B_kind;
  int64_t rank;
  float scaling;
  void* y;  // [N, out]
  FloatKind y_kind;
};

// Warp index / count of a grid-stride loop over rows (one warp per row).
__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}
__device__ __forceinline__ int64_t warp_count() { return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5; }

// A finite scale multiplies the finished dot product. A non-finite one multiplies each weight
// first, as W = scale * (codebook sum) does: inf * (x . w) is +-inf where the sum of x * (inf * w)
// is NaN (mixed signs, or a zero w), as F.linear on the dequantized weight gives. Multiplying by 1
// is exact, so finite scales keep their bits.
__device__ __forceinline__ float scale_inside(float s) { return isfinite(s) ? 1.f : s; }
__device__ __forceinline__ float scale_after(float s) { return isfinite(s) ? s : 1.f; }

// acc[n]: this lane's partial x[n] . (W[row] / scale_after). All lanes of the warp call it together.
template <int NT>
__device__ __forceinline__ void gemv_epilogue(const GemvArgs& a, int64_t row, int64_t o, int lane,
                                              const float (&acc)[NT]) {
  const float s = scale_after(load_as_float(a.scales, o, a.scales_kind));
  float row_bias = 0.f;  // bias + scaling * lora_bias, added once by lane 0
  if (lane == 0) {
    if (a.bias != nullptr) row_bias += load_as_float(a.bias, row, a.bias_kind);
    if (a.lora_bias != nullptr) row_bias += a.scaling * load_as_float(a.lora_bias, row, a.lora_bias_kind);
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    if (NT > 1 && n >= a.n_tokens) break;  // uniform over the warp
    float v = acc[n] * s;
    if (a.xa != nullptr) {
      float l = 0.f;
      for (int64_t j = lane; j < a.rank; j += 32) {
        l += a.xa[n * a.rank + j] * load_as_float(a.lora_B, row * a.rank + j, a.lora_B_kind);
      }
      v += a.scaling * l;
    }
    v = warp_sum(v);
    if (lane == 0) store_from_float(a.y, n * a.out_features + row, v + row_bias, a.y_kind);
  }
}

// The grid-stride loop over output rows that every GEMV kernel runs, one warp per row: for each
// row, body(codes, sub, inside, acc) adds this lane's share of x . (inside * W[row] / scale) into
// acc, given the codes of the row's output group, the row's place sub in that group and the factor
// inside (scale_inside) that multiplies each summed weight; then the warp reduces.
template <int NT, typename code_t, typename Body>
__device__ __forceinline__ void for_each_warp_row(const GemvArgs& a, int64_t C, Body&& body) {
  const int lane = threadIdx.x & 31;
  const code_t* codes = static_cast<const code_t*>(a.codes);
  for (int64_t row = global_warp(); row < a.out_features; row += warp_count()) {
    const int64_t o = a.out_group == 1 ? row : div_nonneg(row, a.out_group);
    float acc[NT] = {};
    const float inside = scale_inside(load_as_float(a.scales, o, a.scales_kind));
    body(codes + o * a.in_groups * C, row - o * a.out_group, inside, acc);
    gemv_epilogue<NT>(a, row, o, lane, acc);
  }
}

// acc[n] += w . x[n, 8 i : 8 i + 8]
template <int NT>
__device__ __forceinline__ void fma_tokens8(const GemvArgs& a, int64_t i, const float (&w)[8], float (&acc)[NT]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    if (NT == 1 || n < a.n_tokens) {
      float xv[8];
      load8_ldg(a.x + n * a.in_features + i * 8, xv);
#pragma unroll
      for (int b = 0; b < 8; ++b) acc[n] = fmaf(w[b], xv[b], acc[n]);
    }
  }
}

template <typename cb_t, typename code_t, int NT, bool kOneCodebook>
__global__ void __launch_bounds__(kGemvThreads) gemv_ig8_global_kernel(const GemvArgs a) {
  constexpr int kUnroll = 4;  // in-groups per lane in flight
  const int lane = threadIdx.x & 31;
  const cb_t* cb = static_cast<const cb_t*>(a.codebooks);
  const int64_t C = kOneCodebook ? 1 : a.num_codebooks;
  for_each_warp_row<NT, code_t>(a, C, [&](const code_t* crow, int64_t sub, float inside, float (&acc)[NT]) {
    for (int64_t i0 = lane; i0 < a.in_groups; i0 += 32 * kUnroll) {
      float w[kUnroll][8];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int b = 0; b < 8; ++b) w[u][b] = 0.f;
      }
      for (int64_t c = 0; c < C; ++c) {
        uint32_t idx[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t i = i0 + u * 32;
          // Out-of-range groups read codebook row 0 (a valid address) and are never used.
          idx[u] = i < a.in_groups ? code_index(crow[i * C + c], a.mask) : 0u;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          float v[8];
          load8_ldg(cb + ((c * a.codebook_size + idx[u]) * a.out_group + sub) * 8, v);
#pragma unroll
          for (int b = 0; b < 8; ++b) w[u][b] += v[b];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + u * 32;
#pragma unroll
        for (int b = 0; b < 8; ++b) w[u][b] *= inside;
        if (i < a.in_groups) fma_tokens8<NT>(a, i, w[u], acc);
      }
    }
  });
}

template <typename cb_t, typename code_t, int NT>
__global__ void __launch_bounds__(kGemvThreads) gemv_ig8_smem_kernel(const GemvArgs a) {
  extern __shared__ float4 gemv_smem[];
  float* books = reinterpret_cast<float*>(gemv_smem);  // [C, K, og, 8] float32
  const cb_t* cb = static_cast<const cb_t*>(a.codebooks);
  const int64_t book_elems = a.num_codebooks * a.codebook_size * a.out_group * 8;
  for (int64_t e = threadIdx.x; e < book_elems; e += blockDim.x) books[e] = static_cast<float>(cb[e]);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t C = a.num_codebooks;
  for_each_warp_row<NT, code_t>(a, C, [&](const code_t* crow, int64_t sub, float inside, float (&acc)[NT]) {
    for (int64_t i = lane; i < a.in_groups; i += 32) {
      float w[8];
#pragma unroll
      for (int b = 0; b < 8; ++b) w[b] = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const uint32_t idx = code_index(crow[i * C + c], a.mask);
        const float4* src = reinterpret_cast<const float4*>(books + ((c * a.codebook_size + idx) * a.out_group + sub) * 8);
        const float4 lo = src[0], hi = src[1];
        w[0] += lo.x; w[1] += lo.y; w[2] += lo.z; w[3] += lo.w;
        w[4] += hi.x; w[5] += hi.y; w[6] += hi.z; w[7] += hi.w;
      }
#pragma unroll
      for (int b = 0; b < 8; ++b) w[b] *= inside;
      fma_tokens8<NT>(a, i, w, acc);
    }
  });
}

template <typename cb_t, typename code_t, int NT>
__global__ void __launch_bounds__(kGemvThreads) gemv_generic_kernel(const GemvArgs a) {
  const int lane = threadIdx.x & 31;
  const cb_t* cb = static_cast<const cb_t*>(a.codebooks);
  const int64_t C = a.num_codebooks;
  for_each_warp_row<NT, code_t>(a, C, [&](const code_t* crow, int64_t sub, float inside, float (&acc)[NT]) {
    for (int64_t k = lane; k < a.in_features; k += 32) {
      const int64_t i = div_nonneg(k, a.in_group);
      const int64_t b = k - i * a.in_group;
      float w = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const uint32_t idx = code_index(crow[i * C + c], a.mask);
        w += static_cast<float>(cb[((c * a.codebook_size + idx) * a.out_group + sub) * a.in_group + b]);
      }
      w *= inside;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (NT == 1 || n < a.n_tokens) acc[n] = fmaf(w, a.x[n * a.in_features + k], acc[n]);
      }
    }
  });
}

// xa[n, j] = sum_k (x[n, k] * keep(n*in + k) / (1 - p)) * A[j, k]; one block per (n, j). Written as
// float32 (for the GEMV epilogue) and, when xa_out is given, also in lora_A's dtype (the op's output).
// A block, not a warp, per pair: at N = 1 there are only r pairs, and r warps each streaming all of
// `in` left the GPU nearly idle (latency-bound). The sum order is fixed (thread-strided partials,
// then warp, then block), so results do not depend on the grid size.
template <typename a_t>
__global__ void __launch_bounds__(kGemvThreads)
    lora_shrink_kernel(const float* __restrict__ x, int64_t n_tokens, int64_t in_features,
                       const a_t* __restrict__ lora_A, int64_t rank, float* __restrict__ xa, void* xa_out,
                       FloatKind xa_out_kind, bool dropout,
                       float p, float one_minus_p, uint64_t seed, uint64_t offset) {
  __shared__ float warp_partial[kWarpsPerBlock];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t t = blockIdx.x; t < n_tokens * rank; t += gridDim.x) {  // uniform over the block
    const int64_t n = div_nonneg(t, rank);
    const int64_t j = t - n * rank;
    float acc = 0.f;
    for (int64_t k = threadIdx.x; k < in_features; k += kGemvThreads) {
      const int64_t index = n * in_features + k;  // row-major position in the [N, in] input
      float xv = x[index];
      if (dropout) xv = dropout_scaled(xv, dropout_keep(seed, offset, static_cast<uint64_t>(index), p), one_minus_p);
      acc = fmaf(xv, static_cast<float>(lora_A[j * in_features + k]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) warp_partial[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      float v = lane < kWarpsPerBlock ? warp_partial[lane] : 0.f;
      v = warp_sum(v);
      if (lane == 0) {
        xa[t] = v;
        if (xa_out != nullptr) store_from_float(xa_out, t, v, xa_out_kind);
      }
    }
    __syncthreads();  // warp_partial is rewritten by the next pair
  }
}

// Blocks per SM of the GEMV grids: AQLM_LORA_CUDA_GEMV_BLOCKS_PER_SM (read once per process; a
// positive integer) overrides each kernel's default. Every row is computed the same way by whichever
// warp takes it (grid-stride), so the knob changes speed, never results; it exists so that the
// default can be measured (scripts/gpu/gemv_grid_sweep.py).
int64_t gemv_blocks_per_sm(int64_t default_value) {
  static const int64_t forced = [] {
    const char* text = std::getenv("AQLM_LORA_CUDA_GEMV_BLOCKS_PER_SM");
    if (text == nullptr || *text == '\0') return int64_t{0};
    char* end = nullptr;
    const long long v = std::strtoll(text, &end, 10);
    TORCH_CHECK(*end == '\0' && v > 0 && v <= 1024,
                "AQLM_LORA_CUDA_GEMV_BLOCKS_PER_SM must be an integer in [1, 1024], got '", text, "'");
    return static_cast<int64_t>(v);
  }();
  return forced > 0 ? forced : default_value;
}

template <typename F>
void dispatch_nt(int64_t n_tokens, F&& f) {
  if (n_tokens == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, kMaxNT>{});
  }
}

}  // namespace

// Bytes of shared memory the in_group-8 kernel stages: every codebook entry as float32.
int64_t gemv_shared_bytes(const AqlmDims& d) {
  return d.num_codebooks * d.codebook_size * d.out_group * 8 * static_cast<int64_t>(sizeof(float));
}

// Which kernel runs x @ W^T (+ LoRA) on CUDA; N = rows of x:
//
//   N, dtypes                                             | scheme                              | kernel
//   N = 0 or N > 2, x or codebooks float64, LoRA float64  | any                                 | kTiledGemm
//   1 <= N <= 2                                           | ig 8, B <= 8, codebooks fit opt-in  | kGemvSharedIg8
//   1 <= N <= 2                                           | ig 8 (other)                        | kGemvGlobalIg8
//   1 <= N <= 2                                           | ig != 8                             | kGemvGeneric
// (N <= kDecodeMaxRows, kernels.cuh: 2 as measured; the kernels themselves take up to 8 tokens.)
//
// "Fit opt-in": C * 2**B * og * 8 floats <= the device's opt-in shared memory per block (above 48
// KiB the kernel opts in). ig-8 kernels also need 16-byte aligned codebooks (copied if not).
Kernel choose_kernel(const AqlmDims& d, int64_t n_rows, at::ScalarType x, const at::Tensor& codebooks,
                     bool lora_decodable) {
  const bool gemv = n_rows >= 1 && n_rows <= kDecodeMaxRows && d.in_features() > 0 && d.out_features() > 0 &&
                    is_single_or_half(x) && is_single_or_half(codebooks.scalar_type()) && lora_decodable;
  if (!gemv) return Kernel::kTiledGemm;
  if (d.in_group != 8) return Kernel::kGemvGeneric;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const bool smem_fits = gemv_shared_bytes(d) <= static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  return d.nbits <= 8 && smem_fits ? Kernel::kGemvSharedIg8 : Kernel::kGemvGlobalIg8;
}

void lora_shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p, uint64_t seed, uint64_t offset,
                 const at::Tensor& xa, const at::Tensor& xa_out) {
  TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2);
  TORCH_INTERNAL_ASSERT(lora_A.is_contiguous() && lora_A.dim() == 2 && lora_A.size(1) == x.size(1));
  TORCH_INTERNAL_ASSERT(xa.scalar_type() == at::kFloat && xa.is_contiguous() && xa.size(0) == x.size(0) &&
                        xa.size(1) == lora_A.size(0));
  const bool second = xa_out.defined() && !xa_out.is_same(xa);
  TORCH_INTERNAL_ASSERT(!second || (xa_out.is_contiguous() && xa_out.sizes() == xa.sizes()));
  const int64_t n_tokens = x.size(0), in_features = x.size(1), rank = lora_A.size(0);
  if (n_tokens * rank == 0) return;
  const unsigned grid = grid_for(n_tokens * rank, /*per_block=*/1, 8);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool dropout = dropout_p > 0.0;
  dispatch_float</*kWithDouble=*/false>(lora_A.scalar_type(), "lora_A", [&](auto tag) {
    using a_t = decltype(tag);
    lora_shrink_kernel<a_t><<<grid, kGemvThreads, 0, stream>>>(
        x.data_ptr<float>(), n_tokens, in_features, lora_A.data_ptr<a_t>(), rank, xa.data_ptr<float>(),
        second ? xa_out.data_ptr() : nullptr, second ? float_kind(xa_out.scalar_type()) : FloatKind::kF32, dropout,
        static_cast<float>(dropout_p), static_cast<float>(1.0 - dropout_p), seed, offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void decode_gemv(Kernel kernel, const at::Tensor& x, const WeightRef& w, const at::Tensor& bias,
                 const at::Tensor& lora_bias,
                 const at::Tensor& xa, const at::Tensor& lora_B, float scaling, const at::Tensor& y) {
  const AqlmDims& d = w.d;
  const int64_t n_tokens = x.size(0);
  TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
                        x.size(1) == d.in_features() && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0);
  TORCH_INTERNAL_ASSERT(n_tokens >= 0 && n_tokens <= kDecodeMaxRows);
  TORCH_INTERNAL_ASSERT(y.is_contiguous() && y.size(0) == n_tokens && y.size(1) == d.out_features());
  TORCH_INTERNAL_ASSERT(!bias.defined() || bias.is_contiguous());
  TORCH_INTERNAL_ASSERT(!lora_bias.defined() || lora_bias.is_contiguous());
  TORCH_INTERNAL_ASSERT(w.scales.is_contiguous());
  if (n_tokens == 0 || d.out_features() == 0) return;

  GemvArgs a{};
  a.x = x.data_ptr<float>();
  a.n_tokens = n_tokens;
  a.in_features = d.in_features();
  a.out_features = d.out_features();
  a.in_groups = d.in_groups;
  a.num_codebooks = d.num_codebooks;
  a.codebook_size = d.codebook_size;
  a.out_group = d.out_group;
  a.in_group = d.in_group;
  a.mask = w.code_mask();
  a.codes = w.codes.data_ptr();
  a.codebooks = w.codebooks.data_ptr();
  a.scales = w.scales.data_ptr();
  a.scales_kind = float_kind(w.scales.scalar_type());
  a.bias = bias.defined() ? bias.data_ptr() : nullptr;
  a.bias_kind = bias.defined() ? float_kind(bias.scalar_type()) : FloatKind::kF32;
  a.lora_bias = lora_bias.defined() ? lora_bias.data_ptr() : nullptr;
  a.lora_bias_kind = lora_bias.defined() ? float_kind(lora_bias.scalar_type()) : FloatKind::kF32;
  a.scaling = scaling;
  const bool lora = xa.defined() && xa.size(1) > 0;
  if (lora) {
    TORCH_INTERNAL_ASSERT(xa.scalar_type() == at::kFloat && xa.is_contiguous() && xa.size(0) == n_tokens);
    TORCH_INTERNAL_ASSERT(lora_B.is_contiguous() && lora_B.size(0) == d.out_features() &&
                          lora_B.size(1) == xa.size(1));
    a.xa = xa.data_ptr<float>();
    a.lora_B = lora_B.data_ptr();
    a.lora_B_kind = float_kind(lora_B.scalar_type());
    a.rank = xa.size(1);
  } else {
    a.xa = nullptr;
    a.lora_B = nullptr;
    a.lora_B_kind = FloatKind::kF32;
    a.rank = 0;
  }
  a.y = y.data_ptr();
  a.y_kind = float_kind(y.scalar_type());

  TORCH_INTERNAL_ASSERT(kernel != Kernel::kTiledGemm);
  // WeightRef holds codebooks 16-byte aligned (aligned_contiguous), as the ig-8 kernels need.
  TORCH_INTERNAL_ASSERT(kernel == Kernel::kGemvGeneric ||
                        reinterpret_cast<uintptr_t>(w.codebooks.data_ptr()) % 16 == 0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = d.out_features();
  const int64_t smem_bytes = gemv_shared_bytes(d);
  constexpr int64_t kDefaultSmem = 48 * 1024;  // above this a kernel must opt in

  dispatch_float</*kWithDouble=*/false>(w.codebooks.scalar_type(), "codebooks", [&](auto cb_tag) {
    using cb_t = decltype(cb_tag);
    dispatch_code(w.codes.scalar_type(), [&](auto code_tag) {
      using code_t = decltype(code_tag);
      dispatch_nt(n_tokens, [&](auto nt_tag) {
        constexpr int NT = decltype(nt_tag)::value;
        if (kernel == Kernel::kGemvSharedIg8) {
          auto smem_kernel = gemv_ig8_smem_kernel<cb_t, code_t, NT>;
          if (smem_bytes > kDefaultSmem) {
            C10_CUDA_CHECK(cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(smem_bytes)));
          }
          // At most 4 blocks per SM, each staging the codebooks once for its rows: 2 left an H200's
          // SMs at 23% occupancy (ncu); 4, 8 and 16 measured alike and 8-24% faster than 2
          // (scripts/gpu/gemv_grid_sweep.py, benchmarks/results/gpu/run2/sweep.md).
          const unsigned grid = grid_for(rows, kWarpsPerBlock, gemv_blocks_per_sm(4));
          smem_kernel<<<grid, kGemvThreads, static_cast<size_t>(smem_bytes), stream>>>(a);
        } else if (kernel == Kernel::kGemvGlobalIg8) {
          const unsigned grid = grid_for(rows, kWarpsPerBlock, gemv_blocks_per_sm(8));
          if (d.num_codebooks == 1) {
            gemv_ig8_global_kernel<cb_t, code_t, NT, true><<<grid, kGemvThreads, 0, stream>>>(a);
          } else {
            gemv_ig8_global_kernel<cb_t, code_t, NT, false><<<grid, kGemvThreads, 0, stream>>>(a);
          }
        } else {
          const unsigned grid = grid_for(rows, kWarpsPerBlock, gemv_blocks_per_sm(8));
          gemv_generic_kernel<cb_t, code_t, NT><<<grid, kGemvThreads, 0, stream>>>(a);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace cuda
}  // namespace aqlm_lora
