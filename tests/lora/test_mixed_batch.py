"""Mixed batches (``forward(x, adapter_names=[...])``) through the fused lora_mixed_forward: one op
call per layer, plain and DoRA adapters of different ranks, scalings and lora_bias, "__base__" rows,
gradients equal to running each row group alone, and the stacked weights cached until an adapter
changes."""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import AqlmLoraLinear
from tests.support.layers import (
    IN_FEATURES,
    SCHEMES,
    adapter_params,
    lora_config,
    make_quantized_linear,
    run_with_grads,
)
from tests.support.tolerances import assert_close_fp32

NAMES = ["a", "__base__", "b", "d", "a", "c", "__base__", "d", "b", "a"]


def four_adapters(scheme=SCHEMES[1], bias=True) -> AqlmLoraLinear:
    """ "a" r=4 with lora_bias, "b" r=8 rsLoRA, "c" r=2, "d" r=6 DoRA; random B (and biases)."""
    layer = AqlmLoraLinear(
        make_quantized_linear(scheme, bias=bias), "a", r=4, lora_alpha=8, config=lora_config(lora_bias=True)
    )
    layer.update_layer("b", 8, lora_alpha=4, config=lora_config(r=8, lora_alpha=4, use_rslora=True))
    layer.update_layer("c", 2, lora_alpha=16, config=lora_config(r=2, lora_alpha=16))
    layer.update_layer("d", 6, lora_alpha=6, config=lora_config(r=6, lora_alpha=6, use_dora=True))
    with torch.no_grad():
        for name in ("a", "b", "c", "d"):
            layer.lora_B[name].weight.normal_(0, 0.3)
        layer.lora_B["a"].bias.normal_()
        layer.lora_magnitude_vector["d"].weight.mul_(1.3)
    return layer


def rows_alone(layer: AqlmLoraLinear, x, names):
    """Each row group through the layer with its adapter set active (the oracle)."""
    out = torch.empty(x.shape[0], *x.shape[1:-1], layer.out_features, dtype=x.dtype)
    for name in set(names):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name])
        if name == "__base__":
            with _disabled(layer):
                out[idx] = layer(x[idx])
        else:
            layer.set_adapter(name)
            out[idx] = layer(x[idx])
    return out


class _disabled:
    """Adapters disabled inside the block (the "__base__" rows' oracle)."""

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.layer.enable_adapters(False)

    def __exit__(self, *exc):
        self.layer.enable_adapters(True)


def count_mixed_calls(monkeypatch):
    import aqlm_lora.functional as functional

    calls = {"mixed": 0, "single": 0}
    mixed, single = functional.aqlm_lora_mixed_linear, functional.aqlm_lora_linear

    def counting_mixed(*a, **k):
        calls["mixed"] += 1
        return mixed(*a, **k)

    def counting_single(*a, **k):
        calls["single"] += 1
        return single(*a, **k)

    monkeypatch.setattr(functional, "aqlm_lora_mixed_linear", counting_mixed)
    monkeypatch.setattr(functional, "aqlm_lora_linear", counting_single)
    return calls


@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[1], SCHEMES[5]], ids=str)
@pytest.mark.parametrize("shape", [(10, IN_FEATURES), (10, 3, IN_FEATURES)], ids=["2d", "3d"])
def test_inference_matches_rows_alone(scheme, shape, monkeypatch):
    layer = four_adapters(scheme).eval()
    x = torch.randn(*shape)
    calls = count_mixed_calls(monkeypatch)
    with torch.no_grad():
        mixed = layer(x, adapter_names=NAMES)
        assert calls == {"mixed": 1, "single": 0}, "one fused op call for the whole mixed batch"
        want = rows_alone(layer, x, NAMES)
    assert_close_fp32(mixed, want)


def test_training_gradients_match_row_groups_alone():
    """Training mode, no dropout: the fused op's autograd against each row group run alone."""
    torch.manual_seed(0)
    ours = four_adapters().train()
    twin = four_adapters().train()
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(10, 3, IN_FEATURES)
    grad_out = torch.randn(10, 3, ours.out_features)
    out, grads = run_with_grads(ours, x, grad_out, adapter_names=NAMES)
    # Oracle: each group alone, gradients summed over the groups.
    params = adapter_params(twin)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    xl = x.clone().requires_grad_(True)
    want = torch.empty_like(out)
    for name in set(NAMES):
        idx = torch.tensor([i for i, n in enumerate(NAMES) if n == name])
        if name == "__base__":
            with _disabled(twin):
                y = twin(xl[idx])
        else:
            twin.set_adapter(name)
            for p in params.values():
                p.requires_grad_(True)
            y = twin(xl[idx])
        y.backward(grad_out[idx])
        want[idx] = y.detach()
    assert_close_fp32(out, want, what="output")
    assert_close_fp32(grads["input"], xl.grad, what="input")
    for name, p in params.items():
        assert grads[name] is not None, name
        assert_close_fp32(grads[name], p.grad, what=name)


