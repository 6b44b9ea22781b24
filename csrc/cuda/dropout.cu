// Philox dropout on CUDA: the keep-mask op and the in-place "x * keep / (1 - p)" used by the LoRA
// path. Element i (row-major position) is kept when philox_uniform(seed, offset, i) >= p, with the
// generator of csrc/common/philox.h, so the mask is bit-identical to the CPU kernels and reference.py.
// One thread handles the 4 elements that share one Philox call (counter = i / 4).
#include "common/dropout.h"
#include "common/philox.h"
#include "kernels.cuh"

namespace aqlm_lora {
namespace cuda {
namespace {

// Calls f(i, keep_i) for every element i < numel, one thread per quadruple 4q .. 4q+3 so each
// Philox call (counter q, see philox.h's philox_uniform) serves four elements.
template <typename F>
__device__ __forceinline__ void for_each_keep(int64_t numel, uint64_t seed, uint64_t offset, float p, F&& f) {
  const int64_t quads = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < quads; q += stride) {
    const PhiloxWords r = philox4x32_10(static_cast<uint64_t>(q), offset, seed);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * q + j;
      if (i < numel) f(i, word_to_uniform(r.w[j]) >= p);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    dropout_mask_kernel(bool* __restrict__ mask, int64_t numel, uint64_t seed, uint64_t offset, float p) {
  for_each_keep(numel, seed, offset, p, [&](int64_t i, bool keep) { mask[i] = keep; });
}

// x * mask / (1 - p) (common/dropout.h) in the accumulation type (float32, float64 for float64).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dropout_scale_kernel(T* __restrict__ data, int64_t numel, uint64_t seed, uint64_t offset, float p,
                         acc_type_t<T, T> one_minus_p) {
  using acc_t = acc_type_t<T, T>;
  for_each_keep(numel, seed, offset, p, [&](int64_t i, bool keep) {
    data[i] = to_out<T>(dropout_scaled(static_cast<acc_t>(data[i]), keep, one_minus_p));
  });
}

}  // namespace

void dropout_mask_fill(const at::Tensor& mask, double dropout_p, uint64_t seed, uint64_t offset) {
  TORCH_INTERNAL_ASSERT(mask.is_contiguous() && mask.scalar_type() == at::kBool);
  const int64_t numel = mask.numel();
  if (numel == 0) return;
  const unsigned grid = grid_for((numel + 3) / 4, kThreads, 16);
  dropout_mask_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mask.data_ptr<bool>(), numel, seed, offset, static_cast<float>(dropout_p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dropout_scale_inplace(const at::Tensor& t, double dropout_p, uint64_t seed, uint64_t offset) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  const int64_t numel = t.numel();
  if (numel == 0) return;
  const unsigned grid = grid_for((numel + 3) / 4, kThreads, 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(t.scalar_type(), "dropout input", [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type_t<T, T>;
    // Like reference.py: the divisor is the Python float (1 - p), as the accumulation type.
    const acc_t one_minus_p = static_cast<acc_t>(1.0 - dropout_p);
    dropout_scale_kernel<T><<<grid, kThreads, 0, stream>>>(t.data_ptr<T>(), numel, seed, offset,
                                                           static_cast<float>(dropout_p), one_minus_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace aqlm_lora
