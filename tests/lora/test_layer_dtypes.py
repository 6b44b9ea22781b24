"""AqlmLoraLinear with mixed dtypes (bf16 base, fp32 adapters) and under autocast, against PEFT's
layer: the low-precision rule of tests/support/tolerances.py."""

import torch

from tests.support.layers import IN_FEATURES, OUT_FEATURES, SCHEMES, lora_layer, peft_twin, run_with_grads
from tests.support.tolerances import assert_low_precision_ok


def test_bf16_base_with_fp32_adapters():
    """PEFT's usual setup: bf16 model, adapters kept in fp32 (PEFT casts x for the LoRA branch)."""
    ours = lora_layer(SCHEMES[1], "rslora_bias")
    ours.get_base_layer().to(torch.bfloat16)
    x, grad_out = torch.randn(3, IN_FEATURES), torch.randn(3, OUT_FEATURES)
    out, grads = run_with_grads(ours, x.to(torch.bfloat16), grad_out)
    twin = peft_twin(ours)
    twin.get_base_layer().to(torch.bfloat16)
    twin.base_layer.forward = peft_twin(ours, dtype=torch.bfloat16).base_layer.forward
    plain_out, plain_grads = run_with_grads(twin, x.to(torch.bfloat16), grad_out)
    exact_out, exact_grads = run_with_grads(peft_twin(ours, dtype=torch.float32), x, grad_out)
    assert out.dtype == plain_out.dtype == torch.bfloat16
    assert_low_precision_ok(out, plain_out, exact_out, what="output")
    for name, grad in grads.items():
        assert grad.dtype == plain_grads[name].dtype, name
        assert_low_precision_ok(grad, plain_grads[name], exact_grads[name], what=name)


def test_autocast_matches_peft():
    ours = lora_layer(SCHEMES[0], "single")
    x, grad_out = torch.randn(3, IN_FEATURES), torch.randn(3, OUT_FEATURES)
    exact_out, exact_grads = run_with_grads(peft_twin(ours), x, grad_out)
    twin = peft_twin(ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_with_grads(ours, x, grad_out)
        plain_out, plain_grads = run_with_grads(twin, x, grad_out)
    assert out.dtype == plain_out.dtype == torch.bfloat16
    assert_low_precision_ok(out, plain_out, exact_out, what="output")
    for name, grad in grads.items():
        assert grad.dtype == plain_grads[name].dtype, name
        assert_low_precision_ok(grad, plain_grads[name], exact_grads[name], what=name)
