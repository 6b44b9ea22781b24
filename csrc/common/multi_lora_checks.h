// Argument checks of lora_mixed_forward (many adapters in one batch), shared by both backends.
// aqlm_lora/checks.py (check_lora_mixed_forward) mirrors them word for word for the fake kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "common/checks.h"

namespace aqlm_lora {

// Sizes of one mixed-batch call: the weight's, the rows N, the adapters K and the (padded) rank r.
struct MixedLoraCall {
  AqlmDims d;
  int64_t n;
  int64_t k;
  int64_t r;
};

// An optional per-adapter vector stack [K, out].
inline void check_per_adapter(const c10::optional<at::Tensor>& t, const char* name, int64_t k, int64_t out,
                              const at::Tensor& codes) {
  if (!t.has_value()) return;
  check_float(*t, name);
  check_same_device(codes, *t, name);
  TORCH_CHECK(t->dim() == 2 && t->size(0) == k && t->size(1) == out, "aqlm_lora: ", name, " must have shape [", k,
              ", ", out, "] (num_adapters from lora_A), got ", t->sizes());
}

inline MixedLoraCall check_lora_mixed_forward(const at::Tensor& input, const at::Tensor& codes,
                                              const at::Tensor& codebooks, const at::Tensor& scales,
                                              const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B_t, const c10::optional<at::Tensor>& lora_bias,
                                              const at::Tensor& scalings, const c10::optional<at::Tensor>& row_scale,
                                              const at::Tensor& indices) {
  MixedLoraCall c{check_weight(codes, codebooks, scales), 0, 0, 0};
  const int64_t in = c.d.in_features(), out = c.d.out_features();
  c.n = check_rows(input, "input", in, codes);
  check_vector(bias, "bias", out, codes);
  check_float(lora_A, "lora_A");
  check_float(lora_B_t, "lora_B_t");
  check_same_device(codes, lora_A, "lora_A");
  check_same_device(codes, lora_B_t, "lora_B_t");
  TORCH_CHECK(lora_A.dim() == 3 && lora_A.size(2) == in, "aqlm_lora: lora_A must have shape [num_adapters, r, ", in,
              "], got ", lora_A.sizes());
  c.k = lora_A.size(0);
  c.r = lora_A.size(1);
  TORCH_CHECK(lora_B_t.dim() == 3 && lora_B_t.size(0) == c.k && lora_B_t.size(1) == c.r && lora_B_t.size(2) == out,
              "aqlm_lora: lora_B_t must have shape [", c.k, ", ", c.r, ", ", out,
              "] (lora_B transposed; num_adapters and r from lora_A), got ", lora_B_t.sizes());
  TORCH_CHECK(lora_A.scalar_type() == lora_B_t.scalar_type(),
              "aqlm_lora: lora_A and lora_B_t must share a dtype, got ", lora_A.scalar_type(), " and ",
              lora_B_t.scalar_type());
  check_per_adapter(lora_bias, "lora_bias", c.k, out, codes);
  check_float(scalings, "scalings");
  check_same_device(codes, scalings, "scalings");
  TORCH_CHECK(scalings.dim() == 1 && scalings.size(0) == c.k, "aqlm_lora: scalings must have shape [", c.k,
              "] (one per adapter), got ", scalings.sizes());
  check_per_adapter(row_scale, "row_scale", c.k, out, codes);
  TORCH_CHECK(indices.scalar_type() == at::kLong, "aqlm_lora: indices must be int64, got ", indices.scalar_type());
  check_same_device(codes, indices, "indices");
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == c.n, "aqlm_lora: indices must have shape [", c.n,
              "] (one adapter index per row of input), got ", indices.sizes());
  return c;
}

}  // namespace aqlm_lora
