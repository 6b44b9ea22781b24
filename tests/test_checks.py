"""Bad input gets a clear error naming the argument, the expected and the actual value."""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import ops
from tests.helpers import SCHEMES, make_weight


@pytest.fixture
def w():
    return make_weight(SCHEMES[1], 16, 32, bias=True)


def lora(w, r=4):
    return torch.randn(r, w.in_features), torch.randn(w.out_features, r)


def test_codes_dtype(w):
    with pytest.raises(RuntimeError, match="codes must be int8 or int16, got Float"):
        ops.aqlm_gemm(torch.randn(2, 32), w.codes.float(), w.codebooks, w.scales, None)


def test_codes_rank(w):
    with pytest.raises(RuntimeError, match=r"codes must be 3-D .* got shape \[16, 8\]"):
        ops.dequantize(w.codes.reshape(16, 8), w.codebooks, w.scales)


def test_codebooks_rank(w):
    with pytest.raises(RuntimeError, match="codebooks must be 4-D"):
        ops.dequantize(w.codes, w.codebooks[0], w.scales)


def test_codebook_count_mismatch(w):
    with pytest.raises(RuntimeError, match=r"codebooks.shape\[0\] must equal codes.shape\[2\] = 2 .* got 1"):
        ops.dequantize(w.codes, w.codebooks[:1], w.scales)


def test_codebook_size_not_power_of_two(w):
    with pytest.raises(RuntimeError, match=r"codebooks.shape\[1\] must be 2\*\*nbits .* got 200"):
        ops.dequantize(w.codes, w.codebooks[:, :200], w.scales)


def test_int8_codes_for_16_bit_codebooks():
    w16 = make_weight(SCHEMES[0], 16, 32)
    with pytest.raises(RuntimeError, match="hold at most 8 bits, but codebooks have 2\\*\\*16 entries"):
        ops.dequantize(w16.codes.to(torch.int8), w16.codebooks, w16.scales)


def test_scales_shape(w):
    with pytest.raises(RuntimeError, match=r"scales must have shape \[16, 1, 1, 1\] .* got \[8, 1, 1, 1\]"):
        ops.dequantize(w.codes, w.codebooks, w.scales[:8])


def test_codebooks_dtype(w):
    with pytest.raises(RuntimeError, match="codebooks must be float32, float16, bfloat16 or float64, got Int"):
        ops.dequantize(w.codes, w.codebooks.int(), w.scales)


def test_input_features(w):
    with pytest.raises(RuntimeError, match=r"input must have last dimension 32, got shape \[2, 31\]"):
        ops.aqlm_gemm(torch.randn(2, 31), *w.args(), None)


def test_input_dtype(w):
    with pytest.raises(RuntimeError, match="input must be float32, float16, bfloat16 or float64, got Long"):
        ops.aqlm_gemm(torch.ones(2, 32, dtype=torch.long), *w.args(), None)


def test_grad_features(w):
    with pytest.raises(RuntimeError, match=r"grad must have last dimension 16, got shape \[2, 32\]"):
        ops.aqlm_gemm_t(torch.randn(2, 32), *w.args())


def test_bias_shape(w):
    with pytest.raises(RuntimeError, match=r"bias must have shape \[16\], got \[15\]"):
        ops.aqlm_gemm(torch.randn(2, 32), *w.args(), torch.randn(15))


def test_lora_A_shape(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"lora_A must have shape \[r, 32\], got \[4, 30\]"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a[:, :30], b, None, 1.0, 0.0, 0, 0)


def test_lora_B_rank_mismatch(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[16, 4\] \(r from lora_A\), got \[16, 3\]"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b[:, :3], None, 1.0, 0.0, 0, 0)


def test_lora_dtype_mismatch(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match="lora_A and lora_B must share a dtype, got Float and Double"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b.double(), None, 1.0, 0.0, 0, 0)


def test_lora_bias_shape(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"lora_bias must have shape \[16\], got \[2, 8\]"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b, torch.randn(2, 8), 1.0, 0.0, 0, 0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_range(w, p):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=f"dropout_p must be in \\[0, 1\\), got {p:g}"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b, None, 1.0, p, 0, 0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        ops.dropout_mask(torch.randn(3), p, 0, 0)


def test_backward_xa_shape(w):
    a, b = lora(w)
    x, g = torch.randn(2, 32), torch.randn(2, 16)
    with pytest.raises(RuntimeError, match=r"xa must have shape \[2, 4\], got \[3, 4\]"):
        ops.lora_backward(g, x, torch.randn(3, 4), *w.args(), a, b, 1.0, 0.0, 0, 0, True)


def test_backward_grad_rows(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"grad must have 2 rows like input, got shape \[3, 16\]"):
        ops.lora_backward(
            torch.randn(3, 16), torch.randn(2, 32), torch.randn(2, 4), *w.args(), a, b, 1.0, 0.0, 0, 0, True
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to mix devices")
def test_device_mix(w):
    with pytest.raises(RuntimeError, match="input must be on cpu"):
        ops.aqlm_gemm(torch.randn(2, 32, device="cuda"), *w.args(), None)
