// Philox dropout on the CPU: one generator call yields the words of four consecutive elements.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/kernels.h"
#include "common/dropout.h"
#include "common/philox.h"

namespace aqlm_lora::cpu {
namespace {

constexpr int64_t kQuadGrain = 4096;

template <typename F>
void for_each_draw(int64_t numel, uint64_t seed, uint64_t offset, F&& f) {
  const int64_t quads = (numel + 3) / 4;
  at::parallel_for(0, quads, kQuadGrain, [&](int64_t q_begin, int64_t q_end) {
    for (int64_t q = q_begin; q < q_end; ++q) {
      const PhiloxWords r = philox4x32_10(static_cast<uint64_t>(q), offset, seed);
      const int64_t end = std::min<int64_t>(4, numel - 4 * q);
      for (int64_t j = 0; j < end; ++j)
        f(4 * q + j, word_to_uniform(r.w[j]));
    }
  });
}

}  // namespace

template <typename acc_t>
void apply_dropout(const acc_t* src, acc_t* dst, int64_t numel, double dropout_p, uint64_t seed, uint64_t offset) {
  // The keep test compares float draws with p as a float (the mask is the same on every backend);
  // the scale 1 / (1 - p) comes from p itself, so float64 inputs get float64's rounding.
  const float p = static_cast<float>(dropout_p);
  const acc_t keep_prob = static_cast<acc_t>(1.0 - dropout_p);
  for_each_draw(numel, seed, offset, [&](int64_t idx, float u) {
    dst[idx] = dropout_scaled(src[idx], u >= p, keep_prob);
  });
}

void dropout_mask(bool* dst, int64_t numel, float dropout_p, uint64_t seed, uint64_t offset) {
  for_each_draw(numel, seed, offset, [&](int64_t idx, float u) { dst[idx] = u >= dropout_p; });
}

template void apply_dropout<float>(const float*, float*, int64_t, double, uint64_t, uint64_t);
template void apply_dropout<double>(const double*, double*, int64_t, double, uint64_t, uint64_t);

}  // namespace aqlm_lora::cpu
