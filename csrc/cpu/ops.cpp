// CPU implementations of the aqlm_lora ops. Few rows go through decode_gemm (no dequantized W);
// many rows dequantize W in blocks into per-thread buffers and hand each block to BLAS, so the
// whole dense W never exists. The LoRA shrink/expand and dropout run in the same call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/multi_lora_checks.h"
#include "cpu/blas_blocks.h"
#include "cpu/kernels.h"
#include "cpu/scratch.h"

namespace aqlm_lora::cpu {
namespace {

// Rows of W (forward) or columns of W (gemm_t) dequantized per block. Each forward block is one
// GEMM that packs all of x again, so fewer, larger blocks pay off at many rows: 128 rows measured
// 10-15% faster than 64 at N = 512 (4096 to 14336 inputs, 2 threads; 256 and 512 no faster), for a
// tile of 128 * in_features floats per thread.
constexpr int64_t kBlockRows = 128;
constexpr int64_t kBlockCols = 64;

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Owns the converted weight tensors that a Weight view points into.
struct PreparedWeight {
  at::Tensor codes, codebooks, scales;
  AqlmDims d;
};

PreparedWeight prepare(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                       const AqlmDims& d, at::ScalarType acc) {
  return {codes.contiguous(), codebooks.to(acc).contiguous(), scales.to(acc).reshape({-1}).contiguous(), d};
}

// Calls f(acc_t{}, code_t{}) with the accumulation and code types of this call.
template <typename F>
void dispatch_types(at::ScalarType acc, const at::Tensor& codes, F&& f) {
  const bool wide = codes.scalar_type() == at::kShort;
  if (acc == at::kDouble) {
    wide ? f(double{}, int16_t{}) : f(double{}, int8_t{});
  } else {
    wide ? f(float{}, int16_t{}) : f(float{}, int8_t{});
  }
}

// Calls f(acc_t{}) with the accumulation type of a float32/float64 tensor (no code type involved).
template <typename F>
void dispatch_acc(at::ScalarType acc, F&& f) {
  if (acc == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

template <typename acc_t, typename code_t>
Weight<acc_t, code_t> view(const PreparedWeight& p) {
  return {p.codes.data_ptr<code_t>(), p.codebooks.data_ptr<acc_t>(), p.scales.data_ptr<acc_t>(), p.d};
}

at::Tensor rows_of(const at::Tensor& t, int64_t n, int64_t features, at::ScalarType acc) {
  return t.reshape({n, features}).to(acc).contiguous();
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  shape.back() = last;
  return shape;
}

// A dequantized tile (acc_t) as an operand of a GEMM in `dtype` (acc_t, or bfloat16: see gemm_dtype).
template <typename acc_t>
at::Tensor as_gemm_operand(acc_t* data, at::IntArrayRef sizes, at::ScalarType dtype) {
  const at::Tensor tile = at::from_blob(data, sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  return tile.scalar_type() == dtype ? tile : tile.to(dtype);
}

// The many-row GEMMs run in bfloat16 (oneDNN accumulates in float32) when the activations are
// bfloat16 and the CPU has native bf16 dot products: about 4x faster than float32, with the
// rounding plain bf16 PyTorch has (W rounded to bf16). Otherwise in the accumulation type.
at::ScalarType gemm_dtype(at::ScalarType input, at::ScalarType acc) {
#if defined(__x86_64__)
  static const bool native_bf16 = __builtin_cpu_supports("avx512bf16");
  if (native_bf16 && input == at::kBFloat16) return at::kBFloat16;
#endif
  return acc;
}

// out [N, out] = x [N, in] @ W^T, contiguous; x and out in acc_t, or both in bfloat16 (gemm_dtype).
template <typename acc_t, typename code_t>
void base_gemm(const Weight<acc_t, code_t>& w, const at::Tensor& x, Kernel kernel, at::Tensor& out) {
  const AqlmDims& d = w.d;
  const int64_t n = x.size(0), in = d.in_features();
  if (n == 0) return;
  if (kernel != Kernel::kGemm) return decode_gemm(w, kernel, x.data_ptr<acc_t>(), n, out.data_ptr<acc_t>());
  const int64_t groups_per_block = groups_per_gemm_block(d.out_groups, kBlockRows / d.out_group);
  const int64_t blocks = (d.out_groups + groups_per_block - 1) / groups_per_block;
  const int64_t block_work = groups_per_block * d.out_group * in * (n + d.num_codebooks);
  parallel_for_single_threaded_blas(blocks, grain_for(block_work), [&](int64_t b_begin, int64_t b_end) {
    const PlainAtenCalls plain;
    std::vector<acc_t> buf = scratch<acc_t>(groups_per_block * d.out_group * in);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t o0 = b * groups_per_block, o1 = std::min(d.out_groups, o0 + groups_per_block);
      const int64_t rows = (o1 - o0) * d.out_group;
      dequantize_tile(w, o0, o1, 0, d.in_groups, buf.data(), in);
      const at::Tensor block = as_gemm_operand(buf.data(), {rows, in}, x.scalar_type());
      at::Tensor dst = out.narrow(1, o0 * d.out_group, rows);
      at::mm_out(dst, x, block.t());
    }
  });
}

// dx [N, in] = g [N, out] @ W, by blocks of input columns so each block is written by one thread.
// g and dx in acc_t, or both in bfloat16 (gemm_dtype).
template <typename acc_t, typename code_t>
void base_gemm_t(const Weight<acc_t, code_t>& w, const at::Tensor& g, at::Tensor& dx) {
  const AqlmDims& d = w.d;
  const int64_t out = d.out_features();
  if (g.size(0) == 0) return;
  const int64_t groups_per_block = groups_per_gemm_block(d.in_groups, kBlockCols / d.in_group);
  const int64_t blocks = (d.in_groups + groups_per_block - 1) / groups_per_block;
  const int64_t block_work = out * groups_per_block * d.in_group * (g.size(0) + d.num_codebooks);
  parallel_for_single_threaded_blas(blocks, grain_for(block_work), [&](int64_t b_begin, int64_t b_end) {
    const PlainAtenCalls plain;
    std::vector<acc_t> buf = scratch<acc_t>(out * groups_per_block * d.in_group);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t i0 = b * groups_per_block, i1 = std::min(d.in_groups, i0 + groups_per_block);
      const int64_t cols = (i1 - i0) * d.in_group;
      dequantize_tile(w, 0, d.out_groups, i0, i1, buf.data(), cols);
      const at::Tensor block = as_gemm_operand(buf.data(), {out, cols}, g.scalar_type());
      at::Tensor dst = dx.narrow(1, i0 * d.in_group, cols);
      at::mm_out(dst, g, block);
    }
  });
}

// The LoRA matmuls on acc-type tensors (see lora_gemm.cpp for why they are not BLAS calls).
at::Tensor lora_rows_dot(const at::Tensor& x, const at::Tensor& a) {
  const at::Tensor xc = x.contiguous(), ac = a.contiguous();
  at::Tensor y = empty_output({x.size(0), a.size(0)}, x.options());
  dispatch_acc(x.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    rows_dot<acc_t>(xc.data_ptr<acc_t>(), ac.data_ptr<acc_t>(), x.size(0), a.size(0), x.size(1), y.data_ptr<acc_t>());
  });
  return y;
}

// y (+)= alpha * u [N, r] @ v [r, m]; y contiguous [N, m].
void lora_expand(const at::Tensor& u, const at::Tensor& v, double alpha, bool accumulate, at::Tensor& y) {
  const at::Tensor uc = u.contiguous(), vc = v.contiguous();
  dispatch_acc(y.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    expand<acc_t>(uc.data_ptr<acc_t>(), vc.data_ptr<acc_t>(), u.size(0), u.size(1), v.size(1),
                  static_cast<acc_t>(alpha), accumulate, y.data_ptr<acc_t>());
  });
}

// A contiguous transposed copy of a 2-D acc-type tensor.
at::Tensor lora_transpose(const at::Tensor& t) {
  const at::Tensor src = t.contiguous();
  at::Tensor dst = empty_output({t.size(1), t.size(0)}, t.options());
  dispatch_acc(t.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    transpose<acc_t>(src.data_ptr<acc_t>(), t.size(0), t.size(1), dst.data_ptr<acc_t>());
  });
  return dst;
}

