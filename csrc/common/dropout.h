// The inverted-dropout formula, once for the CPU and CUDA kernels (reference.dropout_scaled is
// the Python copy). The keep decision itself comes from Philox (common/philox.h).
#pragma once

#include "common/host_device.h"

namespace aqlm_lora {

// x * keep / (1 - p) as torch's dropout computes it: multiply by the 0/1 mask first, so a dropped
// Inf or NaN gives NaN (x * 0) instead of a silent 0, then divide by keep_prob = 1 - p (computed
// from the double p by the caller, in the accumulation type).
template <typename acc_t>
AQLM_LORA_HOST_DEVICE acc_t dropout_scaled(acc_t x, bool keep, acc_t keep_prob) {
  return (x * (keep ? acc_t(1) : acc_t(0))) / keep_prob;
}

}  // namespace aqlm_lora
