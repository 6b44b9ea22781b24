// The LoRA matmuls (one side of rank r, small), with a summation order fixed per output element.
// BLAS picks different kernels and splits for small problems depending on the thread count (MKL
// gave 2-ulp differences between 1 and 2 threads at 5-11 rows), so these are our own loops: every
// output is reduced by one thread, always in the same order, whatever the partition.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

// The inner loops get an AVX2/FMA clone picked at load time (ifunc); other CPUs run the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AQLM_LORA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define AQLM_LORA_CLONES
#endif

namespace aqlm_lora::cpu {
namespace {

// Lanes of a dot product: each lane sums its own residue class of k in order, the lanes are
// then added in order, so the result is fixed and the loop still vectorizes.
constexpr int64_t kLanes = 8;
// Columns per tile of the expand and outer-product kernels: a tile of r rows stays in L1/L2.
constexpr int64_t kColumnTile = 512;
// Multiply-adds a thread must get before a second one is woken (grain_for's minimum is smaller):
// the LoRA part of a decode call is a few microseconds, less than waking a thread on a busy machine.
constexpr int64_t kMinThreadWork = int64_t{1} << 18;

inline int64_t grain(int64_t work_per_item) { return grain_for(work_per_item, kMinThreadWork); }


template <typename acc_t>
inline acc_t dot_lanes(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t lane[kLanes] = {};
  const int64_t n_vec = n - n % kLanes;
  for (int64_t k = 0; k < n_vec; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += a[k + l] * b[k + l];
  for (int64_t k = n_vec; k < n; ++k) lane[k - n_vec] += a[k] * b[k];
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

// y[o] += alpha * u . w[o, :] for o in [o0, o1): one row of a few-row expand, the dots inlined.
// Four outputs at a time: their lane reductions are independent chains that overlap (one dot at
// a time is bound by the latency of its final adds). Each output's order is dot_lanes' order.
template <typename acc_t>
inline void add_row_dots_impl(const acc_t* u, const acc_t* w, int64_t r, int64_t o0, int64_t o1, acc_t alpha,
                              acc_t* y) {
  constexpr int64_t kOuts = 4;
  int64_t o = o0;
  for (; o + kOuts <= o1; o += kOuts) {
    acc_t lane[kOuts][kLanes] = {};
    const int64_t r_vec = r - r % kLanes;
    for (int64_t k = 0; k < r_vec; k += kLanes)
      for (int64_t q = 0; q < kOuts; ++q)
        for (int64_t l = 0; l < kLanes; ++l) lane[q][l] += u[k + l] * w[(o + q) * r + k + l];
    for (int64_t q = 0; q < kOuts; ++q) {
      for (int64_t k = r_vec; k < r; ++k) lane[q][k - r_vec] += u[k] * w[(o + q) * r + k];
      acc_t sum = 0;
      for (int64_t l = 0; l < kLanes; ++l) sum += lane[q][l];
      y[o + q] += alpha * sum;
    }
  }
  for (; o < o1; ++o) y[o] += alpha * dot_lanes(u, w + o * r, r);
}
AQLM_LORA_CLONES void add_row_dots(const float* u, const float* w, int64_t r, int64_t o0, int64_t o1, float alpha,
                                   float* y) {
  add_row_dots_impl(u, w, r, o0, o1, alpha, y);
}
AQLM_LORA_CLONES void add_row_dots(const double* u, const double* w, int64_t r, int64_t o0, int64_t o1, double alpha,
                                   double* y) {
  add_row_dots_impl(u, w, r, o0, o1, alpha, y);
}

}  // namespace

// Declared in dot.h: the fixed-order dot and axpy the LoRA kernels and the fused decode epilogue share.
AQLM_LORA_CLONES float dot(const float* a, const float* b, int64_t n) { return dot_lanes(a, b, n); }
AQLM_LORA_CLONES double dot(const double* a, const double* b, int64_t n) { return dot_lanes(a, b, n); }
AQLM_LORA_CLONES void axpy(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
AQLM_LORA_CLONES void axpy(double* __restrict y, const double* __restrict x, double a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename acc_t>
void rows_dot(const acc_t* x, const acc_t* a, int64_t n_rows, int64_t r, int64_t k, acc_t* y) {
  at::parallel_for(0, n_rows, grain(r * k), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t j = 0; j < r; ++j) y[n * r + j] = dot(x + n * k, a + j * k, k);
  });
}

template <typename acc_t>
void expand(const acc_t* u, const acc_t* v, int64_t n_rows, int64_t r, int64_t m, acc_t alpha, bool accumulate,
            acc_t* y) {
  const int64_t tiles = (m + kColumnTile - 1) / kColumnTile;
  at::parallel_for(0, n_rows * tiles, grain(r * kColumnTile), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> sum(kColumnTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / tiles, c0 = (t % tiles) * kColumnTile, len = std::min(kColumnTile, m - c0);
      std::fill(sum.begin(), sum.begin() + len, acc_t(0));
      for (int64_t j = 0; j < r; ++j) axpy(sum.data(), v + j * m + c0, u[n * r + j], len);
      acc_t* dst = y + n * m + c0;
      for (int64_t c = 0; c < len; ++c) dst[c] = accumulate ? dst[c] + alpha * sum[c] : alpha * sum[c];
    }
  });
}

template <typename acc_t>
void expand_rows(const acc_t* u, const acc_t* w, int64_t n_rows, int64_t r, int64_t m, acc_t alpha, acc_t* y) {
  at::parallel_for(0, m, grain(n_rows * r), [&](int64_t o0, int64_t o1) {
    for (int64_t n = 0; n < n_rows; ++n) add_row_dots(u + n * r, w, r, o0, o1, alpha, y + n * m);
  });
}

template <typename acc_t>
void outer_sum(const acc_t* u, const acc_t* v, int64_t n_rows, int64_t r, int64_t m, acc_t alpha, acc_t* y) {
  const int64_t tiles = (m + kColumnTile - 1) / kColumnTile;
  at::parallel_for(0, tiles, grain(n_rows * r * kColumnTile), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> sum(r * kColumnTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kColumnTile, len = std::min(kColumnTile, m - c0);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t n = 0; n < n_rows; ++n)
        for (int64_t j = 0; j < r; ++j) axpy(sum.data() + j * kColumnTile, v + n * m + c0, u[n * r + j], len);
      for (int64_t j = 0; j < r; ++j)
        for (int64_t c = 0; c < len; ++c) y[j * m + c0 + c] = alpha * sum[j * kColumnTile + c];
    }
  });
}

