"""merge_and_quantize: adapters merged into AQLM layers re-quantized in the same scheme, warm-started."""

import copy
import warnings

import aqlm
import pytest
import torch
from peft import LoraConfig, get_peft_model

import aqlm_lora
from aqlm_lora import AqlmLoraLinear
from aqlm_lora.lora.merge import merged_weight
from aqlm_lora.lora.requantize import merge_and_quantize
from aqlm_lora.quantize import layer_scheme
from tests.lora.test_merge import _tiny_aqlm_model, tiny_model
from tests.support.layers import edit_adapters
from tests.support.tolerances import assert_close_fp32

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_requantized_layers_fit_the_merged_weights(dora, tmp_path):
    from transformers import AutoModelForCausalLM

    peft_model = tiny_model(dora)
    adapted = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, AqlmLoraLinear)}
    targets = {n: (merged_weight(m, ["default"])[0], m.quantized_base()) for n, m in adapted.items()}
    untouched = {
        n: m
        for n, m in peft_model.base_model.model.named_modules()
        if isinstance(m, aqlm.QuantizedLinear) and not any(n.startswith(a + ".") for a in adapted)
    }
    errors = {}
    model = merge_and_quantize(peft_model, rounds=2, errors=errors)
    assert errors.keys() == adapted.keys()
    modules = dict(model.named_modules())
    for name, (merged, old) in targets.items():
        new = modules[name]
        assert isinstance(new, aqlm.QuantizedLinear) and new is not old
        assert layer_scheme(new) == layer_scheme(old) and new.codebooks.dtype == old.codebooks.dtype
        before = float((aqlm_lora.ops.dequantize(*_args(old)) - merged).norm() / merged.norm())
        after = float((aqlm_lora.ops.dequantize(*_args(new)) - merged).norm() / merged.norm())
        layer_errors = errors[name]
        assert all(b <= a + 1e-6 for a, b in zip(layer_errors, layer_errors[1:])), layer_errors
        assert after == pytest.approx(layer_errors[-1], rel=1e-3, abs=1e-6) and after <= before + 1e-6
    assert all(modules[n] is m for n, m in untouched.items())
    assert not any(isinstance(m, AqlmLoraLinear) for m in model.modules())
    assert model.config.quantization_config is not None
    model.save_pretrained(str(tmp_path / "requantized"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "requantized"))
    aqlm_lora.use_fused_kernels(loaded)
    assert_close_fp32(_logits(loaded), _logits(model), what="reloaded requantized logits")


def _args(layer):
    from aqlm_lora.lora.fused_base import canonical_codes

    return canonical_codes(layer), layer.codebooks, layer.scales


def test_dora_row_rescaling_requantizes_exactly():
    """B = 0 and m = c * ||W||: the merged weight is diag(c) W, which the 2x8 scales hold exactly."""
    peft_model = tiny_model(dora=True)
    g = torch.Generator().manual_seed(0)
    edit_adapters(peft_model, lambda p: p.zero_(), lambda p: p.mul_(torch.rand(p.shape, generator=g) + 0.5))
    expected = _logits(peft_model)
    errors = {}
    model = merge_and_quantize(peft_model, rounds=0, errors=errors)
    assert max(e[0] for e in errors.values()) < 1e-6
    assert_close_fp32(_logits(model), expected, what="requantized logits")


def _lora_bias_model():
    model = copy.deepcopy(_tiny_aqlm_model())
    config = LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True)
    return get_peft_model(model, aqlm_lora.register(config))


def test_lora_bias_on_a_bias_less_layer_is_refused_before_any_change():
    peft_model = _lora_bias_model()
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.q_proj has a LoRA bias .* no bias"):
        merge_and_quantize(peft_model)
    assert isinstance(q_proj, AqlmLoraLinear) and peft_model.base_model.model.model.layers[0].self_attn.q_proj is q_proj


def test_merged_or_adapterless_models_are_refused():
    peft_model = tiny_model(dora=False)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    with pytest.raises(ValueError, match="has merged adapters; unmerge"):
        merge_and_quantize(peft_model)
    layer.unmerge()
    with pytest.raises(ValueError, match="no AQLM layer of this model has an active adapter"):
        merge_and_quantize(peft_model, adapter_names=["other"])
    with pytest.raises(TypeError, match="needs a PeftModel or LoraModel"):
        merge_and_quantize(peft_model.base_model.model)
