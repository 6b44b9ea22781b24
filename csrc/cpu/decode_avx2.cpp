// AVX2/FMA/F16C/BMI2 few-token kernels, picked at run time when the CPU has them (decode.cpp holds
// the portable fallbacks and the threading). Every output is reduced in a fixed order by one
// thread, so results do not depend on the thread count.
#include <cstdint>
#include <cstring>

#include "cpu/decode_simd.h"
#include "cpu/dot.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#include <immintrin.h>

namespace aqlm_lora::cpu::simd {
namespace {

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Eight consecutive codes as int32 lanes (zero-extended: the mask below then takes mod 2**nbits).
inline __m256i load8_codes(const int8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load8_codes(const int16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline uint32_t code_at(const int8_t* p) { return static_cast<uint8_t>(*p); }
inline uint32_t code_at(const int16_t* p) { return static_cast<uint16_t>(*p); }

// Eight codebook values as floats, from float, half or bfloat16 storage.
template <CodebookType T>
inline __m256 load8_codebook(const void* base, int64_t index) {
  if constexpr (T == CodebookType::kFloat) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + index);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + index));
    if constexpr (T == CodebookType::kHalf) {
      return _mm256_cvtph_ps(h);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

// Single token, out_group 1: partial[o] += the I*C table entries its codes pick in groups
// [i_begin, i_end), eight per AVX2 gather, four rows at a time so four gathers are in flight.
template <typename code_t>
void lut_partial_n1(const DecodeProblem& p, const float* lut, int64_t i_begin, int64_t i_end, int64_t o_begin,
                    int64_t o_end, float* partial) {
  constexpr int64_t kRows = 4;
  const code_t* codes = static_cast<const code_t*>(p.codes);
  const int64_t K = p.codebook_size, C = p.num_codebooks, J = p.in_groups * C;
  const int64_t j_begin = i_begin * C, j_count = (i_end - i_begin) * C;
  const uint32_t mask = static_cast<uint32_t>(K - 1);
  const __m256i vmask = _mm256_set1_epi32(static_cast<int32_t>(mask));
  const __m256i lane_base = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32(static_cast<int32_t>(K)));
  const __m256i step = _mm256_set1_epi32(static_cast<int32_t>(8 * K));
  const int64_t j_vec = j_count - j_count % 8;
  for (int64_t o0 = o_begin; o0 < o_end; o0 += kRows) {
    const int64_t rows = o_end - o0 < kRows ? o_end - o0 : kRows;
    __m256 acc[kRows];
    for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
    __m256i base = lane_base;
    for (int64_t j = 0; j < j_vec; j += 8) {
      for (int64_t r = 0; r < kRows; ++r) {
        if (r < rows) {
          const code_t* cp = codes + (o0 + r) * J + j_begin + j;
          const __m256i idx = _mm256_add_epi32(_mm256_and_si256(load8_codes(cp), vmask), base);
          acc[r] = _mm256_add_ps(acc[r], _mm256_i32gather_ps(lut, idx, 4));
        }
      }
      base = _mm256_add_epi32(base, step);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float sum = hsum(acc[r]);
      const code_t* cp = codes + (o0 + r) * J + j_begin;
      for (int64_t j = j_vec; j < j_count; ++j) sum += lut[j * K + (code_at(cp + j) & mask)];
      partial[o0 + r] += sum;
    }
  }
}

// Several tokens or out_group > 1: each code selects a run of width = og * N table entries.
template <typename code_t>
void lut_rows_wide(const DecodeProblem& p, const float* lut, int64_t o_begin, int64_t o_end) {
  const code_t* codes = static_cast<const code_t*>(p.codes);
  const int64_t K = p.codebook_size, J = p.in_groups * p.num_codebooks, N = p.n_rows, og = p.out_group;
  const int64_t width = og * N, out = p.out_groups * og;
  const uint32_t mask = static_cast<uint32_t>(K - 1);
  float acc[64];
  for (int64_t o = o_begin; o < o_end; ++o) {
    for (int64_t w = 0; w < width; ++w) acc[w] = 0.f;
    const code_t* cp = codes + o * J;
    for (int64_t j = 0; j < J; ++j) {
      const float* l = lut + (j * K + (code_at(cp + j) & mask)) * width;
      for (int64_t w = 0; w < width; ++w) acc[w] += l[w];
    }
    const float s = p.scales[o];
    for (int64_t a = 0; a < og; ++a)
      for (int64_t n = 0; n < N; ++n) p.y[n * out + o * og + a] = s * acc[a * N + n];
  }
}

// One output row's weights for in-group i: the sum of its C codebook rows (eight floats). The
// codebooks are added before meeting x, as in the dequantized W, so Inf/NaN behave alike.
template <CodebookType T, typename code_t, int kC>
inline __m256 weight_row(const void* codebooks, const code_t* cp, int64_t C, int64_t K, uint32_t mask) {
  const int64_t n_cb = kC > 0 ? kC : C;
  __m256 w = load8_codebook<T>(codebooks, (code_at(cp) & mask) * 8);
  for (int64_t c = 1; c < n_cb; ++c) w = _mm256_add_ps(w, load8_codebook<T>(codebooks, (c * K + (code_at(cp + c) & mask)) * 8));
  return w;
}

// kC > 0 stands for exactly kC codebooks of kFullCodebook entries (1x8 to 4x8, 1x16): the entry
// count and index mask are then compile-time constants. kC = 0: any scheme, read at run time.
template <typename code_t>
constexpr int64_t kFullCodebook = int64_t{1} << (8 * sizeof(code_t));

// How many consecutive groups of one row one 64-bit load of codes holds: 8 for 1x8, 4 for 2x8 and
// 1x16, 2 for 4x8; 0 where a group's codes do not divide 8 bytes (3x8) or kC is not fixed.
template <typename code_t, int kC>
constexpr int kGroupsPerWord = kC > 0 && 8 % (sizeof(code_t) * kC) == 0 ? 8 / (sizeof(code_t) * kC) : 0;

inline uint64_t rotate_right(uint64_t x, int n) { return n == 0 ? x : (x >> n) | (x << (64 - n)); }

// Group g's weight row from such a word: codebook c's index is the kBits = 8 * sizeof(code_t) bits
// at (g * kC + c) * kBits (little-endian). One rotate (BMI2 rorx: no copy of the word) and one mask
// turn an index straight into its byte offset, two instructions where a shift, a mask and a scale
// took three or four: at one token this extraction is most of the kernel's work.
template <CodebookType T, typename code_t, int kC>
inline __m256 weight_row_of_word(const void* codebooks, uint64_t word, int g) {
  constexpr int kBits = 8 * sizeof(code_t);
  constexpr int kEntryShift = T == CodebookType::kFloat ? 5 : 4;  // log2 of the bytes of one entry
  constexpr uint64_t kOffsetMask = ((uint64_t{1} << kBits) - 1) << kEntryShift;
  constexpr int64_t kCodebookBytes = int64_t{1} << (kBits + kEntryShift);
  const char* base = static_cast<const char*>(codebooks);
  const auto entry = [&](int c) {
    const int bit = (g * kC + c) * kBits;
    return base + c * kCodebookBytes + (rotate_right(word, (bit - kEntryShift) & 63) & kOffsetMask);
  };
  __m256 w = load8_codebook<T>(entry(0), 0);
  for (int c = 1; c < kC; ++c) w = _mm256_add_ps(w, load8_codebook<T>(entry(c), 0));
  return w;
}

// kRows output rows x kN tokens at a time: each x group is loaded once for kRows rows and each
// weight row once for kN tokens. An output's eight lanes are summed over i in order and then
// reduced, whatever kRows is, so results do not depend on the blocking or the thread count.
template <CodebookType T, typename code_t, int kC, int kN, int kRows>
void gather_block(const DecodeProblem& p, const void* codebooks, int64_t o0) {
  const code_t* codes = static_cast<const code_t*>(p.codes);
  const int64_t I = p.in_groups, C = kC > 0 ? kC : p.num_codebooks;
  const int64_t K = kC > 0 ? kFullCodebook<code_t> : p.codebook_size;  // a constant for kC > 0
  const int64_t in = I * 8, out = p.out_groups;
  const uint32_t mask = static_cast<uint32_t>(K - 1);
  __m256 acc[kRows][kN];
  for (int r = 0; r < kRows; ++r)
    for (int n = 0; n < kN; ++n) acc[r][n] = _mm256_setzero_ps();
  const code_t* cp = codes + o0 * I * C;
  const auto accumulate = [&](const __m256 (&w)[kRows], int64_t i) {
    for (int n = 0; n < kN; ++n) {
      const __m256 xv = _mm256_loadu_ps(p.x + n * in + i * 8);
      for (int r = 0; r < kRows; ++r) acc[r][n] = _mm256_fmadd_ps(w[r], xv, acc[r][n]);
    }
  };
  // A row's codes are a short stream (1 KiB for in = 4096) that the hardware prefetcher picks up
  // too late: fetch the next block's codes while this block runs, at the rate it reads its own.
  const char* next = reinterpret_cast<const char*>(cp + kRows * I * C);
  const int64_t block_bytes_per_group = kRows * C * static_cast<int64_t>(sizeof(code_t));
  int64_t i = 0;
  if constexpr (kGroupsPerWord<code_t, kC> > 0) {
    constexpr int kG = kGroupsPerWord<code_t, kC>;
    for (; i + kG <= I; i += kG) {
      _mm_prefetch(next + i * block_bytes_per_group, _MM_HINT_T0);
      uint64_t words[kRows];
      for (int r = 0; r < kRows; ++r) std::memcpy(&words[r], cp + (r * I + i) * C, sizeof(uint64_t));
      // Unrolled so each group's rotate counts are constants (rorx) and acc stays in registers.
#pragma GCC unroll 8
      for (int g = 0; g < kG; ++g) {
        __m256 w[kRows];
        for (int r = 0; r < kRows; ++r) w[r] = weight_row_of_word<T, code_t, kC>(codebooks, words[r], g);
        accumulate(w, i + g);
      }
    }
  }
  for (; i < I; ++i) {
    _mm_prefetch(next + i * block_bytes_per_group, _MM_HINT_T0);
    __m256 w[kRows];
    for (int r = 0; r < kRows; ++r) w[r] = weight_row<T, code_t, kC>(codebooks, cp + (r * I + i) * C, C, K, mask);
    accumulate(w, i);
  }
  for (int r = 0; r < kRows; ++r) {
    const float s = p.scales[o0 + r];
    for (int n = 0; n < kN; ++n) {
      float v = s * hsum(acc[r][n]);
      // lora_gemm.cpp's dot: the same bits as the separate expand's row dots.
      if (p.lora_xa != nullptr) v += p.lora_scaling * dot(p.lora_xa + n * p.lora_rank, p.lora_B + (o0 + r) * p.lora_rank, p.lora_rank);
      p.y[n * out + o0 + r] = v;
    }
  }
}

// Rows in flight per token count: kRows * (kN + 1) + 1 of the 16 ymm registers.
template <CodebookType T, typename code_t, int kC, int kN>
void gather_rows(const DecodeProblem& p, const void* codebooks, int64_t o_begin, int64_t o_end) {
  constexpr int kRows = kN == 1 ? 4 : kN <= 2 ? 4 : kN <= 6 ? 2 : 1;
  int64_t o = o_begin;
  for (; o + kRows <= o_end; o += kRows) gather_block<T, code_t, kC, kN, kRows>(p, codebooks, o);
  for (; o < o_end; ++o) gather_block<T, code_t, kC, kN, 1>(p, codebooks, o);
}

template <CodebookType T, typename code_t, int kC>
void gather_rows_n(const DecodeProblem& p, const void* cb, int64_t o_begin, int64_t o_end) {
  switch (p.n_rows) {
    case 1: return gather_rows<T, code_t, kC, 1>(p, cb, o_begin, o_end);
    case 2: return gather_rows<T, code_t, kC, 2>(p, cb, o_begin, o_end);
    case 3: return gather_rows<T, code_t, kC, 3>(p, cb, o_begin, o_end);
    case 4: return gather_rows<T, code_t, kC, 4>(p, cb, o_begin, o_end);
    case 5: return gather_rows<T, code_t, kC, 5>(p, cb, o_begin, o_end);
    case 6: return gather_rows<T, code_t, kC, 6>(p, cb, o_begin, o_end);
    case 7: return gather_rows<T, code_t, kC, 7>(p, cb, o_begin, o_end);
    default: return gather_rows<T, code_t, kC, 8>(p, cb, o_begin, o_end);
  }
}

// The common schemes (1x8 to 4x8, 1x16) get the codebook loop unrolled and the index mask fixed at
// compile time; any other scheme takes the run-time loop.
template <CodebookType T>
void gather_rows_codes(const DecodeProblem& p, const void* cb, int64_t o_begin, int64_t o_end) {
  const int64_t C = p.num_codebooks;
  if (p.codes_int16) {
    if (C == 1 && p.codebook_size == kFullCodebook<int16_t>) return gather_rows_n<T, int16_t, 1>(p, cb, o_begin, o_end);
    return gather_rows_n<T, int16_t, 0>(p, cb, o_begin, o_end);
  }
  if (p.codebook_size == kFullCodebook<int8_t>) {
    switch (C) {
      case 1: return gather_rows_n<T, int8_t, 1>(p, cb, o_begin, o_end);
      case 2: return gather_rows_n<T, int8_t, 2>(p, cb, o_begin, o_end);
      case 3: return gather_rows_n<T, int8_t, 3>(p, cb, o_begin, o_end);
      case 4: return gather_rows_n<T, int8_t, 4>(p, cb, o_begin, o_end);
      default: break;
    }
  }
  return gather_rows_n<T, int8_t, 0>(p, cb, o_begin, o_end);
}

}  // namespace

bool avx2_supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
}