// out [N, m] += alpha * xa [N, r] @ lora_B [m, r]^T. Few rows take r-long dots straight from
// lora_B; more rows amortize one transposed copy and stream it (several times faster per row).
constexpr int64_t kFewLoraRows = 4;
void lora_expand_b(const at::Tensor& xa, const at::Tensor& lora_B, double alpha, at::Tensor& out) {
  if (xa.size(0) > kFewLoraRows) return lora_expand(xa, lora_transpose(lora_B), alpha, /*accumulate=*/true, out);
  const at::Tensor u = xa.contiguous(), w = lora_B.contiguous();
  dispatch_acc(out.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    expand_rows<acc_t>(u.data_ptr<acc_t>(), w.data_ptr<acc_t>(), u.size(0), u.size(1), w.size(0),
                       static_cast<acc_t>(alpha), out.data_ptr<acc_t>());
  });
}

// alpha * u [N, r]^T @ v [N, m] -> [r, m]
at::Tensor lora_outer_sum(const at::Tensor& u, const at::Tensor& v, double alpha) {
  const at::Tensor uc = u.contiguous(), vc = v.contiguous();
  at::Tensor y = empty_output({u.size(1), v.size(1)}, v.options());
  dispatch_acc(v.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    outer_sum<acc_t>(uc.data_ptr<acc_t>(), vc.data_ptr<acc_t>(), u.size(0), u.size(1), v.size(1),
                     static_cast<acc_t>(alpha), y.data_ptr<acc_t>());
  });
  return y;
}

