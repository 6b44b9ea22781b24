"""Every op against the reference over a wide grid of AQLM layouts, not only the common schemes:
in_group 1..64 (odd and over 16), out_group 1..4, nbits 1..16, 1..4 codebooks, on both sides of
every CPU kernel threshold (lookup table, codebook gather, blocked dequantize + GEMM).

float32 runs the vectorized kernels, float64 the portable ones; test_portable_kernels.py reruns
this file with the portable kernels forced for float32 too.
"""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import ops
from aqlm_lora import reference as ref
from tests.support.tolerances import assert_close_fp32
from tests.support.weights import Scheme, random_weight

IN_GROUPS = [1, 3, 4, 8, 16, 17, 32, 64]
OUT_GROUPS = [1, 2, 3, 4]


def _grid() -> list[Scheme]:
    schemes = []
    for k, (ig, og) in enumerate((ig, og) for ig in IN_GROUPS for og in OUT_GROUPS):
        # Large groups keep nbits small so a 2**nbits x og x ig codebook stays small.
        nbits = [1, 2, 5, 8, 12, 16][k % 6] if ig * og <= 16 else [1, 3, 6, 8][k % 4]
        schemes.append(Scheme(1 + k % 3, nbits, in_group_size=ig, out_group_size=og))
    schemes += [Scheme(2, nbits) for nbits in range(1, 17)]  # every nbits at the common 8-wide group
    schemes += [Scheme(4, 8, in_group_size=8, out_group_size=1), Scheme(8, 4, in_group_size=4, out_group_size=2)]
    return schemes


GRID = _grid()
ROWS = [1, 2, 3, 8, 9, 33]  # decode (LUT for N=1, gather / wide LUT for 2..8) and GEMM (> 8)


def _check(actual, expected, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    else:
        assert_close_fp32(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("scheme", GRID, ids=str)
def test_ops_match_reference(scheme, dtype):
    # 10 output groups: more than one 8-row tile; 5 input groups: odd, more than one chunk of 16.
    w = random_weight(scheme, 10 * scheme.out_group_size, 5 * scheme.in_group_size, dtype)
    _check(ops.dequantize(*w.args()), ref.dequantize(*w.args()), dtype)
    lora_A = torch.randn(3, w.in_features, dtype=dtype)
    lora_B = torch.randn(w.out_features, 3, dtype=dtype)
    lora_bias = torch.randn(w.out_features, dtype=dtype)
    for n in ROWS:
        x = torch.randn(n, w.in_features, dtype=dtype)
        g = torch.randn(n, w.out_features, dtype=dtype)
        _check(ops.aqlm_gemm(x, *w.args(), None), ref.aqlm_gemm(x, *w.args(), None), dtype)
        _check(ops.aqlm_gemm_t(g, *w.args()), ref.aqlm_gemm_t(g, *w.args()), dtype)
        args = (*w.args(), None, lora_A, lora_B, lora_bias, 0.5, 0.25, 11, 3)
        out, xa = ops.lora_forward(x, *args)
        out_ref, xa_ref = ref.lora_forward(x, *args)
        _check(out, out_ref, dtype)
        _check(xa, xa_ref, dtype)
        back = (*w.args(), lora_A, lora_B, 0.5, 0.25, 11, 3, True)
        for got, want in zip(ops.lora_backward(g, x, xa, *back), ref.lora_backward(g, x, xa_ref, *back)):
            _check(got, want, dtype)
