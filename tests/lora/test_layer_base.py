"""The base layer under AqlmLoraLinear: read, never run, never written; aqlm's in-place code
permutation (its CPU forward permutes 8-bit codes) is read through a view."""

import copy

import aqlm
import pytest
import torch

from aqlm_lora import AqlmLoraLinear
from aqlm_lora.lora.layer import canonical_codes
from tests.support.layers import (
    IN_FEATURES,
    OUT_FEATURES,
    SCHEMES,
    lora_config,
    lora_layer,
    make_quantized_linear,
    run_with_grads,
)


def test_never_calls_or_mutates_base_layer():
    ours = lora_layer(SCHEMES[1], "multi")
    base = ours.get_base_layer()

    def refuse(*args, **kwargs):
        raise AssertionError("the base layer's forward was called")

    base.forward = refuse
    before = {k: (v.data_ptr(), v.clone()) for k, v in base.state_dict().items()}
    x = torch.randn(7, IN_FEATURES, requires_grad=True)
    ours(x).sum().backward()
    ours(x.unsqueeze(1), adapter_names=["a", "__base__", "b", "a", "b", "a", "a"]).sum().backward()
    for key, value in base.state_dict().items():
        assert value.data_ptr() == before[key][0], key
        assert torch.equal(value, before[key][1]), key
        assert value.grad is None, key


@pytest.mark.parametrize("out_features", [OUT_FEATURES, 8], ids=["rect", "square_groups"])
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.nbits == 8], ids=str)
def test_codes_permuted_by_aqlm_forward(scheme, out_features):
    """aqlm's CPU forward permutes 8-bit codes in place; ours reads them through a view."""
    pristine = make_quantized_linear(scheme, out_features=out_features)
    expected_codes = pristine.codes.clone()
    ran = copy.deepcopy(pristine)
    if scheme == SCHEMES[1] and out_features == OUT_FEATURES:
        with torch.no_grad():
            ran(torch.randn(2, IN_FEATURES))  # aqlm's own forward, which calls prepare_matmul_op
    else:
        ran.prepare_matmul_op(torch.randn(2, IN_FEATURES))  # the same, without compiling more numba kernels
    num_out, num_in = out_features // scheme.out_group_size, IN_FEATURES // scheme.in_group_size
    assert ran.gemv_op is not None
    assert tuple(ran.codes.shape) == (num_in, num_out, scheme.num_codebooks)
    assert torch.equal(ran.codes.permute(1, 0, 2), expected_codes)
    stored = ran.codes.data.clone()
    assert torch.equal(canonical_codes(ran), expected_codes)

    torch.manual_seed(1)
    ours = AqlmLoraLinear(ran, "a", r=4, lora_alpha=8, config=lora_config())
    torch.manual_seed(1)
    ref = AqlmLoraLinear(pristine, "a", r=4, lora_alpha=8, config=lora_config())
    x, grad_out = torch.randn(3, IN_FEATURES), torch.randn(3, out_features)
    out, grads = run_with_grads(ours, x, grad_out)
    ref_out, ref_grads = run_with_grads(ref, x, grad_out)
    assert torch.equal(out, ref_out)
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    assert torch.equal(ran.codes, stored), "the stored codes were modified"


def test_canonical_codes_of_fresh_layer_is_the_stored_tensor():
    layer = make_quantized_linear(SCHEMES[1])
    assert canonical_codes(layer) is layer.codes
    assert isinstance(layer, aqlm.QuantizedLinear)