// In place: x = x * keep / (1 - p).
at::Tensor& dropout_(at::Tensor& x, double p, int64_t seed, int64_t offset) {
  dispatch_acc(x.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    apply_dropout<acc_t>(x.data_ptr<acc_t>(), x.data_ptr<acc_t>(), x.numel(), p,
                         static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  });
  return x;
}

// x itself when p is 0, else a dropped-out copy.
at::Tensor dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  if (p == 0.0) return x;
  at::Tensor y = x.clone();
  return dropout_(y, p, seed, offset);
}

// out [N, out] in acc type (x's dtype): x @ W^T + bias (+ the LoRA expand when lora is given and
// the kernel can fuse it: *lora_added says whether it did). input: the caller's rows before the
// conversion to acc, used as the GEMM operand when gemm_dtype says so.
at::Tensor base_forward(const at::Tensor& x, const at::Tensor& input, const at::Tensor& codes,
                        const at::Tensor& codebooks, const at::Tensor& scales, const AqlmDims& d,
                        const c10::optional<at::Tensor>& bias, const LoraEpilogue* lora = nullptr,
                        bool* lora_added = nullptr) {
  const at::ScalarType acc = x.scalar_type();
  const int64_t n = x.size(0);
  at::Tensor out = empty_output({n, d.out_features()}, x.options());
  const Kernel kernel = choose_kernel(d, x, codebooks.scalar_type(), scales);
  if (kernel == Kernel::kAvx2Gather || kernel == Kernel::kAvx2Lut) {
    const bool added = avx2_decode(kernel, x, codes, codebooks, scales, d, out, lora);
    if (lora_added != nullptr) *lora_added = added;
  } else {
    const PreparedWeight pw = prepare(codes, codebooks, scales, d, acc);
    const at::ScalarType gemm = kernel == Kernel::kGemm ? gemm_dtype(input.scalar_type(), acc) : acc;
    const at::Tensor gemm_x = gemm == acc ? x : input.reshape({n, d.in_features()}).contiguous();
    at::Tensor gemm_out = gemm == acc ? out : empty_output({n, d.out_features()}, gemm_x.options());
    dispatch_types(acc, pw.codes, [&](auto acc_tag, auto code_tag) {
      base_gemm(view<decltype(acc_tag), decltype(code_tag)>(pw), gemm_x, kernel, gemm_out);
    });
    if (gemm != acc) out.copy_(gemm_out);
  }
  if (bias.has_value()) out.add_(bias->to(acc));
  return out;
}

