"""merge() / unmerge() on AqlmLoraLinear (a dense base swapped in, the AQLM layer put back untouched)
and merge_and_unload on a PEFT model of our layers (dense nn.Linear layers, one size warning, LoRA and DoRA)."""

import copy
import functools
import math
import warnings

import aqlm
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import aqlm_lora
from aqlm_lora import AqlmLoraLinear
from aqlm_lora.lora.merge import merge_and_unload
from tests.lora.test_dora import build
from tests.support.layers import (
    IN_FEATURES,
    SCHEME_IDS,
    SCHEMES,
    dense_peft_twin,
    edit_adapters,
    lora_config,
    make_quantized_linear,
)
from tests.support.tolerances import assert_close_fp32


def lora_and_dora_layer(scheme) -> AqlmLoraLinear:
    """Active adapters in order: DoRA "a", plain "p", DoRA "b" (as PEFT merges them, one after another)."""
    layer = build(scheme, "multi")
    layer.update_layer("q", 2, lora_alpha=2, config=lora_config(r=2, lora_alpha=2, lora_bias=True))
    with torch.no_grad():
        layer.lora_B["q"].bias.normal_()
    layer.set_adapter(["a", "p", "b", "q"])
    return layer.eval()


def _snapshot(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_merge_then_unmerge_restores_the_quantized_layer(scheme):
    layer = lora_and_dora_layer(scheme)
    quantized = layer.get_base_layer()
    before = _snapshot(quantized)
    x = torch.randn(5, IN_FEATURES)
    with torch.no_grad():
        expected = layer(x)
        with pytest.warns(UserWarning, match=r"merged into a dense float32 copy .* MiB -> .* MiB"):
            layer.merge()
        assert layer.merged and layer.merged_adapters == ["a", "p", "b", "q"]
        dense = layer.get_base_layer()
        assert type(dense) is nn.Linear and dense.weight.dtype == torch.float32 and dense.bias is not None
        assert_close_fp32(layer(x), expected, what="merged output")
        layer.unmerge()
        assert not layer.merged and layer.merged_adapters == []
        assert layer.get_base_layer() is quantized
        assert all(torch.equal(v, before[k]) for k, v in quantized.state_dict().items())
        assert torch.equal(layer(x), expected)


def test_merged_weight_is_peft_merged_weight():
    """The dense weight equals PEFT's own merge of the same adapters into nn.Linear(dequantized W)."""
    layer = lora_and_dora_layer(SCHEMES[1])
    twin = dense_peft_twin(layer, torch.float32).eval()
    twin.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    assert_close_fp32(layer.get_base_layer().weight, twin.get_base_layer().weight, what="merged weight")
    assert_close_fp32(layer.get_base_layer().bias, twin.get_base_layer().bias, what="merged bias")


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=SCHEME_IDS[:2])
def test_lora_bias_before_a_dora_adapter_merges_without_changing_outputs(scheme):
    """DoRA rescales everything but the base bias, an earlier adapter's lora_bias included; PEFT's
    own merge leaves that bias unscaled (its merged outputs move by the DoRA factor times it)."""
    layer = lora_and_dora_layer(scheme)
    layer.set_adapter(["q", "a", "p", "b"])
    x = torch.randn(5, IN_FEATURES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = layer(x)
        layer.merge()
        assert_close_fp32(layer(x), expected, what="merged output")


def test_merging_one_by_one_equals_merging_together():
    together = lora_and_dora_layer(SCHEMES[0])
    apart = copy.deepcopy(together)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        together.merge()
        for name in ["a", "p", "b", "q"]:
            apart.merge(adapter_names=[name])
    assert apart.merged_adapters == together.merged_adapters
    assert torch.equal(apart.get_base_layer().weight, together.get_base_layer().weight)


def test_merged_layer_states():
    layer = lora_and_dora_layer(SCHEMES[1])
    x = torch.randn(4, IN_FEATURES)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge(adapter_names=["a"])
        assert layer.merged_adapters == ["a"]
        with pytest.raises(ValueError, match="merged adapters"):
            layer(x, adapter_names=["a", "p", "a", "__base__"])
        layer.enable_adapters(False)  # PEFT's contract: a disabled layer unmerges before running the base
        base_out = layer(x)
        assert not layer.merged and isinstance(layer.get_base_layer(), aqlm.QuantizedLinear)
        layer.enable_adapters(True)
        layer.set_adapter(["a"])
        assert (layer(x) - base_out).abs().max() > 1e-3
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()


def test_safe_merge_refuses_nan_and_leaves_the_layer_as_it_was():
    layer = lora_and_dora_layer(SCHEMES[0])
    with torch.no_grad():
        layer.lora_B["p"].weight[0, 0] = math.nan
    quantized = layer.get_base_layer()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert not layer.merged and layer.get_base_layer() is quantized


def test_merge_dtype_and_a_lora_bias_without_base_bias():
    """A LoRA bias on a bias-less AQLM layer: the dense layer gets a bias (PEFT's dense merge cannot)."""
    base = make_quantized_linear(SCHEMES[1], bias=False).to(torch.bfloat16)
    layer = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=lora_config(lora_bias=True))
    with torch.no_grad():
        layer.lora_B["a"].bias.normal_()
    x = torch.randn(3, IN_FEATURES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = layer(x)
        layer.merge()
        dense = layer.get_base_layer()
        assert dense.weight.dtype == torch.bfloat16 and dense.bias is not None
        got = layer(x)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


# ---------------------------------------------------------------------------------------------
# merge_and_unload on a model


@functools.lru_cache(maxsize=1)
def _tiny_aqlm_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.layers import TINY_LLAMA

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    aqlm_lora.quantize_model(model, "2x8", progress=False, rounds=1, kmeans_iters=2)
    return model


def tiny_model(dora: bool):
    """A PEFT model (register) of a tiny Llama quantized to 2x8 (done once), random adapters."""
    model = copy.deepcopy(_tiny_aqlm_model())
    torch.manual_seed(1)
    targets = ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, aqlm_lora.register(config))
    edit_adapters(peft_model, lambda p: p.mul_(0.1), lambda p: p.mul_(1.1))
    return peft_model.eval()


