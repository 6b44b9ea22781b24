"""Every op against the pure-PyTorch reference and aqlm's dequantizer + F.linear, over
scheme x dtype x shape x rows x bias x device."""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import ops
from aqlm_lora import reference as ref
from tests.support.oracles import aqlm_dense, plain_linear, plain_lora, upcast
from tests.support.tolerances import assert_close_fp32, assert_low_precision_ok
from tests.support.weights import (
    DTYPE_IDS,
    DTYPES,
    SCHEME_IDS,
    SCHEMES,
    devices,
    random_weight,
)

SHAPES = [(48, 80), (34, 48)]  # (out, in): not powers of two, divisible by every scheme's groups
SHAPE_IDS = [f"{o}x{i}" for o, i in SHAPES]
ROWS = [0, 1, 7, 300]

scheme_p = pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
dtype_p = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
shape_p = pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
rows_p = pytest.mark.parametrize("rows", ROWS, ids=[f"N{n}" for n in ROWS])
bias_p = pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
device_p = pytest.mark.parametrize("device", devices())


def check(actual, exact32, plain):
    """fp32: close to the reference; low precision: the 2x-plain-PyTorch rule."""
    if actual.dtype == torch.float32:
        assert_close_fp32(actual, exact32)
        assert_close_fp32(actual, plain, rtol=1e-4)
    else:
        assert_low_precision_ok(actual, plain, exact32)


@device_p
@dtype_p
@scheme_p
def test_dequantize(scheme, dtype, device):
    w = random_weight(scheme, 48, 80, dtype, device)
    codes_before = w.codes.clone()
    out = ops.dequantize(*w.args())
    assert out.dtype == dtype and out.shape == (48, 80)
    exact = ref.dequantize(w.codes, upcast(w.codebooks), upcast(w.scales))
    check(out, exact.to(out.device), aqlm_dense(*w.args()))
    assert torch.equal(w.codes, codes_before), "codes were mutated"


@device_p
@bias_p
@rows_p
@shape_p
@dtype_p
@scheme_p
def test_aqlm_gemm(scheme, dtype, shape, rows, bias, device):
    w = random_weight(scheme, *shape, dtype, device, bias=bias)
    x = torch.randn(rows, w.in_features, dtype=dtype, device=device)
    codes_before = w.codes.clone()
    out = ops.aqlm_gemm(x, *w.args(), w.bias)
    assert out.shape == (rows, w.out_features) and out.dtype == dtype
    exact = ref.aqlm_gemm(x.float(), w.codes, upcast(w.codebooks), upcast(w.scales), upcast(w.bias))
    check(out, exact, plain_linear(x, *w.args(), w.bias))
    assert torch.equal(w.codes, codes_before), "codes were mutated"


@device_p
@rows_p
@shape_p
@dtype_p
@scheme_p
def test_aqlm_gemm_t(scheme, dtype, shape, rows, device):
    w = random_weight(scheme, *shape, dtype, device)
    g = torch.randn(rows, w.out_features, dtype=dtype, device=device)
    out = ops.aqlm_gemm_t(g, *w.args())
    assert out.shape == (rows, w.in_features) and out.dtype == dtype
    exact = ref.aqlm_gemm_t(g.float(), w.codes, upcast(w.codebooks), upcast(w.scales))
    plain = g @ aqlm_dense(*w.args()).to(dtype)
    check(out, exact, plain)


@device_p
@pytest.mark.parametrize("leading", [(2, 3), (5,), (1, 1, 4)], ids=["2x3", "5", "1x1x4"])
@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=SCHEME_IDS[:2])
def test_leading_dims_and_strides(scheme, leading, device):
    """Inputs of any leading dims and non-contiguous inputs give the same rows as a 2-D call."""
    w = random_weight(scheme, 48, 80, torch.float32, device, bias=True)
    big = torch.randn(*leading, 2 * w.in_features, device=device)
    x = big[..., ::2]  # non-contiguous
    assert not x.is_contiguous()
    out = ops.aqlm_gemm(x, *w.args(), w.bias)
    flat = ops.aqlm_gemm(x.reshape(-1, w.in_features).contiguous(), *w.args(), w.bias)
    assert out.shape == (*leading, w.out_features)
    torch.testing.assert_close(out.reshape(-1, w.out_features), flat, rtol=0, atol=0)
    g = torch.randn(*leading, 2 * w.out_features, device=device)[..., 1::2]
    gt = ops.aqlm_gemm_t(g, *w.args())
    assert gt.shape == (*leading, w.in_features)
    assert_close_fp32(gt, ref.aqlm_gemm_t(g, *w.args()))


