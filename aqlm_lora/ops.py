"""Typed wrappers over ``torch.ops.aqlm_lora.*``, their fake kernels, and autograd.

Shapes: ``codes [O, I, C]`` (int8/int16, value mod 2**nbits), ``codebooks [C, 2**nbits, og, ig]``,
``scales [O, 1, 1, 1]``, ``out_features = O * og``, ``in_features = I * ig``; ``lora_A [r, in]``,
``lora_B [out, r]``. Inputs may have any leading dims (``N`` = their product, 0 allowed) and any
strides. Every op accumulates in float32 (float64 when the input is float64); outputs take the
dtype of the input they derive from (activations: ``input``; ``xa``, ``grad_A``: ``lora_A``;
``grad_B``: ``lora_B``; ``dequantize``: ``codebooks``).

Dropout uses Philox4x32-10 keyed by ``seed`` with counter ``(index // 4, offset)`` where ``index``
is the element's row-major position in ``input``; the mask is the same on every backend and is
regenerated in the backward instead of being stored.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import (
    _C,  # noqa: F401  (loading the extension registers the ops)
    checks,
)


def refuse_forward_ad(op: str, *tensors: Optional[Tensor]) -> None:
    """Forward-mode AD (``torch.func.jvp``/``jacfwd``, ``torch.autograd.forward_ad``) through a
    ``torch.library`` op gets zero or None tangents from torch, silently (no forward rule can be
    registered for one): refuse it here, where every call of the library passes."""
    if torch.compiler.is_compiling() or forward_ad._current_level < 0:  # no dual level: the common case
        return
    if any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"aqlm_lora.{op}: forward-mode AD (torch.func.jvp/jacfwd, torch.autograd.forward_ad) is not "
            "supported; torch would drop the tangent silently. Use reverse mode (backward, torch.autograd.grad)."
        )


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """Dense ``[out, in]`` weight, in the codebooks' dtype."""
    refuse_forward_ad("dequantize", codebooks, scales)
    return torch.ops.aqlm_lora.dequantize.default(codes, codebooks, scales)


