"""torch.library.opcheck on every op: schema, fake kernel, autograd registration, dynamic shapes."""

from __future__ import annotations

import pytest
import torch

from tests.support.weights import SCHEMES, devices, random_weight


def _samples(scheme, device, dtype):
    w = random_weight(scheme, 16, 32, dtype, device, bias=True)
    x = torch.randn(2, 3, w.in_features, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(2, 3, w.out_features, dtype=dtype, device=device)
    lora_A = torch.randn(4, w.in_features, dtype=dtype, device=device, requires_grad=True)
    lora_B = torch.randn(w.out_features, 4, dtype=dtype, device=device, requires_grad=True)
    lora_bias = torch.randn(w.out_features, dtype=dtype, device=device, requires_grad=True)
    xa = torch.randn(6, 4, dtype=dtype, device=device)
    # Non-contiguous views: transposed LoRA weights (as a user's A.t() gives), a strided input.
    lora_A_t = torch.randn(w.in_features, 4, dtype=dtype, device=device).t().requires_grad_()
    lora_B_t = torch.randn(4, w.out_features, dtype=dtype, device=device).t().requires_grad_()
    x_strided = torch.randn(6, 2 * w.in_features, dtype=dtype, device=device)[:, ::2].requires_grad_()
    g_t = torch.randn(w.out_features, 6, dtype=dtype, device=device).t()
    xa_t = torch.randn(4, 6, dtype=dtype, device=device).t()
    ops = torch.ops.aqlm_lora
    return [
        (ops.aqlm_gemm.default, (x_strided, *w.args(), w.bias)),
        (ops.aqlm_gemm_t.default, (g_t, *w.args())),
        (ops.lora_forward.default, (x_strided, *w.args(), None, lora_A_t, lora_B_t, lora_bias, 0.5, 0.2, 4, 0)),
        (
            ops.lora_backward.default,
            (g_t, x_strided.detach(), xa_t, *w.args(), lora_A_t.detach(), lora_B_t.detach(), 0.5, 0.2, 3, 0, True),
        ),
        (ops.dequantize.default, (*w.args(),)),
        (ops.aqlm_gemm.default, (x, *w.args(), w.bias)),
        (ops.aqlm_gemm.default, (x, *w.args(), None)),
        (ops.aqlm_gemm_t.default, (g, *w.args())),
        (ops.dropout_mask.default, (x.detach(), 0.3, 17, 2)),
        (ops.lora_forward.default, (x, *w.args(), w.bias, lora_A, lora_B, lora_bias, 0.5, 0.0, 0, 0)),
        (ops.lora_forward.default, (x, *w.args(), None, lora_A, lora_B, None, 2.0, 0.25, 9, 1)),
        (
            ops.lora_backward.default,
            (g, x.detach(), xa, *w.args(), lora_A.detach(), lora_B.detach(), 0.5, 0.1, 3, 0, True),
        ),
        (
            ops.lora_backward.default,
            (g, x.detach(), xa, *w.args(), lora_A.detach(), lora_B.detach(), 0.5, 0.0, 3, 0, False),
        ),
    ]


CASES = [
    (scheme, device, dtype)
    for scheme in (SCHEMES[0], SCHEMES[1], SCHEMES[5])
    for device in devices()
    for dtype in (torch.float32, torch.float64)
]


@pytest.mark.parametrize("scheme,device,dtype", CASES, ids=[f"{s}-{d}-{str(t)[6:]}" for s, d, t in CASES])
def test_opcheck(scheme, device, dtype):
    for op, args in _samples(scheme, device, dtype):
        torch.library.opcheck(op, args)
