"""End to end with PEFT and transformers: dispatch, register, a tiny AQLM Llama loaded through
transformers' AQLM integration, training against the dense model, and adapter save/load."""

import math
import warnings

import aqlm
import pytest
import torch
from peft import (
    EvaConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    initialize_lora_eva_weights,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraModel
from peft.tuners.lora.aqlm import AqlmLoraLinear as PeftAqlmLoraLinear
from torch import nn
from transformers import AqlmConfig, AutoModelForCausalLM, LlamaForCausalLM

import aqlm_lora
from aqlm_lora import AqlmLoraLinear, dispatch_aqlm, register
from aqlm_lora.lora.fused_base import on_fused_kernels
from tests.support.layers import (
    TINY_LLAMA,
    Scheme,
    dense_weight,
    make_quantized_linear,
    tiny_aqlm_llama,
)
from tests.support.tolerances import assert_close_fp32

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = TINY_LLAMA
MODEL_SCHEMES = {"1x16g8": Scheme(1, 16), "2x8g8": Scheme(2, 8)}


def build_aqlm_llama(scheme: Scheme) -> LlamaForCausalLM:
    """A random tiny Llama whose linear layers (not lm_head) are aqlm.QuantizedLinear, with the
    transformers AQLM config that saves and reloads it."""
    model = tiny_aqlm_llama(scheme)
    model.config.quantization_config = AqlmConfig(
        in_group_size=scheme.in_group_size,
        out_group_size=scheme.out_group_size,
        num_codebooks=scheme.num_codebooks,
        nbits_per_codebook=scheme.nbits,
        # module names: transformers 5.24 matches these against module paths, so "lm_head.weight"
        # (the spelling of AQLM's hub checkpoints) would not keep lm_head dense
        linear_weights_not_to_quantize=["lm_head"],
    )
    return model


@pytest.fixture(scope="module", params=list(MODEL_SCHEMES), ids=list(MODEL_SCHEMES))
def checkpoint(request, tmp_path_factory):
    """(scheme, directory of a saved AQLM checkpoint, its state dict)."""
    model = build_aqlm_llama(MODEL_SCHEMES[request.param])
    path = tmp_path_factory.mktemp(f"aqlm_{request.param}")
    model.save_pretrained(path)
    return MODEL_SCHEMES[request.param], path, {k: v.clone() for k, v in model.state_dict().items()}


def load(path) -> LlamaForCausalLM:
    """The AQLM checkpoint through transformers' AQLM integration."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval()


def densify(model: nn.Module) -> nn.Module:
    """Replace every aqlm.QuantizedLinear by an nn.Linear holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, aqlm.QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = dense_weight(module).clone()
            if module.bias is not None:
                dense.bias.data = module.bias.data.clone()
            model.set_submodule(name, dense)
    return model


def batch(seed: int = 0, rows: int = 4, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAMA["vocab_size"], (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def is_aqlm(module: nn.Module) -> bool:
    return isinstance(module, aqlm.QuantizedLinear)


def lora_layers(model: nn.Module, cls=AqlmLoraLinear) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is cls]


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------------


def test_exports():
    assert aqlm_lora.AqlmLoraLinear is aqlm_lora.lora.layer.AqlmLoraLinear
    assert aqlm_lora.dispatch_aqlm is aqlm_lora.lora.dispatch.dispatch_aqlm
    assert aqlm_lora.register is aqlm_lora.lora.dispatch.register
    assert {"AqlmLoraLinear", "dispatch_aqlm", "register", "aqlm_lora_linear"} <= set(aqlm_lora.__all__)


def test_dispatch_aqlm():
    layer = make_quantized_linear(Scheme(2, 8))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1)
    new = dispatch_aqlm(layer, "a", config=config, r=4, lora_alpha=8, target_name="x.q_proj")
    assert type(new) is AqlmLoraLinear and new.get_base_layer() is layer
    assert new.scaling == {"a": 2.0} and new.lora_dropout["a"].p == 0.1
    old_style = dispatch_aqlm(layer, "a", lora_config=config, r=2, lora_alpha=8)
    assert type(old_style) is AqlmLoraLinear and old_style.r == {"a": 2}
    no_config = dispatch_aqlm(layer, "a", r=3, lora_alpha=6, use_rslora=True)
    assert no_config.r == {"a": 3} and no_config.scaling["a"] == pytest.approx(6 / math.sqrt(3))
    wrapped = dispatch_aqlm(new, "b", config=config, r=4, lora_alpha=8)
    assert type(wrapped) is AqlmLoraLinear and wrapped.get_base_layer() is layer
    assert dispatch_aqlm(nn.Linear(8, 8), "a", config=config, r=4) is None
    assert not hasattr(layer, "qweight"), "the base layer gained an attribute"


def test_register():
    config = LoraConfig(r=4)
    assert register(config) is config
    assert config._custom_modules == {aqlm.QuantizedLinear: AqlmLoraLinear}
    assert "_custom_modules" not in config.to_dict()
    with pytest.raises(TypeError, match="expects a peft.LoraConfig"):
        register({"r": 4})


def test_transformers_loads_the_aqlm_checkpoint(checkpoint):
    scheme, path, state = checkpoint
    model = load(path)
    assert isinstance(model.config.quantization_config, AqlmConfig)
    assert getattr(model, "hf_quantizer", None) is not None and model.is_quantized
    quantized = [n for n, m in model.named_modules() if isinstance(m, aqlm.QuantizedLinear)]
    assert len(quantized) == 7 * LLAMA["num_hidden_layers"] and type(model.lm_head) is nn.Linear
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert model.model.layers[0].self_attn.q_proj.codes.dtype == (torch.int8 if scheme.nbits == 8 else torch.int16)


def test_get_peft_model_uses_our_layer_only_when_registered(checkpoint):
    _, path, _ = checkpoint
    ours = get_peft_model(load(path), register(LoraConfig(r=4, target_modules=TARGETS)))
    assert len(lora_layers(ours)) == 7 * LLAMA["num_hidden_layers"]
    assert not lora_layers(ours, PeftAqlmLoraLinear)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    theirs = get_peft_model(load(path), LoraConfig(r=4, target_modules=TARGETS))
    assert len(lora_layers(theirs, PeftAqlmLoraLinear)) == 7 * LLAMA["num_hidden_layers"]
    assert get_peft_model_state_dict(ours).keys() == get_peft_model_state_dict(theirs).keys()


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_training_matches_dense_model(checkpoint, reentrant):
    """AdamW steps with activation checkpointing: same losses as PEFT's LoRA on the dequantized model."""
    _, path, _ = checkpoint
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="gaussian")
    ckpt = {"use_reentrant": reentrant}
    models = []
    for quantized in (True, False):
        base = load(path) if quantized else densify(load(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs=ckpt)
        lora = LoraConfig(**config)
        models.append(get_peft_model(base, register(lora) if quantized else lora))
    ours, dense = models
    assert len(lora_layers(ours)) == 14 and not lora_layers(dense)
    set_peft_model_state_dict(dense, get_peft_model_state_dict(ours))
    inputs = batch(seed=1)
    losses = {}
    for name, model in (("ours", ours), ("dense", dense)):
        model.train()
        assert model.base_model.model.is_gradient_checkpointing
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(6):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["ours"][-1] < losses["ours"][0] - 0.05, losses["ours"]
    for mine, theirs in zip(losses["ours"], losses["dense"]):
        assert mine == pytest.approx(theirs, rel=1e-4), (losses["ours"], losses["dense"])
    ours_state, dense_state = get_peft_model_state_dict(ours), get_peft_model_state_dict(dense)
    for key, value in ours_state.items():
        assert_close_fp32(value, dense_state[key], rtol=1e-4, what=key)
        if ".lora_B." in key:  # zero at init ("gaussian"): training moved it
            assert value.abs().max() > 1e-3, key


def test_dropout_training_with_checkpointing(checkpoint):
    _, path, _ = checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = prepare_model_for_kbit_training(load(path))
    model = get_peft_model(base, register(LoraConfig(r=4, lora_dropout=0.2, target_modules=TARGETS)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, losses = batch(seed=2), []
    for _ in range(5):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def _random_adapter(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_save_and_load_round_trip(checkpoint, tmp_path):
    _, path, _ = checkpoint
    inputs = batch(seed=3)
    model = get_peft_model(load(path), register(LoraConfig(r=4, lora_bias=True, target_modules=TARGETS)))
    _random_adapter(model)
    model.eval()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")

    config = register(LoraConfig.from_pretrained(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(load(path), tmp_path / "adapter", config=config)
    assert len(lora_layers(loaded)) == 14
    assert torch.equal(logits(loaded, inputs), expected)
    assert not any(p.requires_grad for p in loaded.parameters())

    # A further adapter: add it with a registered config, then load_adapter only fills in its weights.
    loaded.add_adapter("second", register(LoraConfig.from_pretrained(tmp_path / "adapter")))
    loaded.load_adapter(tmp_path / "adapter", adapter_name="second")
    loaded.set_adapter("second")
    assert len(lora_layers(loaded)) == 14 and not lora_layers(loaded, PeftAqlmLoraLinear)
    assert torch.equal(logits(loaded, inputs), expected)

    trainable = PeftModel.from_pretrained(
        load(path),
        tmp_path / "adapter",
        config=register(LoraConfig.from_pretrained(tmp_path / "adapter")),
        is_trainable=True,
    )
    trainable.train()
    trainable(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in trainable.named_parameters() if ".lora_" in n)

    # Without `register` PEFT does not know our layer (the registration is not saved): its own layer loads.
    plain = PeftModel.from_pretrained(load(path), tmp_path / "adapter")
    assert not lora_layers(plain) and len(lora_layers(plain, PeftAqlmLoraLinear)) == 14


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_low_cpu_mem_usage_loading(checkpoint, tmp_path, use_dora):
    """PEFT builds the adapters on meta and assigns the saved tensors: DoRA's init must not compute
    norms from meta weights (it raised 'input must be on cpu ..., got meta')."""
    _, path, _ = checkpoint
    inputs = batch(seed=4)
    config = LoraConfig(r=4, lora_bias=not use_dora, use_dora=use_dora, target_modules=TARGETS)
    model = get_peft_model(load(path), register(config))
    _random_adapter(model)
    model.eval()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")

    def saved_config() -> LoraConfig:
        return register(LoraConfig.from_pretrained(tmp_path / "adapter"))

    loaded = PeftModel.from_pretrained(load(path), tmp_path / "adapter", config=saved_config(), low_cpu_mem_usage=True)
    assert len(lora_layers(loaded)) == 14
    assert not any(p.is_meta for p in loaded.parameters())
    assert_close_fp32(logits(loaded, inputs), expected, what="from_pretrained")
    loaded.load_adapter(tmp_path / "adapter", adapter_name="second", peft_config=saved_config(), low_cpu_mem_usage=True)
    loaded.set_adapter("second")
    assert len(lora_layers(loaded)) == 14 and not any(p.is_meta for p in loaded.parameters())
    assert_close_fp32(logits(loaded, inputs), expected, what="load_adapter")


def test_adapters_move_between_peft_layer_and_ours(checkpoint, tmp_path):
    """An adapter saved with PEFT's own AQLM layer loads into ours with the same outputs, and back."""
    _, path, _ = checkpoint
    inputs = batch(seed=4)
    theirs = get_peft_model(load(path), LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=TARGETS))
    _random_adapter(theirs)
    theirs.eval()
    their_logits = logits(theirs, inputs)  # aqlm's own CPU kernels (numba on one thread for 8-bit)
    theirs.save_pretrained(tmp_path / "theirs")

    config = register(LoraConfig.from_pretrained(tmp_path / "theirs"))
    ours = PeftModel.from_pretrained(load(path), tmp_path / "theirs", config=config)
    assert len(lora_layers(ours)) == 14
    our_logits = logits(ours, inputs)
    assert_close_fp32(our_logits, their_logits, rtol=1e-4, what="PEFT's adapter in our layer")

    ours.save_pretrained(tmp_path / "ours")
    back = PeftModel.from_pretrained(load(path), tmp_path / "ours")
    assert len(lora_layers(back, PeftAqlmLoraLinear)) == 14
    assert_close_fp32(logits(back, inputs), our_logits, rtol=1e-4, what="our adapter in PEFT's layer")


def test_several_adapters_and_mixed_batch(checkpoint):
    _, path, _ = checkpoint
    inputs = batch(seed=5, rows=3)
    model = get_peft_model(load(path), register(LoraConfig(r=4, target_modules=TARGETS)), adapter_name="a")
    model.add_adapter("b", register(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])))
    _random_adapter(model)
    assert sum("b" in m.lora_A for m in lora_layers(model)) == 2 * LLAMA["num_hidden_layers"]
    model.eval()
    with model.disable_adapter():
        no_adapter = logits(model, inputs)
    model.set_adapter("a")
    only_a = logits(model, inputs)
    model.set_adapter("b")
    only_b = logits(model, inputs)
    mixed = logits(model, {**inputs, "adapter_names": ["a", "__base__", "b"]})
    assert_close_fp32(mixed[0], only_a[0], what="row a")
    assert_close_fp32(mixed[1], no_adapter[1], what="base row")
    assert_close_fp32(mixed[2], only_b[2], what="row b")
    assert (only_a - only_b).abs().max() > 1e-3
    model.base_model.set_adapter(["a", "b"])
    both = logits(model, inputs)
    assert (both - only_a).abs().max() > 1e-3 and (both - only_b).abs().max() > 1e-3
    model.delete_adapter("b")
    assert all(set(m.lora_A) == {"a"} for m in lora_layers(model))
    assert_close_fp32(logits(model, inputs), only_a, what="after deleting b")


def test_eva_initialization(checkpoint):
    _, path, _ = checkpoint
    config = LoraConfig(r=2, init_lora_weights="eva", eva_config=EvaConfig(rho=1.0), target_modules=TARGETS)
    model = get_peft_model(load(path), register(config))
    before = {n: p.clone() for n, p in model.named_parameters() if ".lora_A." in n}
    data = [batch(seed=s, rows=8, length=16) for s in range(6)]
    initialize_lora_eva_weights(model, dataloader=data, show_progress_bar=False)
    assert len(lora_layers(model)) == 14
    after = {n: p for n, p in model.named_parameters() if ".lora_A." in n}
    assert after.keys() == before.keys()
    assert all(not torch.equal(after[n], before[n]) for n in before)
    for layer in lora_layers(model):  # EVA's A rows are orthonormal right-singular vectors
        A = layer.lora_A["default"].weight
        assert_close_fp32(A @ A.T, torch.eye(A.shape[0]), rtol=1e-4, what="A A^T")
        assert not layer.lora_B["default"].weight.any()


def test_refused_configs_through_get_peft_model(checkpoint):
    _, path, _ = checkpoint
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*dense base weight"):
        get_peft_model(load(path), register(LoraConfig(r=4, init_lora_weights="pissa", target_modules=TARGETS)))
    unloaded = get_peft_model(load(path), register(LoraConfig(r=4, target_modules=TARGETS))).unload()
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, aqlm.QuantizedLinear)


# ---------------------------------------------------------------------------------------------
# AQLM layers the adapter does not target, and target_modules="all-linear" (register's injection hook)


def fused(model: nn.Module) -> list[bool]:
    """For each aqlm.QuantizedLinear of ``model`` (bare or inside a LoRA layer): on our kernels?"""
    return [on_fused_kernels(m) for m in model.modules() if isinstance(m, aqlm.QuantizedLinear)]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], None], ids=["q_v", "peft_default"])