def aqlm_gemm(input: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``input @ W^T + bias``: ``[..., in] -> [..., out]`` (differentiable w.r.t. input and bias)."""
    refuse_forward_ad("aqlm_gemm", input, codebooks, scales, bias)
    return torch.ops.aqlm_lora.aqlm_gemm.default(input, codes, codebooks, scales, bias)


def aqlm_gemm_t(grad: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """``grad @ W``: ``[..., out] -> [..., in]``, the input gradient of the base layer."""
    refuse_forward_ad("aqlm_gemm_t", grad, codebooks, scales)
    return torch.ops.aqlm_lora.aqlm_gemm_t.default(grad, codes, codebooks, scales)


def dropout_mask(input: Tensor, dropout_p: float, seed: int, offset: int = 0) -> Tensor:
    """Boolean keep-mask shaped like ``input`` that ``lora_forward`` uses for this seed/offset."""
    checks.check_seed(seed, offset)
    return torch.ops.aqlm_lora.dropout_mask.default(input, dropout_p, seed, offset)


def lora_forward(
    input: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    lora_bias: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor]:
    """Fused ``input @ W^T + bias + s * (dropout(input) @ A^T) @ B^T + s * lora_bias``.

    Returns ``(out [..., out], xa [N, r])`` with ``xa = dropout(input) @ A^T`` (kept for backward).
    """
    checks.check_seed(seed, offset)  # values past int64 never reach the op's own check
    refuse_forward_ad("lora_forward", input, codebooks, scales, bias, lora_A, lora_B, lora_bias)
    return torch.ops.aqlm_lora.lora_forward.default(
        input, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed, offset
    )


def lora_backward(
    grad: Tensor,
    input: Tensor,
    xa: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    offset: int,
    input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_input, grad_A, grad_B)`` of :func:`lora_forward`; ``grad_input`` is an empty
    ``[0]`` tensor when ``input_grad`` is False (the base matmul is then skipped)."""
    checks.check_seed(seed, offset)
    refuse_forward_ad("lora_backward", grad, input, xa, codebooks, scales, lora_A, lora_B)
    return torch.ops.aqlm_lora.lora_backward.default(
        grad, input, xa, codes, codebooks, scales, lora_A, lora_B, scaling, dropout_p, seed, offset, input_grad
    )


def lora_mixed_forward(
    input: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B_t: Tensor,
    lora_bias: Optional[Tensor],
    scalings: Tensor,
    row_scale: Optional[Tensor],
    indices: Tensor,
) -> Tensor:
    """Many adapters in one batch: the base ``input @ W^T`` once, then each row's own LoRA.

    ``out[n] = row_scale[a] * (x W^T + scalings[a] * ((x lora_A[a]^T) lora_B_t[a] + lora_bias[a])) + bias``
    with ``a = indices[n]`` (int64, one per row of ``input``), and ``x W^T + bias`` where
    ``a = -1``. ``lora_A [K, r, in]``, ``lora_B_t [K, r, out]`` (each adapter's ``lora_B``
    transposed; smaller ranks zero-padded to ``r``), ``scalings [K]``, ``lora_bias`` and
    ``row_scale [K, out]`` optional (``row_scale``: DoRA's ``m / ||W + s B A||``, ones for plain
    adapters). No dropout. Differentiable w.r.t. input, bias, lora_A, lora_B_t, lora_bias, scalings
    and row_scale.
    """
    refuse_forward_ad(
        "lora_mixed_forward", input, codebooks, scales, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale
    )
    return torch.ops.aqlm_lora.lora_mixed_forward.default(
        input, codes, codebooks, scales, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices
    )


# ---------------------------------------------------------------------------------------------
# Fake kernels: the C++ argument checks (same messages, see checks.py), then shapes and dtypes,
# for torch.compile / FakeTensor tracing and meta tensors. Outputs are contiguous, like the kernels'.


@torch.library.register_fake("aqlm_lora::dequantize")
def _dequantize_fake(codes, codebooks, scales):
    checks.check_weight(codes, codebooks, scales)
    return codebooks.new_empty((checks.out_features(codes, codebooks), checks.in_features(codes, codebooks)))


@torch.library.register_fake("aqlm_lora::aqlm_gemm")
def _aqlm_gemm_fake(input, codes, codebooks, scales, bias):
    checks.check_weight(codes, codebooks, scales)
    checks.check_rows(input, "input", checks.in_features(codes, codebooks), codes)
    checks.check_vector(bias, "bias", checks.out_features(codes, codebooks), codes)
    return input.new_empty((*input.shape[:-1], checks.out_features(codes, codebooks)))


@torch.library.register_fake("aqlm_lora::aqlm_gemm_t")
def _aqlm_gemm_t_fake(grad, codes, codebooks, scales):
    checks.check_weight(codes, codebooks, scales)
    checks.check_rows(grad, "grad", checks.out_features(codes, codebooks), codes)
    return grad.new_empty((*grad.shape[:-1], checks.in_features(codes, codebooks)))


@torch.library.register_fake("aqlm_lora::dropout_mask")
def _dropout_mask_fake(input, dropout_p, seed, offset):
    checks.check_dropout(dropout_p)
    checks.check_seed(seed, offset)
    return input.new_empty(input.shape, dtype=torch.bool)


@torch.library.register_fake("aqlm_lora::lora_forward")
def _lora_forward_fake(
    input, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed, offset
):
    n, r = checks.check_lora_forward(
        input, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed, offset
    )
    out = input.new_empty((*input.shape[:-1], lora_B.shape[0]))
    return out, lora_A.new_empty((n, r))


@torch.library.register_fake("aqlm_lora::lora_backward")
def _lora_backward_fake(
    grad, input, xa, codes, codebooks, scales, lora_A, lora_B, scaling, dropout_p, seed, offset, input_grad
):
    checks.check_lora_backward(
        grad, input, xa, codes, codebooks, scales, lora_A, lora_B, scaling, dropout_p, seed, offset
    )
    grad_input = input.new_empty(input.shape) if input_grad else input.new_empty((0,))
    return grad_input, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


@torch.library.register_fake("aqlm_lora::lora_mixed_forward")
def _lora_mixed_forward_fake(
    input, codes, codebooks, scales, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices
):
    checks.check_lora_mixed_forward(
        input, codes, codebooks, scales, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices
    )
    return input.new_empty((*input.shape[:-1], lora_B_t.shape[2]))


# ---------------------------------------------------------------------------------------------
# Autograd, made of the ops above. Codebooks, scales and codes are frozen: a call that would need
# their gradient is refused (refuse_weight_grad).


def _sum_rows(grad: Tensor, scale: float = 1.0) -> Tensor:
    """Bias gradients: summed over rows in float32 (float64 for float64), as the kernels
    accumulate; summing in fp16 overflows at a few thousand rows, bf16 loses digits."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    total = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=acc)
    return total if scale == 1.0 else total * scale


def _refuse_double_backward(op: str, *tensors: Optional[Tensor]) -> None:
    """Second-order gradients of the fused ops are not implemented: refuse instead of letting
    autograd hand back a silent None (create_graph=True runs the backward with grad mode on)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise NotImplementedError(
            f"aqlm_lora: double backward (create_graph=True, second-order gradients) through {op} is not "
            "supported; compute first-order gradients only, or use a dense copy of the layer for this"
        )


def refuse_weight_grad(codebooks: Tensor, scales: Tensor) -> None:
    """Gradients to the frozen codebooks and scales are not computed: refuse a call that asks for
    them rather than hand back a silent None (setup_context runs only when autograd records)."""
    if codebooks.requires_grad or scales.requires_grad:
        raise ValueError(
            "aqlm_lora: gradients w.r.t. codebooks or scales are not supported; freeze them with "
            "requires_grad_(False) (PEFT does this for base layers)"
        )


def _aqlm_gemm_setup(ctx, inputs, output):
    _, codes, codebooks, scales, bias = inputs
    refuse_weight_grad(codebooks, scales)
    ctx.save_for_backward(codes, codebooks, scales, bias)


def _aqlm_gemm_backward(ctx, grad):
    codes, codebooks, scales, bias = ctx.saved_tensors
    grad_input = aqlm_gemm_t(grad, codes, codebooks, scales) if ctx.needs_input_grad[0] else None
    grad_bias = _sum_rows(grad).to(bias.dtype) if bias is not None and ctx.needs_input_grad[4] else None
    return grad_input, None, None, None, grad_bias


torch.library.register_autograd("aqlm_lora::aqlm_gemm", _aqlm_gemm_backward, setup_context=_aqlm_gemm_setup)


# aqlm_gemm_t is linear in grad with the transposed matrix, so its backward is aqlm_gemm: this
# makes second-order gradients of the base layer (create_graph=True) exact.
def _aqlm_gemm_t_setup(ctx, inputs, output):
    _, codes, codebooks, scales = inputs
    refuse_weight_grad(codebooks, scales)
    ctx.save_for_backward(codes, codebooks, scales)


def _aqlm_gemm_t_backward(ctx, grad):
    codes, codebooks, scales = ctx.saved_tensors
    return aqlm_gemm(grad, codes, codebooks, scales, None), None, None, None


torch.library.register_autograd("aqlm_lora::aqlm_gemm_t", _aqlm_gemm_t_backward, setup_context=_aqlm_gemm_t_setup)


def _lora_forward_setup(ctx, inputs, output):
    input, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed, offset = inputs
    refuse_weight_grad(codebooks, scales)
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(input, xa, codes, codebooks, scales, lora_A, lora_B)
    ctx.has_bias = bias is not None
    ctx.has_lora_bias = lora_bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.lora_bias_dtype = lora_bias.dtype if lora_bias is not None else None
    ctx.params = (scaling, dropout_p, seed, offset)


def _lora_forward_backward(ctx, grad, grad_xa):
    input, xa, codes, codebooks, scales, lora_A, lora_B = ctx.saved_tensors
    scaling, dropout_p, seed, offset = ctx.params
    needs = ctx.needs_input_grad
    _refuse_double_backward("lora_forward", grad, input, lora_A, lora_B)
    grad_input, grad_A, grad_B = lora_backward(
        grad, input, xa, codes, codebooks, scales, lora_A, lora_B, scaling, dropout_p, seed, offset, needs[0]
    )
    grad_bias = _sum_rows(grad).to(ctx.bias_dtype) if ctx.has_bias and needs[4] else None
    grad_lora_bias = _sum_rows(grad, scaling).to(ctx.lora_bias_dtype) if ctx.has_lora_bias and needs[7] else None
    return (
        grad_input if needs[0] else None,
        None,
        None,
        None,
        grad_bias,
        grad_A if needs[5] else None,
        grad_B if needs[6] else None,
        grad_lora_bias,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("aqlm_lora::lora_forward", _lora_forward_backward, setup_context=_lora_forward_setup)


# lora_mixed_forward: the backward is composed of aqlm_gemm_t (one pass over the codes for all
# rows) and matmuls against all K adapters' stacks at once, each row's own adapter picked by a
# one-hot [N, K] mask (no data-dependent shapes, so it traces under torch.compile). The LoRA part
# then costs K times one adapter's: training with adapter_names is rare; this is correct, not fused.
def _lora_mixed_forward_setup(ctx, inputs, output):
    input, codes, codebooks, scales, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices = inputs
    refuse_weight_grad(codebooks, scales)
    ctx.save_for_backward(input, codes, codebooks, scales, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _lora_mixed_forward_backward(ctx, grad):
    input, codes, codebooks, scales, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices = ctx.saved_tensors
    needs = ctx.needs_input_grad
    _refuse_double_backward("lora_mixed_forward", grad, input, lora_A, lora_B_t, lora_bias, scalings, row_scale)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    k, r, n_in = lora_A.shape
    n_out = lora_B_t.shape[2]
    g = grad.reshape(-1, n_out).to(acc)
    x = input.reshape(-1, n_in).to(acc)
    n = x.shape[0]
    onehot = (indices.unsqueeze(1) == torch.arange(k, device=indices.device)).to(acc)  # [N, K], base rows 0
    weight = onehot * scalings.detach().to(acc)  # [N, K]: the row's scaling in its adapter's column
    stack_A = lora_A.to(acc).reshape(k * r, n_in)
    stack_B_t = lora_B_t.to(acc).reshape(k * r, n_out)
    if row_scale is not None:  # the gradient of the pre-scale output (base rows: unscaled)
        ge = g * (onehot @ row_scale.to(acc) + (1.0 - onehot.sum(1, keepdim=True)))
    else:
        ge = g

    def own(t: Tensor) -> Tensor:  # [N, K*r] against every adapter -> [N, r] against the row's own
        return (t.view(n, k, r) * onehot.unsqueeze(2)).sum(1)

    def spread(t: Tensor, w: Tensor) -> Tensor:  # [N, r] -> [N, K*r], zero outside the row's adapter, times w
        return (w.unsqueeze(2) * t.unsqueeze(1)).reshape(n, k * r)

    xa = own(x @ stack_A.T)  # [N, r]
    gb = own(ge @ stack_B_t.T)  # [N, r]
    grad_input = grad_A = grad_B_t = grad_lora_bias = grad_scalings = grad_row_scale = grad_bias = None
    if needs[0]:
        grad_input = aqlm_gemm_t(ge, codes, codebooks, scales) + spread(gb, weight) @ stack_A
        grad_input = grad_input.to(input.dtype).reshape(input.shape)
    if needs[5]:
        grad_A = (spread(gb, weight).T @ x).reshape(lora_A.shape).to(lora_A.dtype)
    if needs[6]:
        grad_B_t = (spread(xa, weight).T @ ge).reshape(lora_B_t.shape).to(lora_B_t.dtype)
    if lora_bias is not None and needs[7]:
        grad_lora_bias = (weight.T @ ge).to(lora_bias.dtype)
    if needs[8]:  # d out[n] / d scalings[a] = row_scale[a] * (x A[a]^T B_t[a] + lora_bias[a]), rows of a
        lora_out = spread(xa, onehot) @ stack_B_t
        if lora_bias is not None:
            lora_out = lora_out + onehot @ lora_bias.to(acc)
        grad_scalings = (onehot.T @ (ge * lora_out).sum(1)).to(scalings.dtype)
    if row_scale is not None and needs[9]:  # d out / d row_scale = the pre-scale output, recomputed
        pre = aqlm_gemm(x, codes, codebooks, scales, None).to(acc) + spread(xa, weight) @ stack_B_t
        if lora_bias is not None:
            pre = pre + weight @ lora_bias.to(acc)
        grad_row_scale = (onehot.T @ (g * pre)).to(row_scale.dtype)
    if ctx.bias_dtype is not None and needs[4]:
        grad_bias = _sum_rows(grad).to(ctx.bias_dtype)
    grads = (grad_A, grad_B_t, grad_lora_bias, grad_scalings, grad_row_scale)
    return grad_input, None, None, None, grad_bias, *grads, None


torch.library.register_autograd(
    "aqlm_lora::lora_mixed_forward", _lora_mixed_forward_backward, setup_context=_lora_mixed_forward_setup
)


# ---------------------------------------------------------------------------------------------
# Differentiable entry points.


# The differentiable entry points live in functional.py; these names stay here for callers of
# aqlm_lora.ops.aqlm_lora_linear (functional imports this module, so this import comes last).
from .functional import aqlm_linear, aqlm_lora_linear, aqlm_lora_mixed_linear, draw_seed  # noqa: E402,F401
