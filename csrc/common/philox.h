// Philox4x32-10 counter-based generator, usable from host and device code. Dropout draws one
// 32-bit word per element from the counter (index / 4, offset) and key (seed), so any backend
// can regenerate the mask of any element without storing it.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace aqlm_lora {

struct PhiloxWords {
  uint32_t w[4];
};

AQLM_LORA_HOST_DEVICE PhiloxWords philox4x32_10(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The uniform in [0, 1) of one Philox word: its top 24 bits, exact in float32.
AQLM_LORA_HOST_DEVICE float word_to_uniform(uint32_t word) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

// Uniform of element `index`: word index % 4 of the call with counter (index / 4, offset).
AQLM_LORA_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset, uint64_t index) {
  return word_to_uniform(philox4x32_10(index >> 2, offset, seed).w[index & 3]);
}

// An element is kept when its uniform draw is >= dropout_p.
AQLM_LORA_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, uint64_t index, float dropout_p) {
  return philox_uniform(seed, offset, index) >= dropout_p;
}

}  // namespace aqlm_lora
