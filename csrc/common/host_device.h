// AQLM_LORA_HOST_DEVICE marks the small functions that CPU and CUDA kernels share, so each formula
// is written once for both backends.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AQLM_LORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AQLM_LORA_HOST_DEVICE inline
#endif
