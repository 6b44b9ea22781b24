// Dequantization of a block of an AQLM weight into a dense tile (used by the dequantize op and by
// the tiled cuBLAS path of aqlm_gemm / aqlm_gemm_t / lora_forward / lora_backward).
//
//   W[o*og + a, i*ig + b] = scales[o] * sum_c codebooks[c, codes[o, i, c] mod 2**nbits, a, b]
//
// One thread per (row, in-group) of the block: it reads the C codes of that group once and writes
// in_group consecutive elements (one 16-byte store when in_group = 8 and the tile is 16-bit).
// Adjacent threads take adjacent in-groups of the same row, so code reads and tile writes coalesce.
#include "kernels.cuh"

namespace aqlm_lora {
namespace cuda {
namespace {

struct DequantArgs {
  int64_t row0, nrows;      // rows of W in the tile
  int64_t group0, ngroups;  // in-groups of W in the tile
  int64_t in_groups, num_codebooks, codebook_size, out_group, in_group;
  uint32_t mask;  // codebook_size - 1
};

// Stores 8 accumulators (times the scale) as 8 consecutive out_t; `dst` is 16-byte aligned.
template <typename out_t, typename acc_t>
__device__ __forceinline__ void store8(out_t* dst, const acc_t (&w)[8], acc_t s) {
  if constexpr (sizeof(out_t) == 2) {
    uint32_t words[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const out_t lo = to_out<out_t>(w[2 * k] * s);
      const out_t hi = to_out<out_t>(w[2 * k + 1] * s);
      words[k] = static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  } else if constexpr (std::is_same<out_t, float>::value) {
    float4* d4 = reinterpret_cast<float4*>(dst);
    d4[0] = make_float4(static_cast<float>(w[0] * s), static_cast<float>(w[1] * s), static_cast<float>(w[2] * s),
                        static_cast<float>(w[3] * s));
    d4[1] = make_float4(static_cast<float>(w[4] * s), static_cast<float>(w[5] * s), static_cast<float>(w[6] * s),
                        static_cast<float>(w[7] * s));
  } else {
#pragma unroll
    for (int b = 0; b < 8; ++b) dst[b] = to_out<out_t>(w[b] * s);
  }
}

// kIG = 8: in_group fixed at 8 (vector loads/stores; needs 16-byte aligned codebooks and tile).
// kIG = 0: any in_group, scalar loads and stores.
template <typename cb_t, typename code_t, typename out_t, int kIG>
__global__ void __launch_bounds__(kThreads)
    dequant_tile_kernel(const code_t* __restrict__ codes, const cb_t* __restrict__ codebooks,
                        const acc_type_t<cb_t, out_t>* __restrict__ scales, out_t* __restrict__ tile,
                        const DequantArgs a) {
  using acc_t = acc_type_t<cb_t, out_t>;
  const int64_t ig = kIG > 0 ? kIG : a.in_group;
  const int64_t ld = a.ngroups * ig;
  const int64_t total = a.nrows * a.ngroups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t rr = div_nonneg(t, a.ngroups);
    const int64_t gi = t - rr * a.ngroups;
    const int64_t row = a.row0 + rr;
    const int64_t o = a.out_group == 1 ? row : div_nonneg(row, a.out_group);
    const int64_t sub = row - o * a.out_group;  // row inside the output group
    const code_t* cp = codes + (o * a.in_groups + a.group0 + gi) * a.num_codebooks;
    const acc_t s = scales[o];
    out_t* dst = tile + rr * ld + gi * ig;
    if constexpr (kIG == 8) {
      acc_t w[8];
#pragma unroll
      for (int b = 0; b < 8; ++b) w[b] = acc_t(0);
      for (int64_t c = 0; c < a.num_codebooks; ++c) {
        const int64_t idx = code_index(cp[c], a.mask);
        const cb_t* src = codebooks + ((c * a.codebook_size + idx) * a.out_group + sub) * 8;
        if constexpr (std::is_same<acc_t, float>::value) {
          float v[8];
          load8_ldg(src, v);
#pragma unroll
          for (int b = 0; b < 8; ++b) w[b] += v[b];
        } else {
#pragma unroll
          for (int b = 0; b < 8; ++b) w[b] += static_cast<acc_t>(src[b]);
        }
      }
      store8(dst, w, s);
    } else {
      for (int64_t b = 0; b < ig; ++b) {
        acc_t w = acc_t(0);
        for (int64_t c = 0; c < a.num_codebooks; ++c) {
          const int64_t idx = code_index(cp[c], a.mask);
          w += static_cast<acc_t>(codebooks[((c * a.codebook_size + idx) * a.out_group + sub) * ig + b]);
        }
        dst[b] = to_out<out_t>(w * s);
      }
    }
  }
}

}  // namespace

void dequantize_tile(const WeightRef& w, int64_t row0, int64_t nrows, int64_t group0, int64_t ngroups,
                     const at::Tensor& tile) {
  const AqlmDims& d = w.d;
  TORCH_INTERNAL_ASSERT(row0 >= 0 && nrows >= 0 && row0 + nrows <= d.out_features());
  TORCH_INTERNAL_ASSERT(group0 >= 0 && ngroups >= 0 && group0 + ngroups <= d.in_groups);
  TORCH_INTERNAL_ASSERT(tile.is_contiguous() && tile.numel() == nrows * ngroups * d.in_group);
  const int64_t total = nrows * ngroups;
  if (total == 0) return;

  const DequantArgs args{row0,        nrows,           group0,      ngroups,    d.in_groups,
                         d.num_codebooks, d.codebook_size, d.out_group, d.in_group, w.code_mask()};
  const unsigned grid = grid_for(total, kThreads, 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool vec8 = d.in_group == 8 && reinterpret_cast<uintptr_t>(tile.data_ptr()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(w.codebooks.data_ptr()) % 16 == 0;

  dispatch_float(w.codebooks.scalar_type(), "codebooks", [&](auto cb_tag) {
    using cb_t = decltype(cb_tag);
    dispatch_float(tile.scalar_type(), "dequantized tile", [&](auto out_tag) {
      using out_t = decltype(out_tag);
      using acc_t = acc_type_t<cb_t, out_t>;
      const at::Tensor scales =
          w.scales.to(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat).contiguous();
      dispatch_code(w.codes.scalar_type(), [&](auto code_tag) {
        using code_t = decltype(code_tag);
        const code_t* codes = w.codes.data_ptr<code_t>();
        const cb_t* cb = w.codebooks.data_ptr<cb_t>();
        const acc_t* sc = scales.data_ptr<acc_t>();
        out_t* out = tile.data_ptr<out_t>();
        if (vec8) {
          dequant_tile_kernel<cb_t, code_t, out_t, 8><<<grid, kThreads, 0, stream>>>(codes, cb, sc, out, args);
        } else {
          dequant_tile_kernel<cb_t, code_t, out_t, 0><<<grid, kThreads, 0, stream>>>(codes, cb, sc, out, args);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace cuda
}  // namespace aqlm_lora
