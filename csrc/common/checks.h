// Argument checks shared by every backend. Each failure names the argument, what was expected
// and what was given, so a user can fix the call without reading the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

namespace aqlm_lora {

// Sizes of one AQLM weight: codes [O, I, C], codebooks [C, K, og, ig], scales [O, 1, 1, 1].
struct AqlmDims {
  int64_t out_groups;     // O
  int64_t in_groups;      // I
  int64_t num_codebooks;  // C
  int64_t codebook_size;  // K = 2**nbits
  int64_t out_group;      // og
  int64_t in_group;       // ig
  int nbits;
  int64_t out_features() const { return out_groups * out_group; }
  int64_t in_features() const { return in_groups * in_group; }
};

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "aqlm_lora: ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "aqlm_lora: ", name, " must be on ", ref.device(),
              " (the device of codes), got ", t.device());
}

inline AqlmDims check_weight(const at::Tensor& codes, const at::Tensor& codebooks,
                             const at::Tensor& scales) {
  TORCH_CHECK(codes.scalar_type() == at::kChar || codes.scalar_type() == at::kShort,
              "aqlm_lora: codes must be int8 or int16, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 3, "aqlm_lora: codes must be 3-D [out_groups, in_groups, num_codebooks], got shape ",
              codes.sizes());
  TORCH_CHECK(codebooks.dim() == 4,
              "aqlm_lora: codebooks must be 4-D [num_codebooks, 2**nbits, out_group, in_group], got shape ",
              codebooks.sizes());
  check_float(codebooks, "codebooks");
  check_float(scales, "scales");
  check_same_device(codes, codebooks, "codebooks");
  check_same_device(codes, scales, "scales");

  AqlmDims d{};
  d.out_groups = codes.size(0);
  d.in_groups = codes.size(1);
  d.num_codebooks = codes.size(2);
  d.codebook_size = codebooks.size(1);
  d.out_group = codebooks.size(2);
  d.in_group = codebooks.size(3);
  TORCH_CHECK(codebooks.size(0) == d.num_codebooks, "aqlm_lora: codebooks.shape[0] must equal codes.shape[2] = ",
              d.num_codebooks, " (num_codebooks), got ", codebooks.size(0));
  TORCH_CHECK(d.num_codebooks >= 1, "aqlm_lora: num_codebooks must be at least 1, got ", d.num_codebooks);
  TORCH_CHECK(d.out_groups >= 1 && d.in_groups >= 1, "aqlm_lora: codes must have at least one output and one input group, got shape ",
              codes.sizes());
  TORCH_CHECK(d.out_group >= 1 && d.in_group >= 1, "aqlm_lora: codebooks group sizes must be positive, got shape ",
              codebooks.sizes());
  const int64_t k = d.codebook_size;
  TORCH_CHECK(k >= 2 && (k & (k - 1)) == 0 && k <= 65536,
              "aqlm_lora: codebooks.shape[1] must be 2**nbits with 1 <= nbits <= 16, got ", k);
  int nbits = 0;
  while ((int64_t{1} << nbits) < k) ++nbits;
  d.nbits = nbits;
  const int storage_bits = codes.scalar_type() == at::kChar ? 8 : 16;
  TORCH_CHECK(nbits <= storage_bits, "aqlm_lora: codes of dtype ", codes.scalar_type(), " hold at most ",
              storage_bits, " bits, but codebooks have 2**", nbits, " entries; use int16 codes");
  TORCH_CHECK(scales.numel() == d.out_groups && scales.dim() >= 1 && scales.size(0) == d.out_groups,
              "aqlm_lora: scales must have shape [", d.out_groups, ", 1, 1, 1] (one per output group), got ",
              scales.sizes());
  return d;
}

// Checks `input` [..., features] against the weight; returns the number of rows N.
inline int64_t check_rows(const at::Tensor& input, const char* name, int64_t features, const at::Tensor& codes) {
  check_float(input, name);
  check_same_device(codes, input, name);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == features, "aqlm_lora: ", name,
              " must have last dimension ", features, ", got shape ", input.sizes());
  return features == 0 ? 0 : input.numel() / features;
}