// dx [N, in] in acc type (g's dtype) = g @ W. grad: the caller's rows before the conversion to
// acc, used as the GEMM operand when gemm_dtype says so.
at::Tensor base_backward(const at::Tensor& g, const at::Tensor& grad, const at::Tensor& codes,
                         const at::Tensor& codebooks, const at::Tensor& scales, const AqlmDims& d) {
  const at::ScalarType acc = g.scalar_type();
  const int64_t n = g.size(0);
  const PreparedWeight pw = prepare(codes, codebooks, scales, d, acc);
  // Few rows keep the accumulation type (fp32 is cheap there and exact for the bf16 inputs).
  const at::ScalarType gemm = decode_fits(d, n) ? acc : gemm_dtype(grad.scalar_type(), acc);
  const at::Tensor gemm_g = gemm == acc ? g : grad.reshape({n, d.out_features()}).contiguous();
  at::Tensor dx = empty_output({n, d.in_features()}, gemm_g.options());
  dispatch_types(acc, pw.codes, [&](auto acc_tag, auto code_tag) {
    base_gemm_t(view<decltype(acc_tag), decltype(code_tag)>(pw), gemm_g, dx);
  });
  return dx.to(acc);
}

at::Tensor dequantize_cpu(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales) {
  const PlainAtenCalls plain;
  const AqlmDims d = check_weight(codes, codebooks, scales);
  const at::ScalarType acc = acc_dtype(codebooks);
  const PreparedWeight pw = prepare(codes, codebooks, scales, d, acc);
  at::Tensor out = empty_output({d.out_features(), d.in_features()}, codebooks.options().dtype(acc));
  dispatch_types(acc, pw.codes, [&](auto acc_tag, auto code_tag) {
    using acc_t = decltype(acc_tag);
    const auto w = view<acc_t, decltype(code_tag)>(pw);
    acc_t* dst = out.data_ptr<acc_t>();
    const int64_t row_work = d.out_group * d.in_features() * d.num_codebooks;
    at::parallel_for(0, d.out_groups, grain_for(row_work), [&](int64_t o0, int64_t o1) {
      dequantize_tile(w, o0, o1, 0, d.in_groups, dst + o0 * d.out_group * d.in_features(), d.in_features());
    });
  });
  return out.to(codebooks.scalar_type());
}

at::Tensor aqlm_gemm_cpu(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& codebooks,
                         const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  const PlainAtenCalls plain;
  const AqlmDims d = check_weight(codes, codebooks, scales);
  const int64_t n = check_rows(input, "input", d.in_features(), codes);
  check_vector(bias, "bias", d.out_features(), codes);
  const at::ScalarType acc = acc_dtype(input);
  const at::Tensor x = rows_of(input, n, d.in_features(), acc);
  const at::Tensor out = base_forward(x, input, codes, codebooks, scales, d, bias);
  return out.to(input.scalar_type()).reshape(with_last(input.sizes(), d.out_features()));
}

