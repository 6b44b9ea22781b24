// The LoRA part of lora_mixed_forward (one adapter per row; the Punica/S-LoRA "BGMV" idea): rows
// are grouped by adapter so each adapter's A and B are read once per call, not once per row. Like
// lora_gemm.cpp, every output element is reduced by one thread in a fixed order, so the results do
// not depend on the thread count or on how the rows are spread over adapters.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/scratch.h"

namespace aqlm_lora::cpu {
namespace {

// Output columns per tile of the expand: r rows of B^T over this many columns stay in L1/L2.
constexpr int64_t kColumnTile = 512;
// Rows of one adapter per shrink work item: their x rows stay in L1/L2 while A streams past.
constexpr int64_t kShrinkRows = 8;
// Multiply-adds a thread must get before a second one is woken (as lora_gemm.cpp).
constexpr int64_t kMinThreadWork = int64_t{1} << 18;

// Rows sorted by adapter: rows[begin[b] .. begin[b + 1]) use adapter b - 1 (bin 0: base rows).
struct Segments {
  std::vector<int64_t> rows;
  std::vector<int64_t> begin;
};

Segments segment_rows(const int64_t* indices, int64_t n, int64_t k) {
  Segments s;
  s.begin.assign(k + 2, 0);
  for (int64_t i = 0; i < n; ++i) ++s.begin[indices[i] + 2];
  for (int64_t b = 2; b < k + 2; ++b) s.begin[b] += s.begin[b - 1];
  s.rows.resize(n);
  std::vector<int64_t> next(s.begin.begin(), s.begin.end() - 1);
  for (int64_t i = 0; i < n; ++i) s.rows[next[indices[i] + 1]++] = i;
  // begin[b] starts bin b; begin[k + 1] = n ends the last one.
  return s;
}

}  // namespace

template <typename acc_t>
void mixed_lora_rows(const MixedLora<acc_t>& m, acc_t* y) {
  const int64_t n = m.n, r = m.r, in = m.in, out = m.out;
  if (n == 0 || out == 0) return;
  const Segments seg = segment_rows(m.indices, n, m.k);

  // Shrink: xa[row, j] = x[row] . A[a, j], work items of up to kShrinkRows rows of one adapter.
  std::vector<acc_t> xa = scratch<acc_t>(static_cast<size_t>(n * std::max<int64_t>(r, 1)));
  struct Item {
    int64_t adapter, row0, row1;  // positions in seg.rows
  };
  std::vector<Item> shrink_items;
  for (int64_t a = 0; a < m.k; ++a)
    for (int64_t p = seg.begin[a + 1]; p < seg.begin[a + 2]; p += kShrinkRows)
      shrink_items.push_back({a, p, std::min(p + kShrinkRows, seg.begin[a + 2])});
  if (r > 0 && in > 0) {
    const int64_t item_work = kShrinkRows * r * in;
    at::parallel_for(0, static_cast<int64_t>(shrink_items.size()), grain_for(item_work, kMinThreadWork),
                     [&](int64_t i0, int64_t i1) {
                       for (int64_t i = i0; i < i1; ++i) {
                         const Item& it = shrink_items[i];
                         const acc_t* a = m.lora_A + it.adapter * r * in;
                         for (int64_t p = it.row0; p < it.row1; ++p) {
                           const int64_t row = seg.rows[p];
                           for (int64_t j = 0; j < r; ++j) xa[row * r + j] = dot(m.x + row * in, a + j * in, in);
                         }
                       }
                     });
  } else {
    std::fill(xa.begin(), xa.end(), acc_t(0));
  }

  // Expand + epilogue, per (bin, column tile): base rows get the bias only; adapter rows
  // y = row_scale * (y + s * (xa B^T + lora_bias)) + bias.
  const int64_t tiles = (out + kColumnTile - 1) / kColumnTile;
  const int64_t bins = m.k + 1;
  const int64_t avg_rows = std::max<int64_t>(1, n / bins);
  at::parallel_for(0, bins * tiles, grain_for(avg_rows * (r + 1) * kColumnTile, kMinThreadWork),
                   [&](int64_t t0, int64_t t1) {
                     std::vector<acc_t> sum(kColumnTile);
                     for (int64_t t = t0; t < t1; ++t) {
                       const int64_t bin = t / tiles, c0 = (t % tiles) * kColumnTile;
                       const int64_t len = std::min(kColumnTile, out - c0);
                       const int64_t a = bin - 1;
                       const acc_t* bias = m.bias != nullptr ? m.bias + c0 : nullptr;
                       for (int64_t p = seg.begin[bin]; p < seg.begin[bin + 1]; ++p) {
                         const int64_t row = seg.rows[p];
                         acc_t* dst = y + row * out + c0;
                         if (a < 0) {
                           if (bias != nullptr)
                             for (int64_t c = 0; c < len; ++c) dst[c] += bias[c];
                           continue;
                         }
                         std::fill(sum.begin(), sum.begin() + len, acc_t(0));
                         const acc_t* bt = m.lora_B_t + a * r * out + c0;
                         for (int64_t j = 0; j < r; ++j) axpy(sum.data(), bt + j * out, xa[row * r + j], len);
                         if (m.lora_bias != nullptr) {
                           const acc_t* lb = m.lora_bias + a * out + c0;
                           for (int64_t c = 0; c < len; ++c) sum[c] += lb[c];
                         }
                         const acc_t s = m.scalings[a];
                         for (int64_t c = 0; c < len; ++c) dst[c] += s * sum[c];
                         if (m.row_scale != nullptr) {
                           const acc_t* rs = m.row_scale + a * out + c0;
                           for (int64_t c = 0; c < len; ++c) dst[c] *= rs[c];
                         }
                         if (bias != nullptr)
                           for (int64_t c = 0; c < len; ++c) dst[c] += bias[c];
                       }
                     }
                   });
}

template void mixed_lora_rows<float>(const MixedLora<float>&, float*);
template void mixed_lora_rows<double>(const MixedLora<double>&, double*);

}  // namespace aqlm_lora::cpu
