"""Pure-PyTorch math for every ``aqlm_lora`` op: the test oracle. Readable and slow on purpose.

All functions accumulate in float32 (float64 when the input is float64) and return the dtypes the
ops document in :mod:`aqlm_lora.ops`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def code_indices(codes: Tensor, codebook_size: int) -> Tensor:
    """Signed stored codes -> codebook row indices in [0, codebook_size) (``value mod 2**nbits``)."""
    return codes.long() % codebook_size


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """Dense ``[out, in]`` weight in the codebooks' dtype."""
    return dequantize_as(codes, codebooks, scales, compute_dtype(codebooks)).to(codebooks.dtype)


def dequantize_as(codes: Tensor, codebooks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    num_out_groups, num_in_groups, num_codebooks = codes.shape
    _, codebook_size, out_group, in_group = codebooks.shape
    idx = code_indices(codes, codebook_size)  # [O, I, C]
    cb = codebooks.to(dtype)
    book = torch.arange(num_codebooks, device=codes.device).expand_as(idx)
    parts = cb[book, idx]  # [O, I, C, og, ig]
    groups = parts.sum(dim=2) * scales.to(dtype).reshape(-1, 1, 1, 1)  # [O, I, og, ig]
    return groups.permute(0, 2, 1, 3).reshape(num_out_groups * out_group, num_in_groups * in_group)


def aqlm_gemm(input: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    acc = compute_dtype(input)
    weight = dequantize_as(codes, codebooks, scales, acc)
    out = input.to(acc) @ weight.T
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(input.dtype)


def aqlm_gemm_t(grad: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    acc = compute_dtype(grad)
    weight = dequantize_as(codes, codebooks, scales, acc)
    return (grad.to(acc) @ weight).to(grad.dtype)


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, in int64 without overflow."""
    lo_part = (a & 0xFFFF) * b  # < 2**48
    hi_part = (a >> 16) * b  # < 2**48
    mid = hi_part + (lo_part >> 16)
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)
    return hi & _MASK32, lo & _MASK32


def philox4x32_10(counter: int | Tensor, offset: int, seed: int) -> list[Tensor]:
    """Philox4x32-10 words for counters ``(counter, offset)`` and key ``seed`` (all 64-bit)."""
    if isinstance(counter, int) and counter >= 2**63:
        counter -= 2**64  # same 64 bits, as int64 (the masks below read them back unsigned)
    counter = torch.as_tensor(counter, dtype=torch.int64)
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.full_like(c0, offset & _MASK32)
    c3 = torch.full_like(c0, (offset >> 32) & _MASK32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def philox_uniform(numel: int, seed: int, offset: int, device: torch.device | str = "cpu") -> Tensor:
    """float32 uniforms in [0, 1) for element indices 0..numel-1 (24 random bits each)."""
    index = torch.arange(numel, dtype=torch.int64)
    words = torch.stack(philox4x32_10(index >> 2, offset, seed), dim=-1)  # [numel, 4]
    word = words.gather(1, (index & 3).unsqueeze(1)).squeeze(1)
    return ((word >> 8).to(torch.float32) * (1.0 / 16777216.0)).to(device)


def dropout_mask(input: Tensor, dropout_p: float, seed: int, offset: int) -> Tensor:
    """Keep-mask shaped like ``input``; element index = row-major position."""
    u = philox_uniform(input.numel(), seed, offset, input.device).reshape(input.shape)
    return u >= torch.tensor(dropout_p, dtype=torch.float32)


def dropout_scaled(x: Tensor, keep: Tensor, dropout_p: float) -> Tensor:
    """Inverted dropout: kept elements scaled by ``1 / (1 - p)``, dropped ones zero (the one Python
    copy of the formula; csrc/common/dropout.h is the C++ one)."""
    return x * keep.to(x.dtype) / (1.0 - dropout_p)


def apply_dropout(x: Tensor, dropout_p: float, seed: int, offset: int) -> Tensor:
    if dropout_p == 0.0:
        return x
    return dropout_scaled(x, dropout_mask(x, dropout_p, seed, offset), dropout_p)


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
    acc = compute_dtype(input)
    in_features = lora_A.shape[1]
    x = input.to(acc).reshape(-1, in_features)
    base = aqlm_gemm(x, codes, codebooks, scales, bias)
    xa = apply_dropout(x, dropout_p, seed, offset) @ lora_A.to(acc).T
    out = base + scaling * (xa @ lora_B.to(acc).T)
    if lora_bias is not None:
        out = out + scaling * lora_bias.to(acc)
    out_shape = (*input.shape[:-1], lora_B.shape[0])
    return out.to(input.dtype).reshape(out_shape), xa.to(lora_A.dtype)


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
    acc = compute_dtype(input)
    in_features = lora_A.shape[1]
    g = grad.to(acc).reshape(-1, lora_B.shape[0])
    x = input.to(acc).reshape(-1, in_features)
    gb = g @ lora_B.to(acc)  # [N, r]
    grad_B = scaling * (g.T @ xa.to(acc))
    grad_A = scaling * (gb.T @ apply_dropout(x, dropout_p, seed, offset))
    if input_grad:
        grad_input = aqlm_gemm_t(g, codes, codebooks, scales)
        grad_input = grad_input + scaling * apply_dropout(gb @ lora_A.to(acc), dropout_p, seed, offset)
        grad_input = grad_input.to(input.dtype).reshape(input.shape)
    else:
        grad_input = input.new_empty(0)
    return grad_input, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)


def lora_linear(
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
    seed: int = 0,
    offset: int = 0,
) -> Tensor:
    """Differentiable reference of :func:`aqlm_lora.ops.aqlm_lora_linear` (autograd through torch ops)."""
    args = (codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed, offset)
    out, _ = lora_forward(x, *args)
    return out


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
    """One adapter per row: ``out[n] = row_scale[a] * (x W^T + s[a] * ((x A[a]^T) B_t[a] + lora_bias[a])) + bias``
    with ``a = indices[n]``; ``a = -1``: ``x W^T + bias``. Row by row, differentiable."""
    acc = compute_dtype(input)
    n_in, n_out = lora_A.shape[2], lora_B_t.shape[2]
    x = input.to(acc).reshape(-1, n_in)
    base = aqlm_gemm(x, codes, codebooks, scales, None)
    rows = []
    for i in range(x.shape[0]):
        a = int(indices[i])
        y = base[i]
        if a >= 0:
            s = scalings[a].to(acc)
            lora = (x[i] @ lora_A[a].to(acc).T) @ lora_B_t[a].to(acc)
            if lora_bias is not None:
                lora = lora + lora_bias[a].to(acc)
            y = y + s * lora
            if row_scale is not None:
                y = y * row_scale[a].to(acc)
        if bias is not None:
            y = y + bias.to(acc)
        rows.append(y)
    out = torch.stack(rows) if rows else base
    return out.to(input.dtype).reshape(*input.shape[:-1], n_out)
