"""Plain-PyTorch computations at the test's dtype, built on aqlm's own dequantizer (the
independent oracle), used as the 'plain PyTorch' baseline of the low-precision tolerance rule.

aqlm is imported on first use, so test modules that import these helpers still collect where aqlm
is missing; a test that calls them then skips (``pytest.importorskip``)."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from aqlm_lora import reference as ref


def aqlm_dense(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """aqlm's dequantized weight, computed in the codebooks' dtype."""
    aqlm_utils = pytest.importorskip(
        "aqlm.utils", reason="needs the 'aqlm' package (its dequantizer is the oracle), which is not installed"
    )
    nbits = codebooks.shape[1].bit_length() - 1
    return aqlm_utils._dequantize_weight(aqlm_utils.unpack_int_data(codes, nbits), codebooks, scales)


def plain_linear(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    w = aqlm_dense(codes, codebooks, scales).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def plain_lora(x, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling, p, seed, offset) -> Tensor:
    """PEFT-style unfused forward in x's dtype (dropout mask from the reference generator)."""
    base = plain_linear(x, codes, codebooks, scales, bias)
    xd = ref.apply_dropout(x.reshape(-1, x.shape[-1]), p, seed, offset).reshape(x.shape)
    out = base + F.linear(F.linear(xd, lora_A.to(x.dtype)), lora_B.to(x.dtype)) * scaling
    if lora_bias is not None:
        out = out + lora_bias.to(x.dtype) * scaling
    return out


def upcast(t: Optional[Tensor], dtype: torch.dtype = torch.float32) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)
