"""Results do not depend on the number of threads (aqlm's own CPU kernel fails this)."""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import ops
from tests.helpers import SCHEME_IDS, SCHEMES, make_weight


def _run_all(w, x, g, lora_A, lora_B):
    out, xa = ops.lora_forward(x, *w.args(), w.bias, lora_A, lora_B, None, 0.5, 0.2, 3, 1)
    grads = ops.lora_backward(g, x, xa, *w.args(), lora_A, lora_B, 0.5, 0.2, 3, 1, True)
    return [ops.aqlm_gemm(x, *w.args(), w.bias), ops.aqlm_gemm_t(g, *w.args()), ops.dequantize(*w.args()), out, *grads]


@pytest.mark.parametrize("rows", [1, 4, 300], ids=["N1", "N4", "N300"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_one_and_two_threads_agree(scheme, rows):
    w = make_weight(scheme, 512, 1024, bias=True)  # big enough to split across threads
    x = torch.randn(rows, w.in_features)
    g = torch.randn(rows, w.out_features)
    lora_A, lora_B = torch.randn(8, w.in_features), torch.randn(w.out_features, 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _run_all(w, x, g, lora_A, lora_B)
        torch.set_num_threads(2)
        double = _run_all(w, x, g, lora_A, lora_B)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(single, double):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
