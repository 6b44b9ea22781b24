// CUDA implementations of the aqlm_lora ops (schemas in csrc/aqlm_lora.cpp, semantics in
// aqlm_lora/reference.py) and their one TORCH_LIBRARY_IMPL block.
//
// Strategy per call:
//   * decode, 1 <= N <= kDecodeMaxRows tokens, float32/16/bf16: GEMV kernels of decode.cu that
//     read every code once for all tokens; the LoRA shrink is one small kernel (dropout fused),
//     the LoRA expand, bias and lora_bias are fused in the GEMV epilogue. With the conversion of
//     x to float32 (skipped for float32 input), a call is 2 launches, 3 with LoRA.
//   * prefill / training (more tokens, or float64): W is dequantized block by block into a
//     workspace of at most kWorkspaceBytes (rows of W for x W^T, columns of W for g W) in the
//     GEMM dtype (the input's), and each block is multiplied with cuBLAS straight into its slice
//     of the output (at::mm_out / at::addmm_out). The whole dense W never outlives the call.
//     The LoRA GEMMs are cuBLAS too, in the input's dtype when lora_A shares it, else float32.
// Everything runs on the current stream under the input's device guard; nothing syncs the host.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/multi_lora_checks.h"
#include "common/plain_aten.h"
#include "kernels.cuh"