LORA_CASES = [(0.0, False), (0.25, True)]
LORA_IDS = ["nodrop", "drop0.25-lorabias"]


@device_p
@pytest.mark.parametrize("dropout_p,lora_bias", LORA_CASES, ids=LORA_IDS)
@rows_p
@dtype_p
@scheme_p
def test_lora_forward(scheme, dtype, rows, dropout_p, lora_bias, device):
    w = random_weight(scheme, 48, 80, dtype, device, bias=True)
    r, scaling, seed, offset = 4, 1.75, 1234, 7
    x = torch.randn(rows, w.in_features, dtype=dtype, device=device)
    lora_A = torch.randn(r, w.in_features, device=device) / 8
    lora_B = torch.randn(w.out_features, r, device=device) / 2
    lb = torch.randn(w.out_features, device=device) if lora_bias else None
    out, xa = ops.lora_forward(x, *w.args(), w.bias, lora_A, lora_B, lb, scaling, dropout_p, seed, offset)
    assert out.dtype == dtype and out.shape == (rows, w.out_features)
    assert xa.dtype == lora_A.dtype and xa.shape == (rows, r)
    exact, exact_xa = ref.lora_forward(
        x.float(), w.codes, upcast(w.codebooks), upcast(w.scales), upcast(w.bias),
        lora_A, lora_B, lb, scaling, dropout_p, seed, offset,
    )  # fmt: skip
    plain = plain_lora(x, *w.args(), w.bias, lora_A, lora_B, lb, scaling, dropout_p, seed, offset)
    check(out, exact, plain)
    assert_close_fp32(xa, exact_xa, rtol=1e-5 if dtype == torch.float32 else 1e-2)


def _plain_lora_grads(x, w, lora_A, lora_B, scaling, dropout_p, seed, offset, g):
    """Gradients of the unfused PEFT-style computation in x's dtype (autograd)."""
    x = x.detach().requires_grad_()
    a = lora_A.to(x.dtype).detach().requires_grad_()
    b = lora_B.to(x.dtype).detach().requires_grad_()
    out = plain_lora(x, *w.args(), None, a, b, None, scaling, dropout_p, seed, offset)
    out.backward(g)
    return x.grad, a.grad, b.grad


@device_p
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop0.25"])
@rows_p
@dtype_p
@scheme_p
def test_lora_backward(scheme, dtype, rows, dropout_p, device):
    w = random_weight(scheme, 48, 80, dtype, device)
    r, scaling, seed, offset = 4, 0.5, 99, 3
    x = torch.randn(rows, w.in_features, dtype=dtype, device=device)
    g = torch.randn(rows, w.out_features, dtype=dtype, device=device)
    lora_A = torch.randn(r, w.in_features, device=device) / 8
    lora_B = torch.randn(w.out_features, r, device=device) / 2
    _, xa = ops.lora_forward(x, *w.args(), None, lora_A, lora_B, None, scaling, dropout_p, seed, offset)
    dx, da, db = ops.lora_backward(g, x, xa, *w.args(), lora_A, lora_B, scaling, dropout_p, seed, offset, True)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert da.dtype == lora_A.dtype and db.dtype == lora_B.dtype
    ex, ea, eb = ref.lora_backward(
        g.float(), x.float(), xa, w.codes, upcast(w.codebooks), upcast(w.scales),
        lora_A, lora_B, scaling, dropout_p, seed, offset, True,
    )  # fmt: skip
    if dtype == torch.float32:
        for ours, exact in ((dx, ex), (da, ea), (db, eb)):
            assert_close_fp32(ours, exact)
    else:
        px, pa, pb = _plain_lora_grads(x, w, lora_A, lora_B, scaling, dropout_p, seed, offset, g)
        assert_low_precision_ok(dx, px, ex)
        assert_low_precision_ok(da.to(dtype), pa, ea)
        assert_low_precision_ok(db.to(dtype), pb, eb)
    skipped, da2, db2 = ops.lora_backward(g, x, xa, *w.args(), lora_A, lora_B, scaling, dropout_p, seed, offset, False)
    assert skipped.shape == (0,)
    torch.testing.assert_close(da2, da, rtol=0, atol=0)
    torch.testing.assert_close(db2, db, rtol=0, atol=0)
