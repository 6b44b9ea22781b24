"""AqlmLoraLinear's LoRA dropout: the op's Philox mask (the same as aqlm_lora.reference's for the same
seed), p read from lora_dropout, only while training, one mask per dropout group, replayed under
activation checkpointing."""

import pytest
import torch

from aqlm_lora import AqlmLoraLinear, ops, reference
from aqlm_lora.lora.layer import canonical_codes
from tests.support.layers import (
    IN_FEATURES,
    OUT_FEATURES,
    SCHEMES,
    adapter_params,
    dense_peft_twin,
    dropout_layer,
    lora_config,
    make_quantized_linear,
    mixed_rows_oracle,
    run_with_grads,
)
from tests.support.tolerances import FP64_RTOL, assert_close_fp32


def _weights(layer, name="a"):
    base = layer.get_base_layer()
    return (
        (canonical_codes(base), base.codebooks, base.scales, base.bias),
        layer.lora_A[name].weight,
        layer.lora_B[name],
    )


def test_dropout_matches_reference_with_same_seed():
    layer = dropout_layer(0.25).train()
    x = torch.randn(3, 4, IN_FEATURES)
    grad_out = torch.randn(3, 4, OUT_FEATURES)
    torch.manual_seed(11)
    seed = ops.draw_seed()
    torch.manual_seed(11)
    out, grads = run_with_grads(layer, x, grad_out)
    (codes, codebooks, scales, bias), A, B = _weights(layer)
    xr = x.clone().requires_grad_(True)
    params = [A, B.weight, B.bias]
    for p in params:
        p.grad = None
    ref = reference.lora_linear(xr, codes, codebooks, scales, bias, A, B.weight, 2.0, 0.25, B.bias, seed=seed)
    ref.backward(grad_out)
    assert_close_fp32(out, ref.detach(), what="output")
    assert_close_fp32(grads["input"], xr.grad, what="input")
    for name, p in zip(("lora_A.a.weight", "lora_B.a.weight", "lora_B.a.bias"), params):
        assert_close_fp32(grads[name], p.grad, what=name)
    no_dropout = reference.lora_linear(x, codes, codebooks, scales, bias, A, B.weight, 2.0, 0.0, B.bias)
    assert (out - no_dropout).abs().max() > 1e-3, "dropout had no effect while training"


def test_dropout_only_while_training():
    layer = dropout_layer(0.5)
    x = torch.randn(6, IN_FEATURES)
    layer.eval()
    eval_out = layer(x)
    (codes, codebooks, scales, bias), A, B = _weights(layer)
    expected = reference.lora_linear(x, codes, codebooks, scales, bias, A, B.weight, 2.0, 0.0, B.bias)
    assert_close_fp32(eval_out, expected, what="eval")
    layer.train()
    first, second = layer(x), layer(x)
    assert (first - second).abs().max() > 1e-3, "two training steps drew the same mask"


def test_dropout_statistics():
    """With A = I and B = [I; 0] the LoRA term exposes the mask: keep rate 1 - p, kept values x / (1 - p)."""
    p, n_rows, n_in = 0.3, 64, 48
    base = make_quantized_linear(SCHEMES[1], in_features=n_in, out_features=64, bias=False)
    layer = AqlmLoraLinear(
        base, "a", r=n_in, lora_alpha=n_in, config=lora_config(r=n_in, lora_alpha=n_in, lora_dropout=p)
    )
    with torch.no_grad():
        layer.lora_A["a"].weight.copy_(torch.eye(n_in))
        layer.lora_B["a"].weight.copy_(torch.cat([torch.eye(n_in), torch.zeros(64 - n_in, n_in)]))
    x = torch.rand(n_rows, n_in) + 0.5
    layer.eval()
    base_out = layer(x) - torch.cat([x, torch.zeros(n_rows, 64 - n_in)], dim=1)
    layer.train()
    delta = (layer(x) - base_out)[:, :n_in]
    kept = delta.abs() > 1e-3
    assert abs(kept.float().mean().item() - (1 - p)) < 0.04
    assert_close_fp32(delta[kept], (x / (1 - p))[kept], rtol=1e-5, what="kept values")


