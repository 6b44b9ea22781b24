// Helpers shared by the CUDA kernels of aqlm_lora: dtype dispatch, code decoding, conversions,
// vector loads, warp reductions, launch sizes, and the weight view every host launcher takes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/codes.h"

namespace aqlm_lora {
namespace cuda {

// Threads per block of the element-wise and dequantization kernels.
constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------------
// Host: dtype dispatch. `f` is a generic lambda called with a value of the C++ element type.
// kWithDouble = false leaves float64 out (the decode kernels have no float64 variant), so `f` is
// never instantiated for double there.

template <bool kWithDouble = true, typename F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); return;
    case at::kHalf: f(at::Half{}); return;
    case at::kBFloat16: f(at::BFloat16{}); return;
    case at::kDouble:
      if constexpr (kWithDouble) {
        f(double{});
        return;
      }
      break;
    default: break;
  }
  TORCH_CHECK(!kWithDouble, "aqlm_lora: ", what, " must be float32, float16, bfloat16 or float64, got ", t);
  TORCH_CHECK(false, "aqlm_lora: internal error: ", what, " has no decode kernel for ", t);
}

template <typename F>
void dispatch_code(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kChar: f(int8_t{}); break;
    case at::kShort: f(int16_t{}); break;
    default: TORCH_CHECK(false, "aqlm_lora: codes must be int8 or int16, got ", t);
  }
}

inline bool is_single_or_half(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Element type of a float tensor, known only at run time by device code (used where one load or
// store per output element is all that depends on it, so a template parameter is not worth it).
enum class FloatKind : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

inline FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatKind::kF32;
    case at::kHalf: return FloatKind::kF16;
    case at::kBFloat16: return FloatKind::kBF16;
    case at::kDouble: return FloatKind::kF64;
    default: TORCH_CHECK(false, "aqlm_lora: internal error: no FloatKind for ", t);
  }
  return FloatKind::kF32;
}

// Accumulation type: double when any side is double, float otherwise.
template <typename A, typename B>
using acc_type_t =
    std::conditional_t<std::is_same<A, double>::value || std::is_same<B, double>::value, double, float>;

// ------------------------------------------------------------------------------------------------
// Host: tensors and launch sizes.

// Contiguous and 16-byte aligned (vector loads need it); copies only when the view is misaligned.
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks for a grid-stride loop over `work` items (> 0) with `per_block` items per block pass.
inline unsigned grid_for(int64_t work, int64_t per_block, int64_t max_blocks_per_sm) {
  const int64_t want = (work + per_block - 1) / per_block;
  const int64_t cap = std::max<int64_t>(1, sm_count() * max_blocks_per_sm);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(want, cap)));
}

// bfloat16 arithmetic in these kernels needs compute capability 8.0 (Ampere) or newer.
inline void check_bf16_supported(std::initializer_list<at::ScalarType> dtypes) {
  bool any_bf16 = false;
  for (auto t : dtypes) any_bf16 = any_bf16 || t == at::kBFloat16;
  if (!any_bf16) return;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "aqlm_lora: bfloat16 needs a GPU of compute capability 8.0 (Ampere) or newer; ",
              prop->name, " has ", prop->major, ".", prop->minor, ". Use float16 or float32 instead.");
}

// One AQLM weight as the launchers take it: codes contiguous, codebooks contiguous and 16-byte
// aligned, scales flattened to [out_groups] and contiguous (any float dtype).
struct WeightRef {
  at::Tensor codes;
  at::Tensor codebooks;
  at::Tensor scales;
  AqlmDims d;
  uint32_t code_mask() const { return static_cast<uint32_t>(d.codebook_size - 1); }
};

inline WeightRef make_weight(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                             const AqlmDims& d) {
  return WeightRef{codes.contiguous(), aligned_contiguous(codebooks), scales.reshape({-1}).contiguous(), d};
}

// ------------------------------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) { return __uint_as_float((bits & 0xFFFFu) << 16); }

template <typename T>
__device__ __forceinline__ float bits_to_float(uint32_t bits);
template <>
__device__ __forceinline__ float bits_to_float<at::Half>(uint32_t bits) {
  return half_bits_to_float(bits);
}
template <>
__device__ __forceinline__ float bits_to_float<at::BFloat16>(uint32_t bits) {
  return bf16_bits_to_float(bits);
}

// Eight consecutive elements (16-byte aligned for 2-byte types, 32-byte for float) as float,
// read through the read-only cache.
template <typename T>
__device__ __forceinline__ void load8_ldg(const T* __restrict__ p, float (&v)[8]) {
  if constexpr (std::is_same<T, float>::value) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    static_assert(sizeof(T) == 2, "load8_ldg: float, Half or BFloat16");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = bits_to_float<T>(words[k] & 0xFFFFu);  // little endian: element 2k is the low half
      v[2 * k + 1] = bits_to_float<T>(words[k] >> 16);
    }
  }
}

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, FloatKind k) {
  switch (k) {
    case FloatKind::kF16: return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case FloatKind::kBF16: return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
    case FloatKind::kF64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, float v, FloatKind k) {
  switch (k) {
    case FloatKind::kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case FloatKind::kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case FloatKind::kF64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// Convert an accumulator to the output element type (half/bfloat16 go through float once).
template <typename out_t, typename acc_t>
__device__ __forceinline__ out_t to_out(acc_t v) {
  if constexpr (std::is_same<out_t, double>::value || std::is_same<out_t, float>::value) {
    return static_cast<out_t>(v);
  } else {
    return out_t(static_cast<float>(v));
  }
}

// n / d for 0 <= n and 0 < d, in 32 bits when both fit (64-bit division is a slow subroutine call).
__device__ __forceinline__ int64_t div_nonneg(int64_t n, int64_t d) {
  if (n <= 0xFFFFFFFFll && d <= 0xFFFFFFFFll) {
    return static_cast<int64_t>(static_cast<uint32_t>(n) / static_cast<uint32_t>(d));
  }
  return n / d;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace cuda
}  // namespace aqlm_lora
