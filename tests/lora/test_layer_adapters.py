"""AqlmLoraLinear's adapters as PEFT manages them: state-dict keys and scaling, setting, deleting,
disabling and per-row adapters, construction (with and without a LoraConfig), initialisation like
PEFT's Linear, and wrapping another PEFT tuner layer."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

from aqlm_lora import AqlmLoraLinear
from tests.support.layers import (
    IN_FEATURES,
    OUT_FEATURES,
    SCHEMES,
    dense_weight,
    lora_config,
    lora_layer,
    make_quantized_linear,
    peft_twin,
)
from tests.support.tolerances import assert_close_fp32


def test_state_dict_keys_match_peft():
    ours = lora_layer(SCHEMES[1], "multi")
    twin = peft_twin(ours)
    assert list(ours.state_dict()) == list(twin.state_dict())
    assert "lora_B.b.bias" in ours.state_dict() and "lora_B.a.bias" not in ours.state_dict()
    assert ours.scaling == twin.scaling == {"a": 2.0, "b": 0.5}
    rs = lora_layer(SCHEMES[1], "rslora_bias")
    assert rs.scaling["a"] == pytest.approx(8 / 2.0)
    assert repr(ours).startswith("lora.AqlmLoraLinear(")


def test_set_and_delete_adapter():
    ours = lora_layer(SCHEMES[0], "multi")
    x = torch.randn(5, IN_FEATURES)
    both = ours(x)
    ours.set_adapter("b")
    assert ours.active_adapters == ["b"]
    only_b = ours(x)
    twin = peft_twin(ours)
    assert_close_fp32(only_b, twin(x), what="only b")
    ours.set_adapter(["a", "b"])
    assert_close_fp32(ours(x), both, what="both again")
    ours.delete_adapter("a")
    assert list(ours.lora_A) == ["b"] and ours.active_adapters == ["b"]
    assert not any(".a." in k for k in ours.state_dict())
    assert_close_fp32(ours(x), only_b, what="after delete")
    ours.enable_adapters(False)
    base = ours.get_base_layer()
    expected = F.linear(x, dense_weight(base), base.bias)
    assert_close_fp32(ours(x), expected, what="disabled")


def test_inactive_or_missing_adapters_give_base_output():
    ours = lora_layer(SCHEMES[0], "single")
    base = ours.get_base_layer()
    x = torch.randn(3, IN_FEATURES)
    expected = F.linear(x, dense_weight(base), base.bias)
    ours.set_adapter("not_here")
    assert_close_fp32(ours(x), expected, what="unknown active adapter")
    ours.set_adapter("a")
    out = ours(x.unsqueeze(1), adapter_names=["nope", "__base__", "a"])
    assert_close_fp32(out[:2, 0], expected[:2], what="unknown/base rows")
    assert_close_fp32(out[2:, 0], ours(x[2:]), what="adapter row")
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        ours(x, adapter_names=["a"])


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"], ids=str)
def test_init_matches_peft_linear(init):
    base = make_quantized_linear(SCHEMES[0])
    dense = nn.Linear(IN_FEATURES, OUT_FEATURES)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init)
    torch.manual_seed(3)
    ours = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=config)
    torch.manual_seed(3)
    theirs = PeftLinear(dense, "a", r=4, lora_alpha=8, config=config)
    for key in ("lora_A.a.weight", "lora_B.a.weight"):
        mine, peft_value = ours.state_dict()[key], theirs.state_dict()[key]
        assert mine.dtype == peft_value.dtype == torch.float32, key
        assert torch.equal(mine, peft_value), key
    b_is_zero = not ours.lora_B["a"].weight.any()
    assert b_is_zero == (init in (True, "gaussian", "eva"))


@pytest.mark.parametrize("inference_mode", [False, True])
def test_orthogonal_init_leaves_requires_grad_as_peft(inference_mode):
    """PEFT's update_layer ends by freezing the inactive adapters; our orthogonal init (after it) must too."""
    ours = AqlmLoraLinear(
        make_quantized_linear(SCHEMES[0]), "a", r=4, config=LoraConfig(init_lora_weights="orthogonal")
    )
    theirs = PeftLinear(
        nn.Linear(IN_FEATURES, OUT_FEATURES), "a", r=4, config=LoraConfig(init_lora_weights="orthogonal")
    )
    for layer in (ours, theirs):
        for name, use_dora in (("b", True), ("c", False)):
            config = LoraConfig(r=4, init_lora_weights="orthogonal", use_dora=use_dora, inference_mode=inference_mode)
            layer.update_layer(name, 4, lora_alpha=8, config=config)

    def flags(layer: nn.Module) -> dict[str, bool]:
        return {name: p.requires_grad for name, p in layer.named_parameters() if name.startswith("lora_")}

    assert len(flags(ours)) == 7 and flags(ours) == flags(theirs)
    for layer in (ours, theirs):
        layer.set_adapter(["b", "c"])
    assert flags(ours) == flags(theirs)


def test_constructor_without_config_uses_keywords():
    base = make_quantized_linear(SCHEMES[1])
    layer = AqlmLoraLinear(base, "x", r=8, lora_alpha=4, lora_dropout=0.1, use_rslora=True, lora_bias=True)
    assert layer.r == {"x": 8} and layer.lora_alpha == {"x": 4}
    assert layer.scaling["x"] == pytest.approx(4 / 8**0.5)
    assert isinstance(layer.lora_dropout["x"], nn.Dropout) and layer.lora_dropout["x"].p == 0.1
    assert layer.lora_B["x"].bias is not None and not layer.lora_B["x"].weight.any()
    assert layer.in_features == IN_FEATURES and layer.out_features == OUT_FEATURES
    from_config = AqlmLoraLinear(base, "y", config=LoraConfig(r=2, lora_alpha=6))
    assert from_config.r == {"y": 2} and from_config.scaling == {"y": 3.0}
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        AqlmLoraLinear(base, "z")
    with pytest.raises(TypeError, match="needs an aqlm.QuantizedLinear"):
        AqlmLoraLinear(nn.Linear(4, 4), "z", r=2)


def test_wraps_a_peft_tuner_layer():
    inner = AqlmLoraLinear(make_quantized_linear(SCHEMES[0]), "a", r=2, config=lora_config(r=2))
    outer = AqlmLoraLinear(inner, "b", r=3, config=lora_config(r=3))
    assert outer.get_base_layer() is inner.get_base_layer()
    x = torch.randn(2, IN_FEATURES)
    base = inner.get_base_layer()
    delta = (x @ outer.lora_A["b"].weight.T) @ outer.lora_B["b"].weight.T * outer.scaling["b"]
    assert_close_fp32(outer(x), F.linear(x, dense_weight(base), base.bias) + delta, what="nested")