def test_partial_targets_match_dense_model(checkpoint, targets):
    """Only q_proj/v_proj adapted (explicitly, or PEFT's Llama default): the other AQLM layers run on
    our kernels, so losses and gradients over AdamW steps equal PEFT's LoRA on the dequantized model."""
    _, path, _ = checkpoint
    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights="gaussian")
    ours = get_peft_model(load(path), register(LoraConfig(**config)))
    dense = get_peft_model(densify(load(path)), LoraConfig(**config))
    assert len(lora_layers(ours)) == 2 * LLAMA["num_hidden_layers"]
    assert fused(ours) == [True] * 7 * LLAMA["num_hidden_layers"]
    set_peft_model_state_dict(dense, get_peft_model_state_dict(ours))
    inputs = batch(seed=6)
    losses: dict = {"ours": [], "dense": []}
    for name, model in (("ours", ours), ("dense", dense)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(4):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            if step == 0:  # first-step gradients, before the weights move apart by rounding
                losses[name + "_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    for mine, theirs in zip(losses["ours"], losses["dense"]):
        assert mine == pytest.approx(theirs, rel=1e-5), (losses["ours"], losses["dense"])
    assert losses["ours"][-1] < losses["ours"][0]
    grads, dense_grads = losses["ours_grads"], losses["dense_grads"]
    assert grads.keys() == dense_grads.keys() and len(grads) == 4 * LLAMA["num_hidden_layers"]
    for key, grad in grads.items():
        assert_close_fp32(grad, dense_grads[key], rtol=1e-5, what=key)


def test_untargeted_layers_opt_out_and_restore(checkpoint):
    _, path, _ = checkpoint
    n = 7 * LLAMA["num_hidden_layers"]
    targeted = [".q_proj" in name or ".v_proj" in name for name, m in load(path).named_modules() if is_aqlm(m)]
    kept = get_peft_model(load(path), register(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), fused_base=False))
    assert fused(kept) == [False] * n
    model = get_peft_model(load(path), register(LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    assert fused(model) == [True] * n
    inputs = batch(seed=7)
    model.eval()
    expected = logits(model, inputs)
    assert aqlm_lora.restore_aqlm_kernels(model) == n
    assert fused(model) == [False] * n and len(lora_layers(model)) == sum(targeted)
    assert aqlm_lora.use_fused_kernels(model).patched and torch.equal(logits(model, inputs), expected)
    # a config without our registration goes to PEFT untouched
    plain = get_peft_model(load(path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert fused(plain) == [False] * n and lora_layers(plain, PeftAqlmLoraLinear)


def test_injection_hook_is_installed_once():
    register(LoraConfig(r=4))
    config = register(LoraConfig(r=4), fused_base=False)
    assert not [key for key in config.to_dict() if "aqlm" in key]  # the choice is not saved either
    hook = LoraModel.inject_adapter
    assert hook._aqlm_lora_hook and not getattr(hook.__wrapped__, "_aqlm_lora_hook", False)


def test_all_linear_targets_every_aqlm_layer(checkpoint, tmp_path):
    _, path, _ = checkpoint
    n = 7 * LLAMA["num_hidden_layers"]
    names = aqlm_lora.all_linear_targets(load(path))
    assert len(names) == n and "lm_head" not in names and all(name.startswith("model.layers.") for name in names)
    model = get_peft_model(load(path), register(LoraConfig(r=4, target_modules="all-linear")))
    assert len(lora_layers(model)) == n and type(model.base_model.model.lm_head) is nn.Linear
    assert sorted(model.peft_config["default"].target_modules) == sorted(names)
    explicit = get_peft_model(load(path), register(LoraConfig(r=4, target_modules=TARGETS)))
    assert get_peft_model_state_dict(model).keys() == get_peft_model_state_dict(explicit).keys()
    model.save_pretrained(tmp_path / "adapter")  # the saved config lists the layers
    assert sorted(LoraConfig.from_pretrained(tmp_path / "adapter").target_modules) == sorted(names)
    # a second adapter with "all-linear" finds the same layers inside our LoRA layers
    model.add_adapter("b", register(LoraConfig(r=2, target_modules="ALL-LINEAR")))
    assert all(set(m.lora_A) == {"default", "b"} for m in lora_layers(model))
    assert sorted(model.peft_config["b"].target_modules) == sorted(names)
    # without our registration PEFT's own expansion finds no AQLM layer (its message, not ours)
    with pytest.raises(ValueError):
        get_peft_model(load(path), LoraConfig(r=4, target_modules="all-linear"))


def test_all_linear_on_a_model_without_linear_layers():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 4)

    assert aqlm_lora.all_linear_targets(NoLinear()) == []
    with pytest.raises(ValueError, match="all-linear.*matches no layer of NoLinear"):
        get_peft_model(NoLinear(), register(LoraConfig(r=2, target_modules="all-linear")))