void build_lut_avx2(const DecodeProblem& p, const float* cb_t, int64_t i_base, int64_t i_begin, int64_t i_end,
                    float* lut) {
  const int64_t C = p.num_codebooks, K = p.codebook_size, og = p.out_group, ig = p.in_group, N = p.n_rows;
  const int64_t in = p.in_groups * ig, width = og * N;
  for (int64_t i = i_begin; i < i_end; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      float* dst = lut + ((i - i_base) * C + c) * K * width;
      for (int64_t a = 0; a < og; ++a) {
        const float* rows = cb_t + (c * og + a) * ig * K;  // [ig][K]
        for (int64_t n = 0; n < N; ++n) {
          const float* xg = p.x + n * in + i * ig;
          for (int64_t k = 0; k < K; k += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b = 0; b < ig; ++b)
              acc = _mm256_fmadd_ps(_mm256_loadu_ps(rows + b * K + k), _mm256_set1_ps(xg[b]), acc);
            if (width == 1) {
              _mm256_storeu_ps(dst + k, acc);
            } else {
              alignas(32) float lanes[8];
              _mm256_store_ps(lanes, acc);
              for (int t = 0; t < 8; ++t) dst[(k + t) * width + a * N + n] = lanes[t];
            }
          }
        }
      }
    }
  }
}