at::Tensor aqlm_gemm_t_cpu(const at::Tensor& grad, const at::Tensor& codes, const at::Tensor& codebooks,
                           const at::Tensor& scales) {
  const PlainAtenCalls plain;
  const AqlmDims d = check_weight(codes, codebooks, scales);
  const int64_t n = check_rows(grad, "grad", d.out_features(), codes);
  const at::Tensor g = rows_of(grad, n, d.out_features(), acc_dtype(grad));
  const at::Tensor dx = base_backward(g, grad, codes, codebooks, scales, d);
  return dx.to(grad.scalar_type()).reshape(with_last(grad.sizes(), d.in_features()));
}

at::Tensor dropout_mask_cpu(const at::Tensor& input, double dropout_p, int64_t seed, int64_t offset) {
  const PlainAtenCalls plain;
  check_dropout(dropout_p);
  check_seed(seed, offset);
  at::Tensor mask = at::empty(input.sizes(), input.options().dtype(at::kBool));
  dropout_mask(mask.data_ptr<bool>(), mask.numel(), static_cast<float>(dropout_p), static_cast<uint64_t>(seed),
               static_cast<uint64_t>(offset));
  return mask;
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(const at::Tensor& input, const at::Tensor& codes,
                                                    const at::Tensor& codebooks, const at::Tensor& scales,
                                                    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B,
                                                    const c10::optional<at::Tensor>& lora_bias, double scaling,
                                                    double dropout_p, int64_t seed, int64_t offset) {
  const PlainAtenCalls plain;
  const LoraCall call = check_lora_forward(input, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling,
                                           dropout_p, seed, offset);
  const AqlmDims& d = call.d;
  const int64_t n = call.n;
  const at::ScalarType acc = acc_dtype(input);
  const at::Tensor x = rows_of(input, n, d.in_features(), acc);
  const at::Tensor xa = lora_rows_dot(dropout(x, dropout_p, seed, offset), lora_A.to(acc));
  const at::Tensor b = lora_B.to(acc).contiguous();
  // The few-row gather kernel adds x A^T B^T in its epilogue: the separate expand would be a
  // second, single-threaded pass over B that costs 10-20% of a one-token call.
  const LoraEpilogue epilogue{xa, b, scaling};
  bool lora_added = false;
  at::Tensor out = base_forward(x, input, codes, codebooks, scales, d, bias, &epilogue, &lora_added);
  if (!lora_added) lora_expand_b(xa, b, scaling, out);
  if (lora_bias.has_value()) out.add_(lora_bias->to(acc), scaling);
  return {out.to(input.scalar_type()).reshape(with_last(input.sizes(), d.out_features())),
          xa.to(lora_A.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& xa, const at::Tensor& codes,
    const at::Tensor& codebooks, const at::Tensor& scales, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout_p, int64_t seed, int64_t offset, bool input_grad) {
  const PlainAtenCalls plain;
  const LoraCall call = check_lora_backward(grad, input, xa, codes, codebooks, scales, lora_A, lora_B, scaling,
                                                 dropout_p, seed, offset);
  const AqlmDims& d = call.d;
  const int64_t n = call.n;
  const at::ScalarType acc = acc_dtype(input);
  const at::Tensor g = rows_of(grad, n, d.out_features(), acc);
  const at::Tensor a = lora_A.to(acc);
  const at::Tensor gb = lora_rows_dot(g, lora_transpose(lora_B.to(acc)));  // [N, r]
  const at::Tensor grad_B = lora_transpose(lora_outer_sum(xa.to(acc), g, scaling));  // [out, r], from [r, out]
  // x (an accumulation-type copy for bf16/fp16 input) and the dropped-out x rebuilt from the seed
  // are freed before dx exists: with float32 input at most two N x in temporaries are alive at
  // once; bf16/fp16 input adds the float32 copy of grad and, at the end, dx cast to its dtype.
  at::Tensor grad_A;
  {
    const at::Tensor x = rows_of(input, n, d.in_features(), acc);
    grad_A = lora_outer_sum(gb, dropout(x, dropout_p, seed, offset), scaling);
  }
  at::Tensor grad_input = at::empty({0}, input.options());
  if (input_grad) {
    at::Tensor dx = base_backward(g, grad, codes, codebooks, scales, d);
    if (dropout_p == 0.0) {
      lora_expand(gb, a, scaling, /*accumulate=*/true, dx);
    } else {
      at::Tensor t = empty_output(dx.sizes(), dx.options());
      lora_expand(gb, a, 1.0, /*accumulate=*/false, t);
      dx.add_(dropout_(t, dropout_p, seed, offset), scaling);
    }
    grad_input = dx.to(input.scalar_type()).reshape(input.sizes());
  }
  return {grad_input, grad_A.to(lora_A.scalar_type()), grad_B.to(lora_B.scalar_type())};
}

// A [*] float tensor as a contiguous acc-type copy, or an undefined tensor for an absent one.
at::Tensor acc_or_empty(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

at::Tensor lora_mixed_forward_cpu(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& codebooks,
                                  const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& lora_A, const at::Tensor& lora_B_t,
                                  const c10::optional<at::Tensor>& lora_bias, const at::Tensor& scalings,
                                  const c10::optional<at::Tensor>& row_scale, const at::Tensor& indices) {
  const PlainAtenCalls plain;
  const MixedLoraCall call = check_lora_mixed_forward(input, codes, codebooks, scales, bias, lora_A, lora_B_t,
                                                      lora_bias, scalings, row_scale, indices);
  const AqlmDims& d = call.d;
  const int64_t n = call.n, k = call.k;
  const at::Tensor idx = indices.contiguous();
  const int64_t* idx_p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx_p[i] >= -1 && idx_p[i] < k, "aqlm_lora: indices must lie in [-1, ", k,
                ") (-1: no adapter), got ", idx_p[i], " at row ", i);
  }
  const at::ScalarType acc = acc_dtype(input);
  const at::Tensor s = scalings.to(acc).contiguous();
  dispatch_acc(acc, [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    const acc_t* sp = s.data_ptr<acc_t>();
    for (int64_t a = 0; a < k; ++a) {
      TORCH_CHECK(std::isfinite(static_cast<double>(sp[a])), "aqlm_lora: scalings must be finite, got ",
                  static_cast<double>(sp[a]), " for adapter ", a);
    }
  });
  const at::Tensor x = rows_of(input, n, d.in_features(), acc);
  at::Tensor out = base_forward(x, input, codes, codebooks, scales, d, c10::nullopt);
  const at::Tensor a = lora_A.to(acc).contiguous(), bt = lora_B_t.to(acc).contiguous();
  const at::Tensor lb = acc_or_empty(lora_bias, acc), rs = acc_or_empty(row_scale, acc);
  const at::Tensor b = acc_or_empty(bias, acc);
  dispatch_acc(acc, [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    const MixedLora<acc_t> m{x.data_ptr<acc_t>(), idx_p,           a.data_ptr<acc_t>(),   bt.data_ptr<acc_t>(),
                             ptr_or_null<acc_t>(lb), s.data_ptr<acc_t>(), ptr_or_null<acc_t>(rs), ptr_or_null<acc_t>(b),
                             n,                 k,               call.r,                d.in_features(),
                             d.out_features()};
    mixed_lora_rows<acc_t>(m, out.data_ptr<acc_t>());
  });
  return out.to(input.scalar_type()).reshape(with_last(input.sizes(), d.out_features()));
}

}  // namespace

TORCH_LIBRARY_IMPL(aqlm_lora, CPU, m) {
  m.impl("dequantize", &dequantize_cpu);
  m.impl("aqlm_gemm", &aqlm_gemm_cpu);
  m.impl("aqlm_gemm_t", &aqlm_gemm_t_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
  m.impl("lora_forward", &lora_forward_cpu);
  m.impl("lora_backward", &lora_backward_cpu);
  m.impl("lora_mixed_forward", &lora_mixed_forward_cpu);
}

}  // namespace aqlm_lora::cpu