def logits_then_merge(peft_model: nn.Module) -> tuple:
    """``(ids, logits before, merge_and_unload()'s model, the warnings it gave as strings)``."""
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = peft_model.merge_and_unload()
    return ids, expected, merged, [str(w.message) for w in caught]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unload_gives_dense_layers_and_the_same_outputs(dora, tmp_path):
    ids, expected, merged, caught = logits_then_merge(tiny_model(dora))
    grew = [w for w in caught if "the model grows from" in w]
    assert len(grew) == 1, caught
    assert "6 AQLM layers became dense nn.Linear (float32)" in grew[0]
    assert not any("merged into a dense" in w for w in caught), "one warning, not one per layer"
    layers = dict(merged.named_modules())
    for name, module in layers.items():
        if name.endswith(("q_proj", "v_proj", "down_proj")):
            assert type(module) is nn.Linear and module.weight.dtype == torch.float32, name
        elif name.endswith(("k_proj", "o_proj", "gate_proj", "up_proj")):
            assert isinstance(module, aqlm.QuantizedLinear), name
    with torch.no_grad():
        assert_close_fp32(merged(input_ids=ids).logits, expected, rtol=1e-5, what="merged logits")
    assert_reloads_as_saved(merged, ids, expected, tmp_path / "merged")


def assert_reloads_as_saved(model: nn.Module, ids, expected, path) -> None:
    """The config lists q_proj (merged, dense) as not quantized; saved and reloaded through
    transformers, q_proj is dense, k_proj AQLM, and the logits are ``expected``."""
    from transformers import AutoModelForCausalLM

    listed = model.config.quantization_config.linear_weights_not_to_quantize
    assert "model.layers.0.self_attn.q_proj.weight" in listed
    model.save_pretrained(str(path))
    loaded = AutoModelForCausalLM.from_pretrained(str(path))
    aqlm_lora.use_fused_kernels(loaded)
    assert type(loaded.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, aqlm.QuantizedLinear)
    with torch.no_grad():
        assert_close_fp32(loaded(input_ids=ids).logits, expected, rtol=1e-5, what="reloaded logits")