void lut_partial_n1_avx2(const DecodeProblem& p, const float* lut, int64_t i_begin, int64_t i_end, int64_t o_begin,
                         int64_t o_end, float* partial) {
  if (p.codes_int16) return lut_partial_n1<int16_t>(p, lut, i_begin, i_end, o_begin, o_end, partial);
  return lut_partial_n1<int8_t>(p, lut, i_begin, i_end, o_begin, o_end, partial);
}

void lut_rows_avx2(const DecodeProblem& p, const float* lut, int64_t o_begin, int64_t o_end) {
  if (p.codes_int16) return lut_rows_wide<int16_t>(p, lut, o_begin, o_end);
  return lut_rows_wide<int8_t>(p, lut, o_begin, o_end);
}

void gather_rows_avx2(const DecodeProblem& p, const void* codebooks, CodebookType type, int64_t o_begin,
                      int64_t o_end) {
  switch (type) {
    case CodebookType::kFloat: return gather_rows_codes<CodebookType::kFloat>(p, codebooks, o_begin, o_end);
    case CodebookType::kHalf: return gather_rows_codes<CodebookType::kHalf>(p, codebooks, o_begin, o_end);
    case CodebookType::kBFloat16: return gather_rows_codes<CodebookType::kBFloat16>(p, codebooks, o_begin, o_end);
  }
}

}  // namespace aqlm_lora::cpu::simd

#pragma GCC pop_options

#else  // not x86-64: only the portable kernels exist

namespace aqlm_lora::cpu::simd {
bool avx2_supported() { return false; }
void build_lut_avx2(const DecodeProblem&, const float*, int64_t, int64_t, int64_t, float*) {}
void lut_partial_n1_avx2(const DecodeProblem&, const float*, int64_t, int64_t, int64_t, int64_t, float*) {}
void lut_rows_avx2(const DecodeProblem&, const float*, int64_t, int64_t) {}
void gather_rows_avx2(const DecodeProblem&, const void*, CodebookType, int64_t, int64_t) {}
}  // namespace aqlm_lora::cpu::simd

#endif
