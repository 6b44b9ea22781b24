// Reading AQLM codes, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/host_device.h"

namespace aqlm_lora {

// Codes are stored signed (int8 for nbits <= 8, int16 above); the codebook row of a stored code
// is its value mod 2**nbits, i.e. its unsigned bits masked with K - 1 (mask = codebook_size - 1).
template <typename code_t>
AQLM_LORA_HOST_DEVICE uint32_t code_index(code_t stored, uint32_t mask) {
  using ucode_t = std::make_unsigned_t<code_t>;
  return static_cast<uint32_t>(static_cast<ucode_t>(stored)) & mask;
}

}  // namespace aqlm_lora
