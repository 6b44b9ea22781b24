// Outputs and scratch buffers of the CPU kernels. In the debug mode AQLM_LORA_DEBUG_FILL=nan they
// start as NaN instead of whatever the allocator returned (or zeros), so a kernel that leaves part
// of a buffer unwritten makes the tests fail loudly instead of passing on lucky memory.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace aqlm_lora::cpu {

inline bool debug_fill_nan() {
  static const bool enabled = [] {
    const char* env = std::getenv("AQLM_LORA_DEBUG_FILL");
    return env != nullptr && std::strcmp(env, "nan") == 0;
  }();
  return enabled;
}

// A float tensor every element of which the kernel writes before reading.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (debug_fill_nan() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// A scratch buffer the kernel writes before reading (std::vector would hide such bugs behind zeros).
template <typename T>
std::vector<T> scratch(size_t n) {
  return std::vector<T>(n, debug_fill_nan() ? std::numeric_limits<T>::quiet_NaN() : T(0));
}

}  // namespace aqlm_lora::cpu
