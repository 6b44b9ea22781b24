"""An independent float64 oracle of the AQLM + LoRA layer, written from the format definition.

It shares no code with ``aqlm_lora.reference`` (which it checks): numpy in float64 with explicit
loops over output groups and codebooks. Every quantity comes with its *magnitude*, the same sum
computed over absolute values of the terms (``sum |term|``), which scales the tolerance of each
element: an accumulation in precision ``u`` errs by at most ``~k * u * magnitude``.

Format (codes ``[O, I, C]`` int8/int16 stored signed, codebooks ``[C, 2**nbits, og, ig]``,
scales ``[O, 1, 1, 1]``)::

    W[o*og + a, i*ig + b] = scales[o] * sum_c codebooks[c, codes[o, i, c] mod 2**nbits, a, b]

Layer, with ``m`` the dropout keep-mask divided by ``1 - p`` (all ones without dropout)::

    xa = (m*x) A^T
    y  = x W^T + bias + s * xa B^T + s * lora_bias
    dx = g W + s * m * ((g B) A)       dA = s * (g B)^T (m*x)       dB = s * g^T xa
    dbias = sum_rows(g)                dlora_bias = s * sum_rows(g)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

# Every codebook size 2**nbits (nbits <= 16) divides this, so adding it to a stored signed code
# leaves the code's value mod 2**nbits unchanged and makes it non-negative.
_CODE_SHIFT = 1 << 16


def f64(t: Optional[Tensor]) -> Optional[np.ndarray]:
    """The exact values of a tensor of any float dtype, as a float64 array (None stays None)."""
    return None if t is None else t.detach().cpu().to(torch.float64).numpy()


@dataclass
class Value:
    """An exact float64 result and the magnitude of its terms (same shape)."""

    exact: np.ndarray
    mag: np.ndarray


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Value:
    """Dense ``W [O*og, I*ig]`` by the definition: one output group and one codebook at a time."""
    stored = codes.cpu().numpy().astype(np.int64)
    cb = f64(codebooks)
    s = f64(scales).reshape(-1)
    num_out_groups, num_in_groups, num_codebooks = stored.shape
    _, codebook_size, og, ig = cb.shape
    index = (stored + _CODE_SHIFT) % codebook_size
    w = np.zeros((num_out_groups * og, num_in_groups * ig))
    mag = np.zeros_like(w)
    for o in range(num_out_groups):
        rows = slice(o * og, (o + 1) * og)
        for c in range(num_codebooks):
            entries = cb[c, index[o, :, c]]  # [I, og, ig]: the entry each input group picks
            block = entries.transpose(1, 0, 2).reshape(og, num_in_groups * ig)  # [a, i*ig + b]
            w[rows] += block
            mag[rows] += np.abs(block)
        w[rows] *= s[o]
        mag[rows] *= abs(s[o])
    return Value(w, mag)


def dequantize_by_element(codes: Tensor, codebooks: Tensor, scales: Tensor) -> np.ndarray:
    """The same weight one element at a time (for tiny weights: checks :func:`dequantize` itself)."""
    stored = codes.cpu().numpy().astype(np.int64)
    cb = f64(codebooks)
    s = f64(scales).reshape(-1)
    num_out_groups, num_in_groups, num_codebooks = stored.shape
    _, codebook_size, og, ig = cb.shape
    w = np.zeros((num_out_groups * og, num_in_groups * ig))
    for o in range(num_out_groups):
        for i in range(num_in_groups):
            for a in range(og):
                for b in range(ig):
                    total = 0.0
                    for c in range(num_codebooks):
                        total += cb[c, int(stored[o, i, c]) % codebook_size, a, b]
                    w[o * og + a, i * ig + b] = s[o] * total
    return w


def _vector(v: Optional[Tensor], n: int) -> np.ndarray:
    return np.zeros(n) if v is None else f64(v)


@dataclass
class Forward:
    xd: np.ndarray  # m * x, [N, in]
    xa: Value  # [N, r]
    base: Value  # x W^T, [N, out]
    out: Value  # the whole layer, [N, out]


def forward(
    x: np.ndarray,
    w: Value,
    bias: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    lora_bias: Optional[Tensor],
    scaling: float,
    keep: Optional[np.ndarray],
    dropout_p: float,
) -> Forward:
    """The layer on rows ``x [N, in]``; ``keep`` is the boolean keep-mask ([N, in]) or None.

    Without lora_A/lora_B this is the base layer ``x W^T + bias``.
    """
    n, out = x.shape[0], w.exact.shape[0]
    b = _vector(bias, out)
    base = Value(x @ w.exact.T, np.abs(x) @ w.mag.T)
    if lora_A is None:
        return Forward(x, Value(np.zeros((n, 0)), np.zeros((n, 0))), base, Value(base.exact + b, base.mag + np.abs(b)))
    xd = x if keep is None else np.where(keep, x / (1.0 - dropout_p), 0.0)
    a, bb = f64(lora_A), f64(lora_B)
    xa = Value(xd @ a.T, np.abs(xd) @ np.abs(a).T)
    lb = scaling * _vector(lora_bias, out)
    lora = scaling * (xa.exact @ bb.T)
    lora_mag = abs(scaling) * (xa.mag @ np.abs(bb).T)
    y = base.exact + b + lora + lb
    mag = base.mag + np.abs(b) + lora_mag + np.abs(lb)
    return Forward(xd, xa, base, Value(y, mag))


@dataclass
class Backward:
    dx: Value  # [N, in]
    dA: Value  # [r, in]
    dB: Value  # [out, r]
    dbias: Value  # [out]
    dlora_bias: Value  # [out]


def backward(
    g: np.ndarray,
    fwd: Forward,
    w: Value,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    keep: Optional[np.ndarray],
    dropout_p: float,
    xa: Optional[np.ndarray] = None,
) -> Backward:
    """Gradients for the output gradient ``g [N, out]``; ``xa`` overrides the forward's exact xa
    (the lora_backward op takes it as an input)."""
    a, b = f64(lora_A), f64(lora_B)
    s = scaling
    xa_exact = fwd.xa.exact if xa is None else xa
    xa_mag = fwd.xa.mag if xa is None else np.abs(xa)
    gb = g @ b  # [N, r]
    gb_mag = np.abs(g) @ np.abs(b)
    lora_dx = gb @ a
    lora_dx_mag = gb_mag @ np.abs(a)
    if keep is not None:
        m = keep / (1.0 - dropout_p)
        lora_dx, lora_dx_mag = lora_dx * m, lora_dx_mag * m
    dx = Value(g @ w.exact + s * lora_dx, np.abs(g) @ w.mag + abs(s) * lora_dx_mag)
    da = Value(s * (gb.T @ fwd.xd), abs(s) * (gb_mag.T @ np.abs(fwd.xd)))
    db = Value(s * (g.T @ xa_exact), abs(s) * (np.abs(g).T @ xa_mag))
    col = g.sum(axis=0)
    col_mag = np.abs(g).sum(axis=0)
    return Backward(dx, da, db, Value(col, col_mag), Value(s * col, abs(s) * col_mag))


def base_backward(g: np.ndarray, w: Value) -> Value:
    """``g W`` (the input gradient of the base layer, the aqlm_gemm_t op)."""
    return Value(g @ w.exact, np.abs(g) @ w.mag)
