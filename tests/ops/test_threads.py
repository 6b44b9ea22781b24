"""Results do not depend on the number of threads, for every row count on both sides of every
kernel threshold (aqlm's own CPU kernel fails this; so does plain BLAS at 5-11 rows)."""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import ops
from tests.support.weights import SCHEME_IDS, SCHEMES, random_weight

ROWS = {torch.float32: [*range(1, 34), 300], torch.bfloat16: [1, 5, 8, 9, 11, 17, 33, 300]}
THREADS = [1, 2, 3]


def _run_all(w, x, g, lora_A, lora_B, p):
    out, xa = ops.lora_forward(x, *w.args(), w.bias, lora_A, lora_B, None, 0.5, p, 3, 1)
    grads = ops.lora_backward(g, x, xa, *w.args(), lora_A, lora_B, 0.5, p, 3, 1, True)
    return [ops.aqlm_gemm(x, *w.args(), w.bias), ops.aqlm_gemm_t(g, *w.args()), out, xa, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_thread_counts_agree(scheme, dtype):
    w = random_weight(scheme, 512, 1024, dtype, bias=True)  # big enough to split across threads
    lora_A = torch.randn(8, w.in_features, dtype=dtype)
    lora_B = torch.randn(w.out_features, 8, dtype=dtype)
    assert torch.equal(ops.dequantize(*w.args()), ops.dequantize(*w.args()))
    before = torch.get_num_threads()
    try:
        for rows in ROWS[dtype]:
            x = torch.randn(rows, w.in_features, dtype=dtype)
            g = torch.randn(rows, w.out_features, dtype=dtype)
            for p in (0.0, 0.2):
                results = {}
                for threads in THREADS:
                    torch.set_num_threads(threads)
                    results[threads] = _run_all(w, x, g, lora_A, lora_B, p) + [ops.dequantize(*w.args())]
                for threads in THREADS[1:]:
                    for k, (a, b) in enumerate(zip(results[1], results[threads])):
                        assert torch.equal(a, b), f"N={rows} p={p} output {k}: 1 vs {threads} threads differ"
    finally:
        torch.set_num_threads(before)


# Layers of one or two GEMM blocks (128 output rows per forward block, 64 input columns per
# backward block) and tiny ones: there the thread pool used to run the one block on the calling
# thread, where MKL rounds the product by its own thread count (1 vs 2 threads differed by 4e-5).
SMALL_SHAPES = [(128, 4096), (129, 4096), (16, 512), (4096, 64), (8, 64), (1, 64), (64, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=[f"{o}x{i}" for o, i in SMALL_SHAPES])
def test_small_layers_thread_counts_agree(shape, dtype):
    out_features, in_features = shape
    w = random_weight(SCHEMES[1], out_features, in_features, dtype, bias=True)
    lora_A = torch.randn(4, in_features, dtype=dtype)
    lora_B = torch.randn(out_features, 4, dtype=dtype)
    before = torch.get_num_threads()
    try:
        for rows in (9, 12, 33):
            x = torch.randn(rows, in_features, dtype=dtype)
            g = torch.randn(rows, out_features, dtype=dtype)
            results = {}
            for threads in THREADS:
                torch.set_num_threads(threads)
                results[threads] = _run_all(w, x, g, lora_A, lora_B, 0.0)
            for threads in THREADS[1:]:
                for k, (a, b) in enumerate(zip(results[1], results[threads])):
                    assert torch.equal(a, b), f"N={rows} output {k}: 1 vs {threads} threads differ"
    finally:
        torch.set_num_threads(before)
