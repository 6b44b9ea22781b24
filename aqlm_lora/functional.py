"""The differentiable entry points: the base AQLM layer, and AQLM + LoRA fused in one call.

Built from the ops in :mod:`aqlm_lora.ops` (whose autograd formulas are registered there), plus the
LoRA term alone for the rare case of a second dropout probability in one layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .reference import dropout_scaled


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator (so ``torch.manual_seed`` fixes it).

    Under ``torch.compile`` the seed is drawn inside the graph as a symbolic integer (the ops take
    ``SymInt`` seeds); its range is declared here so that the ops' checks trace."""
    seed = torch.randint(0, 2**62, (), dtype=torch.int64).item()
    torch._check(seed >= 0)
    torch._check(seed < 2**62)
    return seed


def aqlm_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Differentiable base AQLM layer ``x @ W^T + bias`` (gradients to ``x`` and ``bias``)."""
    return ops.aqlm_gemm(x, codes, codebooks, scales, bias)


def aqlm_lora_linear(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    lora_bias: Optional[Tensor] = None,
    training: bool = True,
    seed: Optional[int] = None,
    offset: int = 0,
) -> Tensor:
    """AQLM layer plus LoRA in one fused, differentiable call.

    ``y = x W^T + bias + scaling * (dropout(x) A^T) B^T + scaling * lora_bias``. Dropout applies
    only when ``training`` and ``dropout_p > 0``; its seed is drawn with :func:`draw_seed` unless
    given. Gradients flow to ``x``, ``bias``, ``lora_A``, ``lora_B`` and ``lora_bias``; the backward
    saves only ``x`` and ``xa = dropout(x) A^T`` ([N, r]).
    """
    p = float(dropout_p) if training else 0.0
    if seed is None:
        seed = draw_seed() if p != 0.0 else 0
    out, _ = ops.lora_forward(
        x, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, float(scaling), p, seed, offset
    )
    return out


def aqlm_lora_mixed_linear(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B_t: Tensor,
    scalings: Tensor,
    indices: Tensor,
    lora_bias: Optional[Tensor] = None,
    row_scale: Optional[Tensor] = None,
) -> Tensor:
    """AQLM layer with one LoRA adapter per row (many adapters in one batch), one fused call.

    Row ``n`` of ``x`` (its leading dims flattened) uses adapter ``a = indices[n]`` of the stacks
    ``lora_A [K, r, in]``, ``lora_B_t [K, r, out]`` (``lora_B`` transposed, ranks zero-padded),
    ``scalings [K]``, ``lora_bias [K, out]``, ``row_scale [K, out]`` (DoRA), or no adapter for
    ``a = -1``: ``y = row_scale[a] * (x W^T + s[a] ((x A[a]^T) B_t[a] + lora_bias[a])) + bias``. The
    base matmul runs once for the whole batch. No dropout. Differentiable (see
    :func:`aqlm_lora.ops.lora_mixed_forward`).
    """
    return ops.lora_mixed_forward(
        x, codes, codebooks, scales, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices
    )


def lora_delta(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    lora_bias: Optional[Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
) -> Tensor:
    """The LoRA term alone, ``scaling * ((dropout(x) A^T) B^T + lora_bias)``, in ``lora_A``'s dtype.

    For adapters that cannot share the fused call (a second dropout probability in one layer
    while training). The mask is the ops' Philox mask; the matmuls are plain torch ones.
    """
    xd = x.to(lora_A.dtype)
    if dropout_p != 0.0:
        keep = ops.dropout_mask(x, dropout_p, draw_seed() if seed is None else seed, offset)
        xd = dropout_scaled(xd, keep, dropout_p)
    delta = (xd @ lora_A.T) @ lora_B.T
    if lora_bias is not None:
        delta = delta + lora_bias
    return delta * scaling