template <typename acc_t>
void transpose(const acc_t* src, int64_t rows, int64_t cols, acc_t* dst) {
  // Blocks of rows: each source row (cols <= a few cache lines for LoRA weights) is read once and
  // every destination row receives one contiguous run per block.
  constexpr int64_t kRowBlock = 64;
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, grain(kRowBlock * cols), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
    }
  });
}

#define AQLM_LORA_INSTANTIATE(acc_t)                                                                         \
  template void rows_dot<acc_t>(const acc_t*, const acc_t*, int64_t, int64_t, int64_t, acc_t*);             \
  template void expand<acc_t>(const acc_t*, const acc_t*, int64_t, int64_t, int64_t, acc_t, bool, acc_t*); \
  template void outer_sum<acc_t>(const acc_t*, const acc_t*, int64_t, int64_t, int64_t, acc_t, acc_t*); \
  template void transpose<acc_t>(const acc_t*, int64_t, int64_t, acc_t*);                               \
  template void expand_rows<acc_t>(const acc_t*, const acc_t*, int64_t, int64_t, int64_t, acc_t, acc_t*);
AQLM_LORA_INSTANTIATE(float)
AQLM_LORA_INSTANTIATE(double)
#undef AQLM_LORA_INSTANTIATE

}  // namespace aqlm_lora::cpu
