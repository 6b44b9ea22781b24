"""AqlmLoraLinear's forward and backward against PEFT's own AqlmLoraLinear (the semantics) on every
scheme, dtype and adapter setup; and against PEFT's layer running aqlm's own CPU kernels.

The layer's other topics: test_layer_adapters.py (adapter management, construction), test_layer_dtypes.py
(mixed dtypes, autocast), test_layer_dropout.py, test_layer_base.py (the base layer is only read),
test_layer_memory.py (saved tensors), test_layer_errors.py (refused options and inputs)."""

import pytest
import torch
from torch import nn

from tests.support.layers import (
    DTYPE_IDS,
    DTYPES,
    IN_FEATURES,
    MODES,
    OUT_FEATURES,
    SCHEME_IDS,
    SCHEMES,
    lora_layer,
    mixed_rows_oracle,
    peft_twin,
    run_with_grads,
)
from tests.support.tolerances import assert_close_fp32, assert_outputs_and_grads_ok

MIXED_NAMES = ["b", "a", "__base__", "b"]


def oracle(ours: nn.Module, x, grad_out, dtype, mode: str):
    """PEFT's layer (dense base in ``dtype``) with ours' weights; mixed batches row by row."""
    twin = peft_twin(ours, dtype=dtype)
    x = x.to(dtype)
    if mode != "mixed":
        return run_with_grads(twin, x, grad_out)
    return mixed_rows_oracle(twin, x, grad_out, MIXED_NAMES)


@pytest.mark.parametrize("tokens", [1, 8], ids=["decode", "prefill"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_matches_peft(scheme, dtype, mode, tokens):
    """4 x tokens rows: few rows take the kernels' decode path, many their blocked GEMM path."""
    ours = lora_layer(scheme, mode, dtype)
    x = torch.randn(4, tokens, IN_FEATURES)
    grad_out = torch.randn(4, tokens, OUT_FEATURES)
    kwargs = {"adapter_names": MIXED_NAMES} if mode == "mixed" else {}
    out, grads = run_with_grads(ours, x.to(dtype), grad_out, **kwargs)
    exact = oracle(ours, x, grad_out, torch.float32, mode)
    if mode == "disabled":
        assert all(g is None for n, g in grads.items() if n != "input")
    assert_outputs_and_grads_ok(out, grads, exact, lambda: oracle(ours, x, grad_out, dtype, mode), dtype)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.out_group_size == 1], ids=str)
def test_matches_peft_with_aqlm_own_forward(scheme):
    """Outputs of PEFT's layer running aqlm's real CPU kernels (numba on one thread for 8-bit codebooks).

    Outputs only: PEFT's layer cannot backpropagate through aqlm's CPU kernels (they return a view
    and PEFT's in-place ``result += output`` then raises "Output 0 of _QuantizedMatmul is a view and
    is being modified inplace"); gradients are compared on the dense base in test_matches_peft.
    """
    numba = pytest.importorskip("numba")
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        ours = lora_layer(scheme, "multi")
        twin = peft_twin(ours, dense_base=False)
        x = torch.randn(2, 5, IN_FEATURES)
        with torch.no_grad():
            for rows in (x[:1, :3], x):  # aqlm's gemv path (<= 6 rows) and its gemm path
                assert_close_fp32(ours(rows), twin(rows), rtol=1e-4, what=f"{tuple(rows.shape)}")
    finally:
        numba.set_num_threads(threads)


def test_peft_layer_cannot_train_on_aqlm_cpu_kernels():
    """Why the test above compares outputs only (fails if PEFT or aqlm fix it: then compare gradients)."""
    twin = peft_twin(lora_layer(SCHEMES[0], "single"), dense_base=False)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        twin(torch.randn(2, 3, IN_FEATURES, requires_grad=True))
