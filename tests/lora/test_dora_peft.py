"""DoRA through PEFT on a tiny AQLM Llama: get_peft_model, training, save/load, several adapters,
disable_adapter, mixed batches, and the saved adapter in PEFT's own DoRA on the dequantized model."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import aqlm_lora
from aqlm_lora import AqlmLoraLinear
from tests.support.layers import SCHEMES, dense_copy, tiny_aqlm_llama
from tests.support.tolerances import assert_close_fp32

TARGETS = ["q_proj", "v_proj", "down_proj"]


def train_a_little(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DoRA adapter (dropout on, like a real run) trained a few steps on the tiny AQLM Llama, saved."""
    model = tiny_aqlm_llama(SCHEMES[1])
    dense = dense_copy(model)
    config = aqlm_lora.register(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True, target_modules=TARGETS))
    peft_model = get_peft_model(model, config)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    magnitudes = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n}
    train_a_little(peft_model, ids)
    path = tmp_path_factory.mktemp("dora") / "adapter"
    peft_model.save_pretrained(str(path))
    return peft_model, dense, ids, path, magnitudes


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_layers_are_ours_and_every_dora_tensor_trains(trained):
    peft_model, _, _, _, before = trained
    layers = [m for m in peft_model.modules() if isinstance(m, AqlmLoraLinear)]
    assert len(layers) == 2 * len(TARGETS)
    assert all("default" in layer.lora_magnitude_vector for layer in layers)
    after = {n: p for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n}
    assert after.keys() == before.keys() and all(p.requires_grad for p in after.values())
    assert all(not torch.equal(after[n].detach(), before[n]) for n in before), "m did not train"


def test_saved_adapter_has_peft_dora_keys(trained):
    from safetensors import safe_open

    _, _, _, path, _ = trained
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("q_proj.lora_magnitude_vector") for k in keys), keys


def test_reload_through_register_gives_the_same_outputs(trained):
    peft_model, _, ids, path, _ = trained
    config = aqlm_lora.register(LoraConfig.from_pretrained(str(path)))
    loaded = PeftModel.from_pretrained(tiny_aqlm_llama(SCHEMES[1]), str(path), config=config)
    assert_close_fp32(_logits(loaded.eval(), ids), _logits(peft_model, ids), what="reloaded logits")


def test_adapter_gives_the_same_outputs_in_peft_dora_on_the_dense_model(trained):
    peft_model, dense, ids, path, _ = trained
    theirs = PeftModel.from_pretrained(copy.deepcopy(dense), str(path)).eval()
    assert theirs.peft_config["default"].use_dora
    assert_close_fp32(_logits(peft_model, ids), _logits(theirs, ids), rtol=1e-4, what="logits vs PEFT dense DoRA")


def test_disable_adapter_gives_the_base_model(trained):
    peft_model, dense, ids, _, _ = trained
    with peft_model.disable_adapter():
        off = _logits(peft_model, ids)
    assert_close_fp32(off, _logits(dense.eval(), ids), rtol=1e-4, what="adapters disabled")


def test_several_adapters_and_mixed_batches(trained):
    """A second DoRA adapter; mixed batches with DoRA (which PEFT refuses) match running each row alone."""
    peft_model, dense, ids, path, _ = trained
    model = PeftModel.from_pretrained(
        tiny_aqlm_llama(SCHEMES[1]), str(path), config=aqlm_lora.register(LoraConfig.from_pretrained(str(path)))
    )
    second = aqlm_lora.register(
        LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    )
    model.add_adapter("second", second)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector.second" in name:
                p.mul_(1.2)
    model.eval()
    rows = {}
    for name in ("default", "second"):
        model.set_adapter(name)
        rows[name] = _logits(model, ids)
    assert (rows["default"] - rows["second"]).abs().max() > 1e-3
    with model.disable_adapter():
        rows["__base__"] = _logits(model, ids)
    pattern = ["second", "__base__"]
    mixed = _logits(model, ids, adapter_names=pattern)
    for i, name in enumerate(pattern):
        assert_close_fp32(mixed[i], rows[name][i], what=f"row {i} ({name})")
    # PEFT's dense model with the same two adapters
    model.save_pretrained(str(path.parent / "both"))
    theirs = PeftModel.from_pretrained(copy.deepcopy(dense), str(path.parent / "both" / "second"), "second")
    theirs.eval()
    assert_close_fp32(_logits(theirs, ids), rows["second"], rtol=1e-4, what="second adapter vs PEFT dense DoRA")