namespace aqlm_lora {
namespace cuda {

// multi_lora.cu: the LoRA part and epilogue of lora_mixed_forward, in place on y = x W^T.
void mixed_lora_apply(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& lora_A,
                      const at::Tensor& lora_B_t, const at::Tensor& lora_bias, const at::Tensor& scalings,
                      const at::Tensor& row_scale, const at::Tensor& bias, const at::Tensor& y);

namespace {

// Bytes of dequantized weight one block may hold on the tiled cuBLAS path. 64 MiB holds all of a
// 4096 x 4096 fp16 weight (one GEMM) and an 11008 x 4096 one in two blocks.
constexpr int64_t kWorkspaceBytes = int64_t{64} << 20;

// Product of all but the last dimension (the number of rows N; 1 for a 1-D input).
int64_t leading_rows(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t k = 0; k + 1 < t.dim(); ++k) n *= t.size(k);
  return n;
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape = t.sizes().vec();
  shape.back() = last;
  return shape;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// dtype of the LoRA GEMMs: the input's when lora_A shares it (like a plain PyTorch LoRA layer at
// that dtype), else float32 (float64 when either side is float64).
at::ScalarType lora_dtype(at::ScalarType input, at::ScalarType lora) {
  if (input == lora) return input;
  return (input == at::kDouble || lora == at::kDouble) ? at::kDouble : at::kFloat;
}

// x [N, in] contiguous -> x @ W^T + bias [N, out] in x's dtype. bias: [out] in x's dtype or undefined.
at::Tensor tiled_gemm(const at::Tensor& x, const WeightRef& w, const at::Tensor& bias) {
  const int64_t n = x.size(0), in = w.d.in_features(), out = w.d.out_features();
  at::Tensor y = at::empty({n, out}, x.options());
  if (n == 0 || out == 0) return y;
  if (in == 0) {
    if (bias.defined()) {
      y.copy_(bias.unsqueeze(0).expand({n, out}));
    } else {
      y.zero_();
    }
    return y;
  }
  int64_t rows = std::max<int64_t>(1, kWorkspaceBytes / (in * x.element_size()));
  if (rows >= 64) rows -= rows % 64;
  rows = std::min(rows, out);
  const at::Tensor workspace = at::empty({rows * in}, x.options());
  for (int64_t r0 = 0; r0 < out; r0 += rows) {
    const int64_t nr = std::min(rows, out - r0);
    const at::Tensor tile = workspace.narrow(0, 0, nr * in).view({nr, in});
    dequantize_tile(w, r0, nr, 0, w.d.in_groups, tile);
    at::Tensor y_block = y.narrow(1, r0, nr);  // [N, nr], row stride out: cuBLAS writes it in place
    if (bias.defined()) {
      at::addmm_out(y_block, bias.narrow(0, r0, nr), x, tile.t());
    } else {
      at::mm_out(y_block, x, tile.t());
    }
  }
  return y;
}

// g [N, out] contiguous -> g @ W [N, in] in g's dtype, one block of W's columns (whole in-groups)
// at a time, so each output element comes from exactly one GEMM.
at::Tensor tiled_gemm_t(const at::Tensor& g, const WeightRef& w) {
  const int64_t n = g.size(0), in = w.d.in_features(), out = w.d.out_features(), ig = w.d.in_group;
  at::Tensor dx = at::empty({n, in}, g.options());
  if (n == 0 || in == 0) return dx;
  if (out == 0) return dx.zero_();
  int64_t groups = std::max<int64_t>(1, kWorkspaceBytes / (out * ig * g.element_size()));
  groups = std::min(groups, w.d.in_groups);
  const at::Tensor workspace = at::empty({out * groups * ig}, g.options());
  for (int64_t g0 = 0; g0 < w.d.in_groups; g0 += groups) {
    const int64_t ng = std::min(groups, w.d.in_groups - g0);
    const at::Tensor tile = workspace.narrow(0, 0, out * ng * ig).view({out, ng * ig});
    dequantize_tile(w, 0, out, g0, ng, tile);
    at::Tensor dx_block = dx.narrow(1, g0 * ig, ng * ig);
    at::mm_out(dx_block, g, tile);
  }
  return dx;
}

// dropout(x) in dtype `dt` (x itself, converted, when p = 0). x: [N, in] contiguous.
at::Tensor dropout_copy(const at::Tensor& x, at::ScalarType dt, double p, uint64_t seed, uint64_t offset) {
  if (p == 0.0) return x.to(dt);
  at::Tensor xd = x.to(dt, /*non_blocking=*/false, /*copy=*/true).contiguous();
  dropout_scale_inplace(xd, p, seed, offset);
  return xd;
}

struct LoraArgs {
  const at::Tensor& lora_A;
  const at::Tensor& lora_B;
  double scaling;
  double dropout_p;
  uint64_t seed;
  uint64_t offset;
};

// Forward of aqlm_gemm (lora == nullptr) and lora_forward. Returns (out [..., out], xa [N, r]).
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& input, const WeightRef& w,
                                                const c10::optional<at::Tensor>& bias,
                                                const c10::optional<at::Tensor>& lora_bias, const LoraArgs* lora) {
  const int64_t n = leading_rows(input), in = w.d.in_features(), out = w.d.out_features();
  const at::ScalarType dt = input.scalar_type();
  const at::Tensor x = input.reshape({n, in}).contiguous();
  const double s = lora != nullptr ? lora->scaling : 0.0;
  const bool lora_decodable =
      lora == nullptr || (is_single_or_half(lora->lora_A.scalar_type()) && is_single_or_half(lora->lora_B.scalar_type()));
  const Kernel kernel = choose_kernel(w.d, n, dt, w.codebooks, lora_decodable);
  const bool decode = kernel != Kernel::kTiledGemm;
  at::Tensor y, xa;
  if (decode) {
    const at::Tensor xf = aligned_contiguous(x.to(at::kFloat));
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    const at::Tensor lora_bias_c = lora_bias.has_value() ? lora_bias->contiguous() : at::Tensor();
    at::Tensor xa_f, lora_B;
    if (lora != nullptr) {
      const at::ScalarType a_dtype = lora->lora_A.scalar_type();
      xa_f = at::empty({n, lora->lora_A.size(0)}, x.options().dtype(at::kFloat));
      xa = a_dtype == at::kFloat ? xa_f : at::empty({n, lora->lora_A.size(0)}, x.options().dtype(a_dtype));
      lora_shrink(xf, lora->lora_A.contiguous(), lora->dropout_p, lora->seed, lora->offset, xa_f, xa);
      lora_B = lora->lora_B.contiguous();
    }
    y = at::empty({n, out}, x.options());
    decode_gemv(kernel, xf, w, bias_c, lora_bias_c, xa_f, lora_B, static_cast<float>(s), y);
  } else {
    at::Tensor bias_g;  // bias + s * lora_bias, summed in the accumulation dtype, then x's dtype
    if (bias.has_value() || lora_bias.has_value()) {
      const at::ScalarType acc = acc_dtype(dt);
      at::Tensor b = bias.has_value() ? bias->to(acc) : at::zeros({out}, x.options().dtype(acc));
      if (lora_bias.has_value()) b = b.add(lora_bias->to(acc), s);
      bias_g = b.to(dt).contiguous();
    }
    y = tiled_gemm(x, w, bias_g);
    if (lora != nullptr) {
      const at::ScalarType ldt = lora_dtype(dt, lora->lora_A.scalar_type());
      const at::Tensor xd = dropout_copy(x, ldt, lora->dropout_p, lora->seed, lora->offset);
      const at::Tensor a = lora->lora_A.to(ldt);
      const at::Tensor b = lora->lora_B.to(ldt);
      const at::Tensor xa_c = at::mm(xd, a.t());  // [N, r]
      if (ldt == dt) {
        y.addmm_(xa_c, b.t(), /*beta=*/1.0, /*alpha=*/s);
      } else {
        y.add_(at::mm(xa_c, b.t()), s);
      }
      xa = xa_c.to(lora->lora_A.scalar_type());
    }
  }
  return std::make_tuple(y.view(with_last_dim(input, out)), xa);
}

at::ScalarType dtype_or_float(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->scalar_type() : at::kFloat;
}

// ------------------------------------------------------------------------------------------------
// The ops.

at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales) {
  const PlainAtenCalls plain;
  const AqlmDims d = check_weight(codes, codebooks, scales);
  c10::cuda::OptionalCUDAGuard guard(at::device_of(codes));
  check_bf16_supported({codebooks.scalar_type(), scales.scalar_type()});
  const WeightRef w = make_weight(codes, codebooks, scales, d);
  const at::Tensor weight = at::empty({d.out_features(), d.in_features()}, codebooks.options());
  dequantize_tile(w, 0, d.out_features(), 0, d.in_groups, weight);
  return weight;
}

at::Tensor aqlm_gemm_cuda(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& codebooks,
                          const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  const PlainAtenCalls plain;
  const AqlmDims d = check_weight(codes, codebooks, scales);
  check_rows(input, "input", d.in_features(), codes);
  check_vector(bias, "bias", d.out_features(), codes);
  c10::cuda::OptionalCUDAGuard guard(at::device_of(input));
  check_bf16_supported({input.scalar_type(), codebooks.scalar_type(), scales.scalar_type(), dtype_or_float(bias)});
  const WeightRef w = make_weight(codes, codebooks, scales, d);
  return std::get<0>(forward_impl(input, w, bias, c10::nullopt, nullptr));
}

at::Tensor aqlm_gemm_t_cuda(const at::Tensor& grad, const at::Tensor& codes, const at::Tensor& codebooks,
                            const at::Tensor& scales) {
  const PlainAtenCalls plain;
  const AqlmDims d = check_weight(codes, codebooks, scales);
  check_rows(grad, "grad", d.out_features(), codes);
  c10::cuda::OptionalCUDAGuard guard(at::device_of(grad));
  check_bf16_supported({grad.scalar_type(), codebooks.scalar_type(), scales.scalar_type()});
  const WeightRef w = make_weight(codes, codebooks, scales, d);
  const int64_t n = leading_rows(grad);
  const at::Tensor dx = tiled_gemm_t(grad.reshape({n, d.out_features()}).contiguous(), w);
  return dx.view(with_last_dim(grad, d.in_features()));
}

at::Tensor dropout_mask_cuda(const at::Tensor& input, double dropout_p, int64_t seed, int64_t offset) {
  // Only input's shape counts (any dtype, as on the CPU and in the fake kernel).
  const PlainAtenCalls plain;
  check_dropout(dropout_p);
  check_seed(seed, offset);
  c10::cuda::OptionalCUDAGuard guard(at::device_of(input));
  const at::Tensor mask = at::empty(input.sizes(), input.options().dtype(at::kBool));
  dropout_mask_fill(mask, dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  return mask;
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cuda(const at::Tensor& input, const at::Tensor& codes,
                                                     const at::Tensor& codebooks, const at::Tensor& scales,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                     const at::Tensor& lora_B,
                                                     const c10::optional<at::Tensor>& lora_bias, double scaling,
                                                     double dropout_p, int64_t seed, int64_t offset) {
  const PlainAtenCalls plain;
  const AqlmDims d =
      check_lora_forward(input, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling, dropout_p,
                         seed, offset).d;
  c10::cuda::OptionalCUDAGuard guard(at::device_of(input));
  check_bf16_supported({input.scalar_type(), codebooks.scalar_type(), scales.scalar_type(), dtype_or_float(bias),
                        lora_A.scalar_type(), lora_B.scalar_type(), dtype_or_float(lora_bias)});
  const WeightRef w = make_weight(codes, codebooks, scales, d);
  const LoraArgs lora{lora_A, lora_B, scaling, dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  return forward_impl(input, w, bias, lora_bias, &lora);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& xa, const at::Tensor& codes,
    const at::Tensor& codebooks, const at::Tensor& scales, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout_p, int64_t seed, int64_t offset, bool input_grad) {
  const PlainAtenCalls plain;
  const LoraCall call = check_lora_backward(grad, input, xa, codes, codebooks, scales, lora_A, lora_B, scaling,
                                                 dropout_p, seed, offset);
  const AqlmDims& d = call.d;
  const int64_t in = d.in_features(), out = d.out_features();
  const int64_t n = call.n, r = call.r;
  c10::cuda::OptionalCUDAGuard guard(at::device_of(input));
  check_bf16_supported({grad.scalar_type(), input.scalar_type(), xa.scalar_type(), codebooks.scalar_type(),
                        scales.scalar_type(), lora_A.scalar_type(), lora_B.scalar_type()});
  const uint64_t seed_u = static_cast<uint64_t>(seed), offset_u = static_cast<uint64_t>(offset);

  const at::ScalarType dt = input.scalar_type();
  const at::ScalarType ldt = lora_dtype(dt, lora_A.scalar_type());
  const at::Tensor g = grad.reshape({n, out});
  const at::Tensor x = input.reshape({n, in}).contiguous();
  const at::Tensor gl = g.to(ldt);
  const at::Tensor a = lora_A.to(ldt);
  const at::Tensor b = lora_B.to(ldt);

  const at::Tensor gb = at::mm(gl, b);  // [N, r] = g B
  at::Tensor grad_B = at::mm(gl.t(), xa.to(ldt));
  grad_B.mul_(scaling);
  at::Tensor grad_A = at::mm(gb.t(), dropout_copy(x, ldt, dropout_p, seed_u, offset_u));
  grad_A.mul_(scaling);

  at::Tensor grad_input;
  if (input_grad) {
    const WeightRef w = make_weight(codes, codebooks, scales, d);
    at::Tensor dx = tiled_gemm_t(g.to(dt).contiguous(), w);  // g W
    if (n > 0 && in > 0 && r > 0) {
      if (dropout_p == 0.0 && ldt == dt) {
        dx.addmm_(gb, a, /*beta=*/1.0, /*alpha=*/scaling);
      } else {
        const at::Tensor t = at::mm(gb, a).contiguous();  // [N, in] = (g B) A
        if (dropout_p > 0.0) dropout_scale_inplace(t, dropout_p, seed_u, offset_u);
        dx.add_(t, scaling);
      }
    }
    grad_input = dx.view(input.sizes());
  } else {
    grad_input = at::empty({0}, input.options());
  }
  return std::make_tuple(grad_input, grad_A.to(lora_A.scalar_type()), grad_B.to(lora_B.scalar_type()));
}

// Many adapters in one batch: the base x W^T once (forward_impl: decode GEMV or tiled cuBLAS, in the
// input's dtype), then the per-row LoRA, row_scale and bias in the accumulation type. indices outside
// [-1, K) are not checked here (that would need a device sync): the kernels' device-side assert fails
// the call, and the CUDA context with it, as torch's own out-of-range indexing does.
at::Tensor lora_mixed_forward_cuda(const at::Tensor& input, const at::Tensor& codes, const at::Tensor& codebooks,
                                   const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& lora_A, const at::Tensor& lora_B_t,
                                   const c10::optional<at::Tensor>& lora_bias, const at::Tensor& scalings,
                                   const c10::optional<at::Tensor>& row_scale, const at::Tensor& indices) {
  const PlainAtenCalls plain;
  const MixedLoraCall call = check_lora_mixed_forward(input, codes, codebooks, scales, bias, lora_A, lora_B_t,
                                                      lora_bias, scalings, row_scale, indices);
  const AqlmDims& d = call.d;
  c10::cuda::OptionalCUDAGuard guard(at::device_of(input));
  check_bf16_supported({input.scalar_type(), codebooks.scalar_type(), scales.scalar_type(), dtype_or_float(bias),
                        lora_A.scalar_type(), lora_B_t.scalar_type(), dtype_or_float(lora_bias),
                        scalings.scalar_type(), dtype_or_float(row_scale)});
  const WeightRef w = make_weight(codes, codebooks, scales, d);
  const int64_t n = call.n, in = d.in_features(), out = d.out_features();
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const at::Tensor base = std::get<0>(forward_impl(input, w, c10::nullopt, c10::nullopt, nullptr));
  const at::Tensor y = base.reshape({n, out}).to(acc).contiguous();
  auto acc_copy = [&](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
  };
  mixed_lora_apply(input.reshape({n, in}).to(acc).contiguous(), indices.contiguous(), lora_A.to(acc).contiguous(),
                   lora_B_t.to(acc).contiguous(), acc_copy(lora_bias), scalings.to(acc).contiguous(),
                   acc_copy(row_scale), acc_copy(bias), y);
  return y.to(input.scalar_type()).view(with_last_dim(input, out));
}

}  // namespace
}  // namespace cuda
}  // namespace aqlm_lora

TORCH_LIBRARY_IMPL(aqlm_lora, CUDA, m) {
  m.impl("dequantize", &aqlm_lora::cuda::dequantize_cuda);
  m.impl("aqlm_gemm", &aqlm_lora::cuda::aqlm_gemm_cuda);
  m.impl("aqlm_gemm_t", &aqlm_lora::cuda::aqlm_gemm_t_cuda);
  m.impl("dropout_mask", &aqlm_lora::cuda::dropout_mask_cuda);
  m.impl("lora_forward", &aqlm_lora::cuda::lora_forward_cuda);
  m.impl("lora_backward", &aqlm_lora::cuda::lora_backward_cuda);
  m.impl("lora_mixed_forward", &aqlm_lora::cuda::lora_mixed_forward_cuda);
}
