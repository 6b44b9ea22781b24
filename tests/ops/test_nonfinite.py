"""Inf and NaN in the activations and scales, and huge finite activations, propagate exactly as
``F.linear`` on the dequantized weight propagates them, on every path (few-token lookup/gather
kernels and the GEMM path alike)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aqlm_lora import ops
from aqlm_lora import reference as ref
from tests.support.weights import SCHEME_IDS, SCHEMES, devices, random_weight

ROWS = [*range(1, 17), 300]


def _same_specials(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN positions differ"
    assert torch.equal(actual == float("inf"), expected == float("inf")), "+Inf positions differ"
    assert torch.equal(actual == -float("inf"), expected == -float("inf")), "-Inf positions differ"


def _poisoned(rows: int, features: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(rows, features, dtype=dtype)
    x[0, 3] = float("inf")
    x[rows // 2, 5] = -float("inf")
    x[-1, 7] = float("nan") if rows > 2 else x[-1, 7]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS, ids=[f"N{n}" for n in ROWS])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_aqlm_gemm_propagates_like_f_linear(scheme, rows, dtype):
    w = random_weight(scheme, 32, 64, dtype)
    x = _poisoned(rows, w.in_features, dtype)
    expected = F.linear(x.float(), ref.dequantize(*w.args()).float())
    actual = ops.aqlm_gemm(x, *w.args(), None).float()
    _same_specials(actual, expected)
    if dtype == torch.float32:  # the finite values (low precision: covered by test_ops' tolerance rule)
        finite = expected.isfinite()
        torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 4, 8, 9, 300], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=SCHEME_IDS[:2])
def test_lora_forward_propagates_like_reference(scheme, rows):
    w = random_weight(scheme, 32, 64)
    x = _poisoned(rows, w.in_features, torch.float32)
    lora_A, lora_B = torch.randn(4, w.in_features), torch.randn(w.out_features, 4)
    args = (*w.args(), None, lora_A, lora_B, None, 0.5, 0.0, 0, 0)
    out, xa = ops.lora_forward(x, *args)
    out_ref, xa_ref = ref.lora_forward(x, *args)
    _same_specials(out, out_ref)
    _same_specials(xa, xa_ref)


def test_row_does_not_depend_on_batch_size():
    """A row holding +Inf gives the same specials alone and inside batches on either path."""
    w = random_weight(SCHEMES[1], 32, 64)
    x = _poisoned(12, w.in_features, torch.float32)
    alone = ops.aqlm_gemm(x[:1], *w.args(), None)
    for rows in (2, 8, 9, 12):
        _same_specials(ops.aqlm_gemm(x[:rows], *w.args(), None)[:1], alone)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rows", [1, 2, 8, 9, 300], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_non_finite_scales_propagate_like_f_linear(scheme, rows, device):
    """An infinite scale makes its rows of W +-inf (NaN where the codebooks sum to 0): F.linear
    gives NaN or +-inf by the signs; scaling the finished dot product would give +-inf."""
    w = random_weight(scheme, 32, 64)
    scales = w.scales.clone()
    scales[0], scales[1], scales[2] = float("inf"), -float("inf"), float("nan")
    x = torch.randn(rows, w.in_features)
    x[0] = x[0].abs() + 0.5  # an all-positive row: +-inf where a row of W has one sign
    args = (w.codes, w.codebooks, scales)
    expected = F.linear(x.double(), ref.dequantize(*args).double())
    actual = ops.aqlm_gemm(x.to(device), *(t.to(device) for t in args), None).cpu()
    _same_specials(actual, expected)
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite].double(), expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 8, 9], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("shape", [(1, 4), (2, 8)], ids=["og1-ig4", "og2-ig8"])
def test_huge_finite_inputs_do_not_overflow_partials(shape, rows):
    """Codebooks that cancel exactly (W = 0) against x = 3e38: x @ W^T is 0; per-codebook partials
    x . codebook (the lookup-table kernels) would overflow to inf - inf = NaN."""
    out_group, in_group = shape
    codes = torch.zeros(2, 1, 2, dtype=torch.int8)
    codebooks = torch.zeros(2, 256, out_group, in_group)
    codebooks[0, 0], codebooks[1, 0] = 1.0, -1.0
    scales = torch.ones(2, 1, 1, 1)
    x = torch.full((rows, in_group), 3.0e38)
    assert torch.equal(ops.aqlm_gemm(x, codes, codebooks, scales, None), torch.zeros(rows, 2 * out_group))