def test_several_adapters_share_one_mask_per_dropout_group():
    base = make_quantized_linear(SCHEMES[0])
    layer = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=lora_config(lora_dropout=0.2, lora_bias=True))
    layer.update_layer("b", 2, lora_alpha=6, config=lora_config(r=2, lora_alpha=6, lora_dropout=0.2))
    layer.update_layer("c", 3, lora_alpha=3, config=lora_config(r=3, lora_alpha=3, lora_dropout=0.5, lora_bias=True))
    with torch.no_grad():
        for name in ("a", "c"):
            layer.lora_B[name].bias.normal_()
    layer.set_adapter(["a", "b", "c"])
    layer.train()
    x, grad_out = torch.randn(5, IN_FEATURES), torch.randn(5, OUT_FEATURES)
    torch.manual_seed(5)
    seed_ab, seed_c = ops.draw_seed(), ops.draw_seed()
    torch.manual_seed(5)
    out, grads = run_with_grads(layer, x, grad_out)

    (codes, codebooks, scales, bias), _, _ = _weights(layer)
    params = adapter_params(layer)
    for p in params.values():
        p.grad = None
    xr = x.clone().requires_grad_(True)
    s = layer.scaling
    A_ab = torch.cat([params["lora_A.a.weight"], params["lora_A.b.weight"]])
    B_ab = torch.cat([params["lora_B.a.weight"] * s["a"], params["lora_B.b.weight"] * s["b"]], dim=1)
    ref = reference.lora_linear(
        xr, codes, codebooks, scales, bias, A_ab, B_ab, 1.0, 0.2, params["lora_B.a.bias"] * s["a"], seed=seed_ab
    )
    xc = reference.apply_dropout(xr, 0.5, seed_c, 0)
    ref = ref + s["c"] * ((xc @ params["lora_A.c.weight"].T) @ params["lora_B.c.weight"].T + params["lora_B.c.bias"])
    ref.backward(grad_out)
    assert_close_fp32(out, ref.detach(), what="output")
    assert_close_fp32(grads["input"], xr.grad, what="input")
    for name, p in params.items():
        assert_close_fp32(grads[name], p.grad, what=name)


def test_dropout_mask_is_replayed_under_checkpointing():
    layer = dropout_layer(0.4).train()
    x, grad_out = torch.randn(4, IN_FEATURES), torch.randn(4, OUT_FEATURES)
    torch.manual_seed(9)
    out, grads = run_with_grads(layer, x, grad_out)
    for p in adapter_params(layer).values():
        p.grad = None
    torch.manual_seed(9)
    xc = x.clone().requires_grad_(True)
    out_ckpt = torch.utils.checkpoint.checkpoint(layer, xc, use_reentrant=False)
    out_ckpt.backward(grad_out)
    assert torch.equal(out_ckpt.detach(), out)
    assert torch.equal(xc.grad, grads["input"])
    for name, p in adapter_params(layer).items():
        assert torch.equal(p.grad, grads[name]), name


@pytest.mark.parametrize("case", ["lora", "lora_bias", "dora", "with_p0", "mixed"])
def test_dropout_one_drops_the_whole_lora_input_as_peft(case):
    """lora_dropout=1.0 (the op's dropout needs p < 1): PEFT's nn.Dropout(p=1) gives x * 0, so the
    LoRA term is scaling * lora_bias, A and B get zero gradients; float64 against PEFT's dense layer."""
    base = make_quantized_linear(SCHEMES[1], dtype=torch.float64)
    config = lora_config(lora_dropout=1.0, lora_bias=case != "dora", use_dora=case == "dora")
    layer = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=config)
    if case in ("with_p0", "mixed"):  # another adapter, its dropout 0, in the fused call
        layer.update_layer("b", 6, lora_alpha=3, config=lora_config(r=6, lora_alpha=3, lora_bias=True))
        layer.set_adapter(["b", "a"] if case == "with_p0" else "a")
    layer.double().train()
    with torch.no_grad():
        for name, p in adapter_params(layer).items():
            p.mul_(torch.rand(p.shape) + 0.5) if "magnitude" in name else p.normal_()
    x, grad_out = torch.randn(5, IN_FEATURES, dtype=torch.float64), torch.randn(5, OUT_FEATURES, dtype=torch.float64)
    twin = dense_peft_twin(layer)
    if case == "mixed":
        names = ["a", "b", "__base__", "a", "b"]
        out, grads = run_with_grads(layer, x, grad_out, adapter_names=names)
        want, want_grads = mixed_rows_oracle(twin, x, grad_out, names)
    else:
        out, grads = run_with_grads(layer, x, grad_out)
        want, want_grads = run_with_grads(twin, x, grad_out)
    assert_close_fp32(out, want, rtol=FP64_RTOL, what="output")
    assert set(grads) == set(want_grads)
    for name, grad in grads.items():
        assert_close_fp32(grad, want_grads[name], rtol=FP64_RTOL, what=name)
    assert not grads["lora_A.a.weight"].any() and not grads["lora_B.a.weight"].any()
    layer.eval()  # no dropout: the adapter counts
    assert_close_fp32(layer(x), dense_peft_twin(layer)(x), rtol=FP64_RTOL, what="eval")


def test_dropout_one_keeps_peft_nan_for_infinite_inputs():
    layer = AqlmLoraLinear(make_quantized_linear(SCHEMES[1]), "a", r=4, config=lora_config(lora_dropout=1.0))
    x = torch.randn(2, IN_FEATURES)
    x[0, 3] = float("inf")
    out, want = layer.train()(x), dense_peft_twin(layer).train()(x)
    assert torch.equal(out.isnan(), want.isnan()) and out[0].isnan().all() and not out[1].isnan().any()
