// The LoRA part of lora_mixed_forward on CUDA (one adapter per row, Punica's BGMV): a shrink kernel
// (one warp per (row, rank) dot with that row's A) and an expand kernel (one thread per output
// element, coalesced over the output features, reading that row's B^T) with the epilogue fused:
// y = row_scale * (y + s * (xa B^T + lora_bias)) + bias. Rows need not be sorted by adapter; the
// adapters' weights are re-read from L2. Everything in the accumulation type (float or double).
// NOT YET RUN ON A GPU: scripts/gpu_smoke.py compares it with aqlm_lora/reference.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "common.cuh"

namespace aqlm_lora {
namespace cuda {
namespace {

constexpr int kMixedThreads = 256;
constexpr int kWarpsPerBlock = kMixedThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum_acc(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// xa[n, j] = x[n] . A[indices[n], j]; base rows (index -1) get 0.
template <typename acc_t>
__global__ void mixed_shrink_kernel(const acc_t* __restrict__ x, const int64_t* __restrict__ indices,
                                    const acc_t* __restrict__ lora_A, int64_t n, int64_t k, int64_t r, int64_t in,
                                    acc_t* __restrict__ xa) {
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n * r) return;
  const int64_t row = warp / r, j = warp % r;
  const int64_t a = indices[row];
  // The CPU op refuses such an index; here checking it on the host would cost a device sync, so a
  // device-side assert (as torch's own indexing kernels do) fails the call instead of a wrong row.
  CUDA_KERNEL_ASSERT_MSG(a >= -1 && a < k, "lora_mixed_forward: an index is outside [-1, K)");
  acc_t sum = 0;
  if (a >= 0 && a < k) {
    const acc_t* xr = x + row * in;
    const acc_t* ar = lora_A + (a * r + j) * in;
    for (int64_t i = lane; i < in; i += 32) sum += xr[i] * ar[i];
  }
  sum = warp_sum_acc(sum);
  if (lane == 0) xa[warp] = sum;
}

// y[n, o] = row_scale[a, o] * (y[n, o] + s[a] * (sum_j xa[n, j] B_t[a, j, o] + lora_bias[a, o])) + bias[o]
// for a = indices[n] in [0, K); y[n, o] + bias[o] otherwise. Optional pointers may be null.
template <typename acc_t>
__global__ void mixed_expand_kernel(const acc_t* __restrict__ xa, const int64_t* __restrict__ indices,
                                    const acc_t* __restrict__ lora_B_t, const acc_t* __restrict__ lora_bias,
                                    const acc_t* __restrict__ scalings, const acc_t* __restrict__ row_scale,
                                    const acc_t* __restrict__ bias, int64_t n, int64_t k, int64_t r, int64_t out,
                                    acc_t* __restrict__ y) {
  const int64_t total = n * out;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / out, o = e % out;
    const int64_t a = indices[row];
    CUDA_KERNEL_ASSERT_MSG(a >= -1 && a < k, "lora_mixed_forward: an index is outside [-1, K)");
    acc_t v = y[e];
    if (a >= 0 && a < k) {
      acc_t sum = 0;
      const acc_t* bt = lora_B_t + a * r * out + o;
      const acc_t* u = xa + row * r;
      for (int64_t j = 0; j < r; ++j) sum += u[j] * bt[j * out];
      if (lora_bias != nullptr) sum += lora_bias[a * out + o];
      v += scalings[a] * sum;
      if (row_scale != nullptr) v *= row_scale[a * out + o];
    }
    if (bias != nullptr) v += bias[o];
    y[e] = v;
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

// See ops.cu (lora_mixed_forward_cuda): every tensor contiguous in the accumulation type of y
// (float or double), indices int64; lora_bias, row_scale and bias may be undefined. y [N, out] holds
// x W^T on entry and the op's output on exit.
void mixed_lora_apply(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& lora_A,
                      const at::Tensor& lora_B_t, const at::Tensor& lora_bias, const at::Tensor& scalings,
                      const at::Tensor& row_scale, const at::Tensor& bias, const at::Tensor& y) {
  const int64_t n = y.size(0), out = y.size(1), k = lora_A.size(0), r = lora_A.size(1), in = lora_A.size(2);
  if (n == 0 || out == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool wide = y.scalar_type() == at::kDouble;
  auto launch = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    at::Tensor xa = at::empty({n, r}, y.options());
    if (r > 0) {
      const int64_t warps = n * r;
      const unsigned blocks = static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
      mixed_shrink_kernel<acc_t><<<blocks, kMixedThreads, 0, stream>>>(
          x.data_ptr<acc_t>(), indices.data_ptr<int64_t>(), lora_A.data_ptr<acc_t>(), n, k, r, in,
          xa.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const unsigned grid = grid_for(n * out, kMixedThreads, 8);
    mixed_expand_kernel<acc_t><<<grid, kMixedThreads, 0, stream>>>(
        xa.data_ptr<acc_t>(), indices.data_ptr<int64_t>(), lora_B_t.data_ptr<acc_t>(), ptr_or_null<acc_t>(lora_bias),
        scalings.data_ptr<acc_t>(), ptr_or_null<acc_t>(row_scale), ptr_or_null<acc_t>(bias), n, k, r, out,
        y.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (wide) {
    launch(double{});
  } else {
    launch(float{});
  }
}

}  // namespace cuda
}  // namespace aqlm_lora