inline void check_vector(const c10::optional<at::Tensor>& v, const char* name, int64_t n, const at::Tensor& codes) {
  if (!v.has_value()) return;
  check_float(*v, name);
  check_same_device(codes, *v, name);
  TORCH_CHECK(v->dim() == 1 && v->size(0) == n, "aqlm_lora: ", name, " must have shape [", n, "], got ",
              v->sizes());
}

// lora_A [r, in], lora_B [out, r], same dtype; returns r.
inline int64_t check_lora(const at::Tensor& lora_A, const at::Tensor& lora_B, const AqlmDims& d,
                          const at::Tensor& codes) {
  check_float(lora_A, "lora_A");
  check_float(lora_B, "lora_B");
  check_same_device(codes, lora_A, "lora_A");
  check_same_device(codes, lora_B, "lora_B");
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == d.in_features(), "aqlm_lora: lora_A must have shape [r, ",
              d.in_features(), "], got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == d.out_features() && lora_B.size(1) == r,
              "aqlm_lora: lora_B must have shape [", d.out_features(), ", ", r, "] (r from lora_A), got ",
              lora_B.sizes());
  TORCH_CHECK(lora_A.scalar_type() == lora_B.scalar_type(), "aqlm_lora: lora_A and lora_B must share a dtype, got ",
              lora_A.scalar_type(), " and ", lora_B.scalar_type());
  return r;
}

inline void check_dropout(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "aqlm_lora: dropout_p must be in [0, 1), got ", p);
}

inline void check_scaling(double scaling) {
  TORCH_CHECK(std::isfinite(scaling), "aqlm_lora: scaling must be finite, got ", scaling);
}

// The schema's int is int64; a negative seed or offset would alias a large unsigned one.
inline void check_seed(int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0, "aqlm_lora: seed must be an integer in [0, 2**63 - 1], got ", seed);
  TORCH_CHECK(offset >= 0, "aqlm_lora: offset must be an integer in [0, 2**63 - 1], got ", offset);
}

// Sizes of one LoRA call: the weight's, the rows N of input and the rank r.
struct LoraCall {
  AqlmDims d;
  int64_t n;
  int64_t r;
};

inline LoraCall check_lora_forward(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& codebooks,
                                   const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& lora_A, const at::Tensor& lora_B,
                                   const c10::optional<at::Tensor>& lora_bias, double scaling, double dropout_p,
                                   int64_t seed, int64_t offset) {
  LoraCall c{check_weight(codes, codebooks, scales), 0, 0};
  c.n = check_rows(input, "input", c.d.in_features(), codes);
  check_vector(bias, "bias", c.d.out_features(), codes);
  c.r = check_lora(lora_A, lora_B, c.d, codes);
  check_vector(lora_bias, "lora_bias", c.d.out_features(), codes);
  check_dropout(dropout_p);
  check_scaling(scaling);
  check_seed(seed, offset);
  return c;
}

inline LoraCall check_lora_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& xa,
                                    const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                    double dropout_p, int64_t seed, int64_t offset) {
  LoraCall c{check_weight(codes, codebooks, scales), 0, 0};
  c.n = check_rows(input, "input", c.d.in_features(), codes);
  c.r = check_lora(lora_A, lora_B, c.d, codes);
  TORCH_CHECK(check_rows(grad, "grad", c.d.out_features(), codes) == c.n, "aqlm_lora: grad must have ", c.n,
              " rows like input, got shape ", grad.sizes());
  check_float(xa, "xa");
  check_same_device(codes, xa, "xa");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == c.n && xa.size(1) == c.r, "aqlm_lora: xa must have shape [", c.n, ", ",
              c.r, "], got ", xa.sizes());
  check_dropout(dropout_p);
  check_scaling(scaling);
  check_seed(seed, offset);
  return c;
}

}  // namespace aqlm_lora
