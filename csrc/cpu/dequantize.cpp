// Blocked dequantization of AQLM weight tiles into a caller-owned buffer.
#include <algorithm>

#include "cpu/kernels.h"

namespace aqlm_lora::cpu {
namespace {

// IG > 0 fixes the in_group size at compile time so the inner loop becomes one vector op.
template <int IG, typename acc_t, typename code_t>
void dequantize_tile_impl(const Weight<acc_t, code_t>& w, int64_t o0, int64_t o1, int64_t i0, int64_t i1,
                          acc_t* dst, int64_t ld) {
  const AqlmDims& d = w.d;
  const int64_t C = d.num_codebooks, K = d.codebook_size, og = d.out_group;
  const int64_t ig = IG > 0 ? IG : d.in_group;
  constexpr int64_t kChunk = IG > 0 ? IG : 16;
  const uint32_t mask = static_cast<uint32_t>(K - 1);
  for (int64_t o = o0; o < o1; ++o) {
    const acc_t s = w.scales[o];
    for (int64_t i = i0; i < i1; ++i) {
      const code_t* cp = w.codes + (o * d.in_groups + i) * C;
      for (int64_t a = 0; a < og; ++a) {
        acc_t* out = dst + ((o - o0) * og + a) * ld + (i - i0) * ig;
        for (int64_t b0 = 0; b0 < ig; b0 += kChunk) {
          // A local chunk the compiler keeps in registers (out may alias the codebooks' type).
          const int64_t len = std::min<int64_t>(kChunk, ig - b0);
          acc_t v[kChunk];
          const acc_t* e0 = w.codebooks + (code_index(cp[0], mask) * og + a) * ig + b0;
          for (int64_t b = 0; b < len; ++b) v[b] = e0[b];
          for (int64_t c = 1; c < C; ++c) {
            const acc_t* e = w.codebooks + ((c * K + code_index(cp[c], mask)) * og + a) * ig + b0;
            for (int64_t b = 0; b < len; ++b) v[b] += e[b];
          }
          for (int64_t b = 0; b < len; ++b) out[b0 + b] = v[b] * s;
        }
      }
    }
  }
}

}  // namespace

template <typename acc_t, typename code_t>
void dequantize_tile(const Weight<acc_t, code_t>& w, int64_t o0, int64_t o1, int64_t i0, int64_t i1, acc_t* dst,
                     int64_t ld) {
  switch (w.d.in_group) {
    case 8:
      return dequantize_tile_impl<8>(w, o0, o1, i0, i1, dst, ld);
    case 16:
      return dequantize_tile_impl<16>(w, o0, o1, i0, i1, dst, ld);
    default:
      return dequantize_tile_impl<0>(w, o0, o1, i0, i1, dst, ld);
  }
}

#define AQLM_LORA_INSTANTIATE(acc_t, code_t)                                                              \
  template void dequantize_tile<acc_t, code_t>(const Weight<acc_t, code_t>&, int64_t, int64_t, int64_t, \
                                               int64_t, acc_t*, int64_t);
AQLM_LORA_FOR_EACH_WEIGHT_TYPE(AQLM_LORA_INSTANTIATE)
#undef AQLM_LORA_INSTANTIATE

}  // namespace aqlm_lora::cpu
