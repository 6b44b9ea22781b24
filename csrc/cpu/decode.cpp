// Few-token matmul y = x @ W^T straight from the codes, without dequantizing W:
//  - nbits <= 8: a lookup table lut[i, c, k, a, n] = x[n, group i] . codebooks[c, k, a] (small, cache
//    resident), then each output sums C * I table entries picked by its codes;
//  - nbits > 8: the codebook is too large to tabulate per token, so each code gathers its codebook
//    row and multiplies it with the x group.
// Outputs are tiled by kRowTile output groups so several independent add chains run at once.
// Each output is summed by one thread in a fixed order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/decode_simd.h"
#include "cpu/kernels.h"
#include "cpu/scratch.h"

namespace aqlm_lora::cpu {
namespace {

constexpr int64_t kRowTile = 8;
constexpr int64_t kDecodeMaxRows = 8;          // larger batches use dequantize + GEMM
constexpr int64_t kMaxLutBytes = 8 << 20;      // the table must stay cache-sized
constexpr int64_t kMaxAccumulators = 64;       // out_group * N outputs summed per output group
constexpr int64_t kLutChunkBytes = 256 << 10;   // single-token table chunk, well inside L2
constexpr int64_t kWidenCodebookElems = 16384;  // 64 KiB as float: 8-bit codes, up to 8 codebooks

template <typename acc_t, typename code_t>
void build_lut(const Weight<acc_t, code_t>& w, const acc_t* x, int64_t n_rows, acc_t* lut) {
  const AqlmDims& d = w.d;
  const int64_t C = d.num_codebooks, K = d.codebook_size, og = d.out_group, ig = d.in_group;
  const int64_t in = d.in_features();
  at::parallel_for(0, d.in_groups, grain_for(C * K * og * n_rows), [&](int64_t i_begin, int64_t i_end) {
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
  std::vector<acc_t> lut = scratch<acc_t>(I * C * K * width);
  build_lut(w, x, n_rows, lut.data());
  const acc_t* table = lut.data();
  const int64_t tiles = (d.out_groups + kRowTile - 1) / kRowTile;
  at::parallel_for(0, tiles, grain_for(kRowTile * I * C * width), [&](int64_t t_begin, int64_t t_end) {
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
  const int64_t tiles = (d.out_groups + kRowTile - 1) / kRowTile;
  at::parallel_for(0, tiles, grain_for(kRowTile * I * C * og * n_rows * ig), [&](int64_t t_begin, int64_t t_end) {
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

// The table of N rows must stay cache-sized; larger ones gather codebook rows instead.
bool lut_fits(const AqlmDims& d, int64_t n_rows) {
  return d.in_groups * d.num_codebooks * d.codebook_size * d.out_group * n_rows * 4 <= kMaxLutBytes;
}

// The few-row kernels associate the product differently from x @ W^T with W = scales * (sum of
// codebook rows) dequantized first, and that matters only where a value overflows or is not
// finite; those calls take the dequantize + GEMM path, which propagates them exactly like F.linear:
// - Inf/NaN in x: the lookup tables sum x . codebook per codebook before adding the codebooks up,
//   so an infinite x meeting codebook entries of opposite signs gives inf - inf = NaN, not +-inf;
// - |x| >= 2**64: a per-codebook partial x . codebook can overflow where their sum does not;
//   below it that needs codebook entries beyond 2**50, which no quantizer produces;
// - Inf/NaN in scales: the kernels scale the finished dot product, so inf * (x . w) is +-inf
//   where the sum of x * (inf * w) is NaN (mixed signs, or a zero w).
// The scans cost N * in + O reads, next to O * in codes.
constexpr double kMaxDecodeInput = 18446744073709551616.0;  // 2**64

template <typename acc_t>
bool all_below(const acc_t* x, int64_t numel) {
  for (int64_t k = 0; k < numel; ++k) {
    if (!(std::abs(x[k]) < static_cast<acc_t>(kMaxDecodeInput))) return false;  // NaN too
  }
  return true;
}

bool rows_decodable(const at::Tensor& x) {
  if (x.scalar_type() == at::kDouble) return all_below(x.data_ptr<double>(), x.numel());
  return all_below(x.data_ptr<float>(), x.numel());
}

bool scales_finite(const at::Tensor& scales) {
  const at::Tensor s = scales.to(at::kDouble).contiguous();  // O values; widening keeps Inf/NaN
  const double* v = s.data_ptr<double>();
  return std::all_of(v, v + s.numel(), [](double e) { return std::isfinite(e); });
}

bool avx2_codebooks(at::ScalarType t, simd::CodebookType* type) {
  switch (t) {
    case at::kFloat: *type = simd::CodebookType::kFloat; return true;
    case at::kHalf: *type = simd::CodebookType::kHalf; return true;
    case at::kBFloat16: *type = simd::CodebookType::kBFloat16; return true;
    default: return false;
  }
}

// AQLM_LORA_CPU_KERNELS=generic forces the portable kernels (to test or compare them).
bool simd_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("AQLM_LORA_CPU_KERNELS");
    return simd::avx2_supported() && !(env && std::strcmp(env, "generic") == 0);
  }();
  return enabled;
}

}  // namespace

// Which kernel runs x @ W^T on the CPU; N = rows of x, C x B g<ig> o<og> the scheme:
//
//   rows and scheme                                   | x             | kernel
//   N > 8, og * N > 64, Inf/NaN/|x| >= 2**64 in x,    | any           | kGemm (bf16 GEMM for bf16 x on AVX512-BF16 CPUs)
//   or Inf/NaN in scales                              |               |
//   N <= 8, og 1, ig 8                                | float32       | kAvx2Gather
//   N <= 8, B <= 8, K % 8 == 0, LUT <= 8 MiB          | float32       | kAvx2Lut
//   N <= 8, B <= 8, LUT <= 8 MiB                      | other/no AVX2 | kDecodeLut
//   N <= 8, B > 8 or LUT > 8 MiB                      | other/no AVX2 | kDecodeGather
//
// "LUT" is the lookup table of B <= 8 schemes: in_groups * C * 2**B * og * N floats.
// The AVX2 kernels need codebooks in float32/16/bf16 and AQLM_LORA_CPU_KERNELS != generic.
Kernel choose_kernel(const AqlmDims& d, const at::Tensor& x, at::ScalarType codebooks, const at::Tensor& scales) {
  const int64_t n = x.size(0);
  if (!decode_fits(d, n) || !rows_decodable(x) || !scales_finite(scales)) return Kernel::kGemm;
  const bool lut = use_lut(d) && lut_fits(d, n);
  simd::CodebookType type;
  if (simd_enabled() && x.scalar_type() == at::kFloat && avx2_codebooks(codebooks, &type)) {
    // Gathering codebook rows (the 2x8 codebooks live in L1) reads the codes in order and loads
    // each x group once for several rows; the per-group tables of the LUT kernel outgrow L1.
    if (d.out_group == 1 && d.in_group == 8) return Kernel::kAvx2Gather;
    if (lut && d.codebook_size % 8 == 0) return Kernel::kAvx2Lut;
  }
  return lut ? Kernel::kDecodeLut : Kernel::kDecodeGather;
}

bool avx2_decode(Kernel kernel, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                 const at::Tensor& scales, const AqlmDims& d, at::Tensor& out, const LoraEpilogue* lora) {
  TORCH_INTERNAL_ASSERT(kernel == Kernel::kAvx2Gather || kernel == Kernel::kAvx2Lut);
  const int64_t n = x.size(0);
  simd::CodebookType type;
  TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kFloat && avx2_codebooks(codebooks.scalar_type(), &type));
  const bool gather = kernel == Kernel::kAvx2Gather;
  const at::Tensor codes_c = codes.contiguous();
  const at::Tensor scales_f = scales.to(at::kFloat).reshape({-1}).contiguous();
  const simd::DecodeProblem p{codes_c.data_ptr(), codes.scalar_type() == at::kShort, d.out_groups, d.in_groups,
                              d.num_codebooks, d.codebook_size, d.out_group, d.in_group,
                              scales_f.data_ptr<float>(), x.data_ptr<float>(), n, out.data_ptr<float>()};
  if (gather) {
    // Small half/bf16 codebooks (2x8: 8 KiB) are widened to float once per call, exactly, so the
    // kernel loads them without converting each row; 1x16's 1 MiB of them would not stay in cache.
    const bool widen = type != simd::CodebookType::kFloat && codebooks.numel() <= kWidenCodebookElems;
    const at::Tensor cb = widen ? codebooks.to(at::kFloat).contiguous() : codebooks.contiguous();
    if (widen) type = simd::CodebookType::kFloat;
    simd::DecodeProblem q = p;
    if (lora != nullptr) {
      TORCH_INTERNAL_ASSERT(lora->xa.scalar_type() == at::kFloat && lora->xa.is_contiguous() &&
                            lora->lora_B.scalar_type() == at::kFloat && lora->lora_B.is_contiguous());
      q.lora_xa = lora->xa.data_ptr<float>();
      q.lora_B = lora->lora_B.data_ptr<float>();
      q.lora_rank = lora->lora_B.size(1);
      q.lora_scaling = static_cast<float>(lora->scaling);
    }
    at::parallel_for(0, d.out_groups, grain_for(d.in_groups * d.num_codebooks * n), [&](int64_t o0, int64_t o1) {
      simd::gather_rows_avx2(q, cb.data_ptr(), type, o0, o1);
    });
    return lora != nullptr;
  }
  // Codebooks transposed to [C, og, ig, K] so the table is built eight entries per FMA.
  const at::Tensor cb_t = codebooks.to(at::kFloat).permute({0, 2, 3, 1}).contiguous();
  const float* cbt = cb_t.data_ptr<float>();
  const int64_t entries_per_group = d.num_codebooks * d.codebook_size * d.out_group * n;
  if (n == 1 && d.out_group == 1) {
    // One parallel region: each thread builds the table chunk by chunk (chunks fit in L2 next to
    // the streaming codes) and sums its own rows. Building is ~10% of the lookups, so building it
    // per thread costs less than the barriers of sharing it, which stall badly on a busy machine.
    const int64_t chunk = std::max<int64_t>(1, kLutChunkBytes / (entries_per_group * 4));
    const float* s = scales_f.data_ptr<float>();
    float* y = out.data_ptr<float>();
    // At least 64 rows a thread, so the per-thread table build stays a small share of the work.
    const int64_t grain = std::max<int64_t>(64, grain_for(d.in_groups * d.num_codebooks));
    at::parallel_for(0, d.out_groups, grain, [&](int64_t o0, int64_t o1) {
      std::vector<float> table = scratch<float>(std::min(chunk, d.in_groups) * entries_per_group);
      std::vector<float> partial(o1 - o0, 0.f);
      for (int64_t c0 = 0; c0 < d.in_groups; c0 += chunk) {
        const int64_t c1 = std::min(d.in_groups, c0 + chunk);
        simd::build_lut_avx2(p, cbt, c0, c0, c1, table.data());
        simd::lut_partial_n1_avx2(p, table.data(), c0, c1, o0, o1, partial.data() - o0);
      }
      for (int64_t o = o0; o < o1; ++o) y[o] = s[o] * partial[o - o0];
    });
    return false;
  }
  std::vector<float> table = scratch<float>(d.in_groups * entries_per_group);
  at::parallel_for(0, d.in_groups, grain_for(entries_per_group * d.in_group), [&](int64_t i0, int64_t i1) {
    simd::build_lut_avx2(p, cbt, 0, i0, i1, table.data());
  });
  at::parallel_for(0, d.out_groups, grain_for(d.in_groups * d.num_codebooks * entries_per_group / d.codebook_size),
                   [&](int64_t o0, int64_t o1) {
    simd::lut_rows_avx2(p, table.data(), o0, o1);
  });
  return false;
}

bool decode_fits(const AqlmDims& d, int64_t n_rows) {
  return n_rows >= 1 && n_rows <= kDecodeMaxRows && d.out_group * n_rows <= kMaxAccumulators;
}

template <typename acc_t, typename code_t>
void decode_gemm(const Weight<acc_t, code_t>& w, Kernel kernel, const acc_t* x, int64_t n_rows, acc_t* y) {
  TORCH_INTERNAL_ASSERT(kernel == Kernel::kDecodeLut || kernel == Kernel::kDecodeGather);
  if (kernel == Kernel::kDecodeLut) {
    if (w.d.out_group * n_rows == 1) return lut_gemm<1>(w, x, n_rows, y);
    return lut_gemm<0>(w, x, n_rows, y);
  }
  if (w.d.in_group == 8) return gather_gemm<8>(w, x, n_rows, y);
  return gather_gemm<0>(w, x, n_rows, y);
}

#define AQLM_LORA_INSTANTIATE(acc_t, code_t) \
  template void decode_gemm<acc_t, code_t>(const Weight<acc_t, code_t>&, Kernel, const acc_t*, int64_t, acc_t*);
AQLM_LORA_FOR_EACH_WEIGHT_TYPE(AQLM_LORA_INSTANTIATE)
#undef AQLM_LORA_INSTANTIATE

}  // namespace aqlm_lora::cpu
