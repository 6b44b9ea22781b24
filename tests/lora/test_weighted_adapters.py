"""``get_delta_weight`` as PEFT's ``lora.Linear`` has it, and PEFT's ``add_weighted_adapter`` SVD
combinations (which read it) on our layers against PEFT on the dequantized dense model."""

import pytest
import torch

from tests.support.layers import SCHEMES, dense_peft_twin, lora_layer, peft_model_pair
from tests.support.tolerances import FP64_RTOL, assert_close_fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_get_delta_weight_is_peft_s(dtype):
    ours = lora_layer(SCHEMES[1], "multi")
    with torch.no_grad():
        for name in ("a", "b"):
            ours.lora_B[name].weight.normal_()
    ours.to(dtype)
    twin = dense_peft_twin(ours, dtype)
    for name in ("a", "b"):
        delta = ours.get_delta_weight(name)
        assert delta.dtype == dtype and torch.equal(delta, twin.get_delta_weight(name)), name


@pytest.mark.parametrize("combination", ["svd", "ties_svd", "dare_linear_svd", "magnitude_prune_svd"])
def test_svd_weighted_adapter_matches_dense_peft(combination):
    ours, theirs = peft_model_pair(["q_proj", "v_proj"], False, ["p", "q"])
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (ours, theirs):
        torch.manual_seed(1)  # dare_* drops at random
        model.add_weighted_adapter(["p", "q"], [0.7, 0.4], "w", combination_type=combination, density=0.5)
        model.set_adapter("w")
        with torch.no_grad():
            outputs.append(model(input_ids=ids).logits)
    weights = [{k: v for k, v in m.state_dict().items() if ".w." in k} for m in (ours, theirs)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    assert_close_fp32(outputs[0], outputs[1], rtol=FP64_RTOL)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_adapter_of_all_linear_adapters(combination):
    """register's all-linear expansion leaves a set of names, as PEFT's own does: a list made PEFT's
    add_weighted_adapter refuse the adapters (TypeError), and a list beside a set (a reloaded adapter)
    too (ValueError)."""
    ours, theirs = peft_model_pair("all-linear", False, ["p", "q"])
    assert isinstance(ours.peft_config["p"].target_modules, set)
    assert ours.peft_config["p"].target_modules == theirs.peft_config["p"].target_modules
    for model in (ours, theirs):
        model.add_weighted_adapter(["p", "q"], [0.7, 0.4], "w", combination_type=combination)
        model.set_adapter("w")
    # "cat" fills a new adapter in place, and a new adapter on an AQLM layer is float32 (PEFT's own
    # AQLM layer makes it so too; PEFT's dense layer takes the float64 weight's dtype).
    weights = [{k: v for k, v in m.state_dict().items() if ".w." in k} for m in (ours, theirs)]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) == 28
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key].to(value.dtype)), key
    theirs.load_state_dict(weights[0], strict=False)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_fp32(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=FP64_RTOL)