def test_merge_and_unload_in_another_dtype():
    peft_model = tiny_model(dora=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_and_unload(copy.deepcopy(peft_model), dtype=torch.bfloat16)
    assert sum("the model grows from" in str(w.message) for w in caught) == 1
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == torch.bfloat16
    assert getattr(merged.config, "quantization_config", None) is not None  # k_proj & co. are still AQLM


def test_model_without_aqlm_left_drops_the_quantization_config():
    model = copy.deepcopy(_tiny_aqlm_model())
    config = aqlm_lora.register(LoraConfig(r=2, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = get_peft_model(model, config).merge_and_unload()
    assert not any(isinstance(m, aqlm.QuantizedLinear) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None


@pytest.mark.parametrize("path", ["merge_and_unload", "peft_merge_and_unload", "merge_and_quantize"])
def test_codes_aqlm_permuted_are_saved_in_the_checkpoint_layout(path):
    """aqlm's own first CPU forward permutes 8-bit codes in place; the AQLM layers a merge leaves are
    saved next, and permuted codes would not load (or, for a square grid of groups, load wrong)."""
    from aqlm_lora.lora.requantize import merge_and_quantize

    model = copy.deepcopy(_tiny_aqlm_model())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, aqlm.QuantizedLinear)}
    original = {n: m.codes.clone() for n, m in layers.items()}
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 2, dtype=torch.long))  # aqlm's forward, not ours
    assert all(m.codes.shape == original[n].shape[::-1][1:] + original[n].shape[2:] for n, m in layers.items())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, aqlm_lora.register(config))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge = {
            "merge_and_unload": merge_and_unload,
            "peft_merge_and_unload": lambda model: model.merge_and_unload(),
            "merge_and_quantize": functools.partial(merge_and_quantize, rounds=1),
        }[path]
        merged = merge(peft_model)
    left = {n: m for n, m in merged.named_modules() if isinstance(m, aqlm.QuantizedLinear) and "q_proj" not in n}
    assert left and all(torch.equal(m.codes, original[n]) and m.gemv_op is None for n, m in left.items())


def test_unload_after_merge_adapter_saves_a_checkpoint_that_reloads(tmp_path):
    """unload() keeps layers merged earlier by merge_adapter() dense (PEFT does so too); the config
    must list them, or transformers reloaded them as uninitialized AQLM layers (NaN logits)."""

    peft_model = tiny_model(dora=False)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.merge_adapter()
        unloaded = peft_model.unload()
    assert type(unloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(unloaded.model.layers[0].self_attn.k_proj, aqlm.QuantizedLinear)
    assert_reloads_as_saved(unloaded, ids, expected, tmp_path / "unloaded")


@pytest.mark.parametrize("codebooks", [torch.float16, torch.bfloat16], ids=str)
def test_merged_model_runs_on_its_old_inputs_with_low_precision_codebooks(codebooks):
    """Codebooks in half precision inside a float32 model: the merged layers take the model's dtype
    (they took the codebooks' one and then refused the float32 activations: 'mat1 and mat2 must
    have the same dtype')."""
    peft_model = tiny_model(dora=True)
    for module in peft_model.modules():
        if isinstance(module, aqlm.QuantizedLinear):
            module.codebooks.data = module.codebooks.data.to(codebooks)
    ids, expected, merged, caught = logits_then_merge(peft_model)
    assert any("(float32)" in w and "grows from" in w for w in caught), caught
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert_close_fp32(merged(input_ids=ids).logits, expected, rtol=1e-5, what="merged logits")
