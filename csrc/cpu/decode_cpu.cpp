// Few-token matmul y = x @ W^T straight from the codes, without dequantizing W:
//  - nbits <= 8: a lookup table lut[i, c, k, a, n] = x[n, group i] . codebooks[c, k, a] (small, cache
//    resident), then each output sums C * I table entries picked by its codes;
//  - nbits > 8: the codebook is too large to tabulate per token, so each code gathers its codebook
//    row and multiplies it with the x group.
// Outputs are tiled by kRowTile output groups so several independent add chains run at once.
// Each output is summed by one thread in a fixed order: results do not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace aqlm_lora::cpu {
namespace {

constexpr int64_t kRowTile = 8;
constexpr int64_t kMaxDecodeRows = 8;          // larger batches use dequantize + GEMM
constexpr int64_t kMaxLutBytes = 8 << 20;      // the table must stay cache-sized
constexpr int64_t kMaxAccumulators = 64;       // out_group * N outputs summed per output group

template <typename acc_t, typename code_t>
void build_lut(const Weight<acc_t, code_t>& w, const acc_t* x, int64_t n_rows, acc_t* lut) {
  const AqlmDims& d = w.d;
  const int64_t C = d.num_codebooks, K = d.codebook_size, og = d.out_group, ig = d.in_group;
  const int64_t in = d.in_features();
  at::parallel_for(0, d.in_groups, 8, [&](int64_t i_begin, int64_t i_end) {
    for (int64_t i = i_begin; i < i_end; ++i) {
      for (int64_t ck = 0; ck < C * K; ++ck) {
        for (int64_t a = 0; a < og; ++a) {
          const acc_t* e = w.codebooks + (ck * og + a) * ig;
          acc_t* dst = lut + ((i * C * K + ck) * og + a) * n_rows;
          for (int64_t n = 0; n < n_rows; ++n) {
            const acc_t* xg = x + n * in + i * ig;
            acc_t s = 0;
            for (int64_t b = 0; b < ig; ++b) s += e[b] * xg[b];
            dst[n] = s;
          }
        }
      }
    }
  });
}

// kWidth > 0 fixes out_group * N at compile time (1 for single-token decode of og = 1).
template <int kWidth, typename acc_t, typename code_t>
void lut_gemm(const Weight<acc_t, code_t>& w, const acc_t* x, int64_t n_rows, acc_t* y) {
  const AqlmDims& d = w.d;
  const int64_t C = d.num_codebooks, K = d.codebook_size, og = d.out_group, I = d.in_groups;
  const int64_t width = kWidth > 0 ? kWidth : og * n_rows;
  const int64_t out = d.out_features();
  const uint32_t mask = static_cast<uint32_t>(K - 1);
  std::vector<acc_t> lut(I * C * K * width);
  build_lut(w, x, n_rows, lut.data());
  const acc_t* table = lut.data();
  at::parallel_for(0, (d.out_groups + kRowTile - 1) / kRowTile, 1, [&](int64_t t_begin, int64_t t_end) {
    acc_t acc[kRowTile * kMaxAccumulators];
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t o0 = t * kRowTile;
      const int64_t rows = std::min(kRowTile, d.out_groups - o0);
      std::fill(acc, acc + rows * width, acc_t(0));
      for (int64_t i = 0; i < I; ++i) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* base = table + (i * C + c) * K * width;
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t* l = base + code_index(w.codes[((o0 + r) * I + i) * C + c], mask) * width;
            for (int64_t j = 0; j < width; ++j) acc[r * width + j] += l[j];
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t s = w.scales[o0 + r];
        for (int64_t a = 0; a < og; ++a)
          for (int64_t n = 0; n < n_rows; ++n) y[n * out + (o0 + r) * og + a] = s * acc[r * width + a * n_rows + n];
      }
    }
  });
}

// kIG > 0 fixes in_group at compile time so each gathered codebook row is one vector FMA.
template <int kIG, typename acc_t, typename code_t>
void gather_gemm(const Weight<acc_t, code_t>& w, const acc_t* x, int64_t n_rows, acc_t* y) {
  const AqlmDims& d = w.d;
  const int64_t C = d.num_codebooks, K = d.codebook_size, og = d.out_group, I = d.in_groups;
  const int64_t ig = kIG > 0 ? kIG : d.in_group;
  const int64_t in = d.in_features(), out = d.out_features();
  const int64_t width = og * n_rows;  // dot products per output group
  const uint32_t mask = static_cast<uint32_t>(K - 1);
  at::parallel_for(0, (d.out_groups + kRowTile - 1) / kRowTile, 1, [&](int64_t t_begin, int64_t t_end) {
    // Per-lane partial sums, reduced over the in_group lanes only at the end.
    std::vector<acc_t> acc(kRowTile * width * ig);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t o0 = t * kRowTile;
      const int64_t rows = std::min(kRowTile, d.out_groups - o0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < I; ++i) {
        for (int64_t r = 0; r < rows; ++r) {
          const code_t* cp = w.codes + ((o0 + r) * I + i) * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* e = w.codebooks + (c * K + code_index(cp[c], mask)) * og * ig;
            for (int64_t a = 0; a < og; ++a) {
              for (int64_t n = 0; n < n_rows; ++n) {
                const acc_t* xg = x + n * in + i * ig;
                acc_t* lane = acc.data() + ((r * og + a) * n_rows + n) * ig;
                for (int64_t b = 0; b < ig; ++b) lane[b] += e[a * ig + b] * xg[b];
              }
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t s = w.scales[o0 + r];
        for (int64_t a = 0; a < og; ++a) {
          for (int64_t n = 0; n < n_rows; ++n) {
            const acc_t* lane = acc.data() + ((r * og + a) * n_rows + n) * ig;
            acc_t sum = 0;
            for (int64_t b = 0; b < ig; ++b) sum += lane[b];
            y[n * out + (o0 + r) * og + a] = s * sum;
          }
        }
      }
    }
  });
}

bool use_lut(const AqlmDims& d) { return d.nbits <= 8; }

}  // namespace

bool use_decode(const AqlmDims& d, int64_t n_rows) {
  if (n_rows < 1 || n_rows > kMaxDecodeRows || d.out_group * n_rows > kMaxAccumulators) return false;
  if (!use_lut(d)) return true;
  const int64_t lut_bytes = d.in_groups * d.num_codebooks * d.codebook_size * d.out_group * n_rows * 4;
  return lut_bytes <= kMaxLutBytes;
}

template <typename acc_t, typename code_t>
void decode_gemm(const Weight<acc_t, code_t>& w, const acc_t* x, int64_t n_rows, acc_t* y) {
  if (use_lut(w.d)) {
    if (w.d.out_group * n_rows == 1) return lut_gemm<1>(w, x, n_rows, y);
    return lut_gemm<0>(w, x, n_rows, y);
  }
  if (w.d.in_group == 8) return gather_gemm<8>(w, x, n_rows, y);
  return gather_gemm<0>(w, x, n_rows, y);
}

#define AQLM_LORA_INSTANTIATE(acc_t, code_t) \
  template void decode_gemm<acc_t, code_t>(const Weight<acc_t, code_t>&, const acc_t*, int64_t, acc_t*);
AQLM_LORA_INSTANTIATE(float, int8_t)
AQLM_LORA_INSTANTIATE(float, int16_t)
AQLM_LORA_INSTANTIATE(double, int8_t)
AQLM_LORA_INSTANTIATE(double, int16_t)
#undef AQLM_LORA_INSTANTIATE

}  // namespace aqlm_lora::cpu
