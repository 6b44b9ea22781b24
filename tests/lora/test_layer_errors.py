"""What AqlmLoraLinear refuses, and how: codes of the wrong shape, PEFT options it cannot honour
(inits that need a dense base weight, aLoRA, QALoRA, target_parameters), fan_in_fan_out reset as
PEFT does, and extra forward arguments."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig

from aqlm_lora import AqlmLoraLinear
from tests.support.layers import IN_FEATURES, OUT_FEATURES, SCHEMES, lora_config, lora_layer, make_quantized_linear


def test_codes_of_wrong_shape_are_refused():
    layer = make_quantized_linear(SCHEMES[0])
    layer.codes.data = layer.codes.data[:, :-1].contiguous()
    ours = AqlmLoraLinear(layer, "a", r=2, config=lora_config(r=2))
    expected = rf"codes have shape \[{OUT_FEATURES}, 7, 1\], expected \[{OUT_FEATURES}, 8, 1\]"
    with pytest.raises(ValueError, match=expected):
        ours(torch.randn(2, IN_FEATURES))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*dense base weight"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'.*dense base weight"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'.*dense base weight"),
        ({"init_lora_weights": "corda"}, "init_lora_weights='corda'.*dense base weight"),
        (
            {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}},
            "init_lora_weights='loftq'.*dense base weight",
        ),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga'.*dense base weight"),
        ({"init_lora_weights": "mica"}, "init_lora_weights='mica'.*dense base weight"),
        ({"alora_invocation_tokens": [1, 2]}, "plain LoRA only"),
        ({"use_qalora": True}, "does not implement QALoRA"),  # PEFT's layers would give plain LoRA silently
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, dict) else None,
)
def test_refused_options(kwargs, match):
    base = make_quantized_linear(SCHEMES[0])
    before = copy.deepcopy(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=4, **kwargs)
    with pytest.raises(ValueError, match=match):
        AqlmLoraLinear(base, "a", r=4, config=config)
    plain = AqlmLoraLinear(base, "a", r=4, config=LoraConfig(r=4))
    with pytest.raises(ValueError, match=match):  # adding an adapter to an existing layer (PEFT's path)
        plain.update_layer("b", 4, lora_alpha=8, config=config)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_forward_rejects_extra_arguments():
    ours = lora_layer(SCHEMES[0], "single")
    with pytest.raises(TypeError, match="takes the input and `adapter_names` only"):
        ours(torch.randn(2, IN_FEATURES), torch.randn(2))
    with pytest.raises(ValueError, match="does not support `alora_offsets`"):
        ours(torch.randn(2, IN_FEATURES), alora_offsets=[1, 1])


class _OneLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = make_quantized_linear(SCHEMES[1])

    def forward(self, x):
        return self.q_proj(x)


@pytest.mark.parametrize("parameter", ["q_proj.scales", "q_proj.codebooks"])
def test_target_parameters_on_an_aqlm_layer_is_refused(parameter):
    """PEFT hands the parameter's name to our layer, which built a LoRA on the whole layer instead."""
    from peft import get_peft_model

    from aqlm_lora import register

    config = register(LoraConfig(r=4, target_modules=None, target_parameters=[parameter]))
    with pytest.raises(ValueError, match=rf"target_parameters='{parameter.split('.')[1]}'.*target_modules"):
        get_peft_model(_OneLayer(), config)


def test_fan_in_fan_out_is_reset_as_peft_does():
    config = lora_config(fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):
        ours = AqlmLoraLinear(make_quantized_linear(SCHEMES[0]), "a", r=4, config=config)
    assert config.fan_in_fan_out is False and "a" in ours.lora_A
