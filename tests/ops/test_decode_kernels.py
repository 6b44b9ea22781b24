"""Each row of the CPU kernel table (``choose_kernel`` in csrc/cpu/decode.cpp) against float64.

The shapes are picked to land on each branch: the codebook-gather kernel with its 64-bit code
words (8, 4 or 2 groups each) and their tails (in_groups not a multiple of the groups per word,
rows not a multiple of the row block), and the few-row batches whose lookup table would pass
8 MiB (in_features 11008, N >= 3), which gather codebook rows instead of falling back to
dequantize + GEMM. test_portable_kernels.py runs this file again with the portable kernels.
"""

from __future__ import annotations

import pytest
import torch

import aqlm_lora  # noqa: F401  (registers the ops)
from aqlm_lora.scheme import random_weight

CASES = [
    # scheme, out, in: in/8 = 17 groups (4-group words + a tail of 1), out 7 (row-block tail)
    ("2x8", 7, 136),
    ("1x16", 7, 136),
    ("1x8", 9, 64),
    # 8-bit schemes whose group codes divide a 64-bit word (1x8: 8 groups a word, 4x8: 2) and one
    # that does not (3x8); in/8 = 25 and 17 groups leave a tail after the last whole word
    ("1x8", 7, 200),
    ("4x8", 7, 136),
    ("3x8", 6, 72),
    ("2x4", 5, 40),
    ("1x12", 5, 40),
    # lookup table of N >= 3 rows over 8 MiB: 1376 groups * 2 * 256 * N * 4 bytes
    ("2x8", 5, 11008),
    ("1x8", 3, 11008),
    ("2x8g8o2", 6, 11008),
]
CODEBOOK_DTYPES = {"cb_fp32": torch.float32, "cb_fp16": torch.float16, "cb_bf16": torch.bfloat16}


def _relative_error(scheme: str, out: int, inn: int, n: int, cb_dtype: torch.dtype) -> float:
    w = random_weight(scheme, out, inn)
    codebooks = w.codebooks.to(cb_dtype)
    dense = torch.ops.aqlm_lora.dequantize(w.codes, codebooks.double(), w.scales.double())
    x = torch.randn(n, inn, generator=torch.Generator().manual_seed(n))
    y = torch.ops.aqlm_lora.aqlm_gemm(x, w.codes, codebooks, w.scales, None)
    ref = x.double() @ dense.T
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("cb_dtype", CODEBOOK_DTYPES.values(), ids=CODEBOOK_DTYPES.keys())
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("scheme,out,inn", CASES, ids=[f"{s}-{o}x{i}" for s, o, i in CASES])
def test_decode_matches_float64(scheme: str, out: int, inn: int, n: int, cb_dtype: torch.dtype) -> None:
    assert _relative_error(scheme, out, inn, n, cb_dtype) < 2e-5


@pytest.mark.parametrize("n", [1, 4, 8], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("scheme", ["2x8", "1x16", "1x8", "3x8", "4x8"])
def test_decode_same_bits_for_any_thread_count(scheme: str, n: int) -> None:
    w = random_weight(scheme, 203, 1032)
    x = torch.randn(n, 1032)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.aqlm_lora.aqlm_gemm(x, w.codes, w.codebooks, w.scales, None)
        torch.set_num_threads(2)
        two = torch.ops.aqlm_lora.aqlm_gemm(x, w.codes, w.codebooks, w.scales, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