def test_training_with_dropout_runs_groups_apart_with_gradients(monkeypatch):
    layer = AqlmLoraLinear(
        make_quantized_linear(SCHEMES[1]), "a", r=4, lora_alpha=8, config=lora_config(lora_dropout=0.2)
    )
    layer.update_layer("b", 4, lora_alpha=8, config=lora_config(lora_dropout=0.2))
    for p in adapter_params(layer).values():  # update_layer leaves only the active adapter trainable
        p.requires_grad_(True)
    calls = count_mixed_calls(monkeypatch)
    x = torch.randn(4, IN_FEATURES, requires_grad=True)
    layer.train()
    layer(x, adapter_names=["a", "b", "__base__", "a"]).sum().backward()
    assert calls["mixed"] == 0 and calls["single"] == 2
    assert layer.lora_A["a"].weight.grad is not None and layer.lora_A["b"].weight.grad is not None


def test_single_adapter_batch_uses_the_plain_fused_call(monkeypatch):
    layer = four_adapters().eval()
    calls = count_mixed_calls(monkeypatch)
    with torch.no_grad():
        out = layer(torch.randn(3, IN_FEATURES), adapter_names=["a", "a", "a"])
    assert calls == {"mixed": 0, "single": 1} and out.shape == (3, layer.out_features)


def test_stack_is_cached_until_an_adapter_changes():
    layer = four_adapters().eval()
    x = torch.randn(10, IN_FEATURES)
    stack = layer.adapter_stack
    with torch.no_grad():
        first = layer(x, adapter_names=NAMES)
        layer(x, adapter_names=NAMES)
        layer(x, adapter_names=list(reversed(NAMES)))
        assert stack.builds == 1, "same adapters: no rebuild"
        layer.lora_B["c"].weight.mul_(2.0)  # an in-place change (optimizer step, load_state_dict copy_)
        changed = layer(x, adapter_names=NAMES)
        assert stack.builds == 2
        c_rows = [i for i, n in enumerate(NAMES) if n == "c"]
        assert not torch.equal(changed[c_rows], first[c_rows])
        layer.update_layer("e", 4, lora_alpha=8, config=lora_config())  # add
        layer(x, adapter_names=NAMES)
        assert stack.builds == 3
        layer.delete_adapter("e")  # delete
        again = layer(x, adapter_names=NAMES)
        assert stack.builds == 4
        assert torch.equal(again, changed)
        layer.lora_A["a"].weight.requires_grad_(False)  # requires_grad flips change the key too
        layer(x, adapter_names=NAMES)
        assert stack.builds == 5
    # With a gradient wanted the stacks are built from the parameters on every call (not cached).
    layer.lora_A["a"].weight.requires_grad_(True)
    layer(x, adapter_names=NAMES).sum().backward()
    layer(x, adapter_names=NAMES).sum().backward()
    assert stack.builds == 7
    assert layer.lora_A["a"].weight.grad is not None


def test_adapter_missing_from_layer_and_empty_batch():
    layer = four_adapters().eval()
    x = torch.randn(3, IN_FEATURES)
    with torch.no_grad():
        out = layer(x, adapter_names=["a", "zzz", "__base__"])
        want = rows_alone(layer, x, ["a", "__base__", "__base__"])
        assert_close_fp32(out, want)
        empty = layer(torch.randn(0, IN_FEATURES), adapter_names=[])
    assert empty.shape == (0, layer.out_features)


def test_bf16_input():
    layer = four_adapters().eval()
    x = torch.randn(10, IN_FEATURES)
    with torch.no_grad():
        out = layer(x.bfloat16(), adapter_names=NAMES)
        want = layer(x, adapter_names=NAMES)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).abs().max() <= 0.05 * want.abs().max()


def test_adapters_no_row_uses_get_no_gradient():
    """As in PEFT, where they never run: .grad stays None (AdamW's weight decay then leaves them
    alone), also for DoRA's magnitude; the outputs and the used adapters' gradients are unchanged."""
    torch.manual_seed(0)
    ours = four_adapters().train()
    twin = four_adapters().train()
    twin.load_state_dict(ours.state_dict())
    names = ["a", "__base__", "c", "a"]  # "b" and the DoRA adapter "d" unused
    x, grad_out = torch.randn(4, 3, IN_FEATURES), torch.randn(4, 3, ours.out_features)
    out, grads = run_with_grads(ours, x, grad_out, adapter_names=names)
    for name in ("b", "d"):
        assert grads[f"lora_A.{name}.weight"] is None and grads[f"lora_B.{name}.weight"] is None, name
    assert grads["lora_magnitude_vector.d.weight"] is None
    for p in adapter_params(twin).values():
        p.requires_grad_(True)
    with torch.no_grad():
        twin.lora_A["b"].weight.add_(1.0)  # an unused adapter cannot matter
    want, want_grads = run_with_grads(twin, x, grad_out, adapter_names=names)
    assert torch.equal(out, want)
    for name, grad in grads.items():
        want_grad = want_grads[name]
        assert (grad is None) == (want_grad is None) and (grad is None or torch.equal(grad, want_grad)), name
