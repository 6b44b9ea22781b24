"""The layer's caches (DoRA row norms, mixed-batch adapter stacks) never serve stale numbers: a new
tensor assigned in place of an adapter weight is seen, and PEFT's hotswap (which writes through
``.data``, bumping no version) clears them. The oracle is PEFT on the dequantized dense model, float64."""

import inspect

import numpy as np
import peft.utils.hotswap
import pytest
import torch
from peft import LoraConfig
from torch import nn

from aqlm_lora import AqlmLoraLinear, register
from tests.support.layers import (
    IN_FEATURES,
    SCHEMES,
    dense_peft_twin,
    lora_config,
    make_quantized_linear,
    mixed_rows_output,
    peft_model_pair,
    random_adapter_state,
)
from tests.support.tolerances import FP64_RTOL, assert_close_fp32

TARGETS = ["q_proj", "v_proj", "down_proj"]
MIXED = ["p", "__base__", "q"]  # (names inside "lora_" would warn in PEFT)


def assert_exact(actual, expected, what=""):
    assert_close_fp32(actual, expected, rtol=FP64_RTOL, what=what)


def hotswap_from_dir(model: nn.Module, path, name: str) -> None:
    peft.utils.hotswap.hotswap_adapter(model, str(path), adapter_name=name, torch_device="cpu")


def hotswap_from_state(model: nn.Module, state: dict, name: str, use_dora: bool) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora)
    peft.utils.hotswap.hotswap_adapter_from_state_dict(model, {k: v.clone() for k, v in state.items()}, name, config)


# PEFT's hotswap_adapter cannot load a saved DoRA adapter (its magnitude key lacks ".weight"), on
# dense models too: DoRA through hotswap_adapter_from_state_dict only.
@pytest.mark.parametrize("case, how", [("mixed", "state_dict"), ("mixed", "directory"), ("dora", "state_dict")])
def test_hotswap_gives_the_new_adapter(case, how, tmp_path):
    """After a swap the outputs are the new adapter's (they were the old one's: stale caches)."""
    use_dora = case == "dora"
    ours, theirs = peft_model_pair(TARGETS, use_dora, ["p", "q"] if case == "mixed" else ["p"])
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    kwargs = {"adapter_names": MIXED} if case == "mixed" else {}
    with torch.no_grad():
        assert_exact(ours(input_ids=ids, **kwargs).logits, theirs(input_ids=ids, **kwargs).logits, what="before")
        state = random_adapter_state(theirs, "p", seed=11)
        if how == "directory":  # hotswap_adapter loads a saved adapter
            old = {key: value.clone() for key, value in theirs.state_dict().items() if key in state}
            theirs.load_state_dict(state, strict=False)
            theirs.save_pretrained(str(tmp_path), selected_adapters=["p"])
            theirs.load_state_dict(old, strict=False)
        for model in (ours, theirs):
            if how == "state_dict":
                hotswap_from_state(model, state, "p", use_dora)
            else:
                hotswap_from_dir(model, tmp_path / "p", "p")
        after = ours(input_ids=ids, **kwargs).logits
        assert_exact(after, theirs(input_ids=ids, **kwargs).logits, what="after the swap")


def test_hotswap_wrapper_is_installed_once_and_keeps_the_signature():
    register(LoraConfig(r=4))
    register(LoraConfig(r=4))
    wrapper = peft.utils.hotswap.hotswap_adapter_from_state_dict
    assert wrapper._aqlm_lora_hook and not getattr(wrapper.__wrapped__, "_aqlm_lora_hook", False)
    assert inspect.signature(wrapper) == inspect.signature(wrapper.__wrapped__)


@pytest.mark.parametrize("case", ["mixed", "dora"])
def test_a_new_parameter_in_place_of_the_old_one_is_seen(case):
    """A new tensor object at the old one's address with the old one's version (what the allocator
    does when the old one was freed; made deterministic here by sharing its memory through numpy)."""
    base = make_quantized_linear(SCHEMES[1], dtype=torch.float64)
    ours = AqlmLoraLinear(base, "p", r=4, lora_alpha=8, config=lora_config(use_dora=case == "dora"))
    if case == "mixed":
        ours.update_layer("q", 6, lora_alpha=3, config=lora_config(r=6, lora_alpha=3))
    ours.double().eval()
    shape = ours.lora_B["p"].weight.shape
    memory = np.random.default_rng(0).standard_normal(shape)
    ours.lora_B["p"].weight = nn.Parameter(torch.from_numpy(memory), requires_grad=False)
    x = torch.randn(3, IN_FEATURES, dtype=torch.float64)
    names = MIXED if case == "mixed" else None
    with torch.no_grad():
        ours(x, adapter_names=names)  # caches keyed on the first tensor
        memory[:] = np.random.default_rng(1).standard_normal(shape)  # its memory, no version bump
        ours.lora_B["p"].weight = nn.Parameter(torch.from_numpy(memory), requires_grad=False)
        out = ours(x, adapter_names=names)
        twin = dense_peft_twin(ours)
        want = mixed_rows_output(twin, x, names) if case == "mixed" else twin(x)
    assert_exact(out, want)


def test_clear_caches_after_writes_through_data():
    ours = AqlmLoraLinear(make_quantized_linear(SCHEMES[0]), "p", r=4, config=lora_config(use_dora=True))
    ours.update_layer("q", 4, lora_alpha=8, config=lora_config())
    ours.double().eval()
    x = torch.randn(3, IN_FEATURES, dtype=torch.float64)
    with torch.no_grad():
        ours(x), ours(x, adapter_names=MIXED)
        ours.lora_B["p"].weight.data.normal_()
        ours.lora_B["q"].weight.data.normal_()
        ours.clear_caches()
        twin = dense_peft_twin(ours)
        assert_exact(ours(x), twin(x), what="DoRA")
        assert_exact(ours(x, adapter_names=MIXED), mixed_rows_output(twin, x, MIXED), what="mixed")


def cached_layer() -> AqlmLoraLinear:
    """A float64 layer with a DoRA adapter "p" and a plain one "q", in eval mode."""
    ours = AqlmLoraLinear(make_quantized_linear(SCHEMES[1]), "p", r=4, config=lora_config(use_dora=True))
    ours.update_layer("q", 4, lora_alpha=8, config=lora_config())
    ours.double().eval()
    with torch.no_grad():
        for name in ("p", "q"):
            ours.lora_B[name].weight.normal_()
    return ours


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_layer_with_filled_caches_can_be_saved_and_copied(how, tmp_path):
    """The caches' keys hold weak references, which pickle refused (a DoRA model could not be
    torch.save'd at all): a copy starts with empty caches and gives the same outputs."""
    ours = cached_layer()
    x = torch.randn(3, IN_FEATURES, dtype=torch.float64)
    with torch.no_grad():
        want = ours(x), ours(x, adapter_names=MIXED)  # fills the DoRA norms and the mixed stacks
    if how == "torch.save":
        torch.save(ours, tmp_path / "layer.pt")
        copy = torch.load(tmp_path / "layer.pt", weights_only=False)
    else:
        import copy as copy_module

        copy = copy_module.deepcopy(ours)
    with torch.no_grad():
        assert torch.equal(copy(x), want[0]) and torch.equal(copy(x, adapter_names=MIXED), want[1])
        copy.lora_B["p"].weight.mul_(2)  # the copy's caches follow its own tensors
        copy.lora_B["q"].weight.mul_(2)
        twin = dense_peft_twin(copy)
        assert_exact(copy(x), twin(x), what="copy, DoRA")
        assert_exact(copy(x, adapter_names=MIXED), mixed_rows_output(twin, x, MIXED), what="copy, mixed")


def test_norms_cached_under_inference_mode_do_not_break_a_later_backward():
    """A forward under inference_mode cached inference tensors; a later eval forward with grad saved
    them for backward (RuntimeError: Inference tensors cannot be saved for backward)."""
    ours, fresh = cached_layer(), cached_layer()
    fresh.load_state_dict(ours.state_dict())
    x = torch.randn(3, IN_FEATURES, dtype=torch.float64)
    with torch.inference_mode():
        ours(x), ours(x, adapter_names=MIXED)
    grads = []
    for layer in (ours, fresh):
        (layer(x).sum() + layer(x, adapter_names=MIXED).sum()).backward()
        grads.append({name: p.grad for name, p in layer.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_deleting_adapters_empties_their_caches():
    """The norms cache is keyed by adapter name: 300 adapters added and deleted in eval left 300
    entries (4.7 MiB on a 4096-wide layer) until the next train()."""
    ours = cached_layer()
    x = torch.randn(3, IN_FEATURES, dtype=torch.float64)
    for i in range(5):
        ours.update_layer(f"t{i}", 4, lora_alpha=8, config=lora_config(use_dora=True))
        ours.double()
        ours.set_adapter([f"t{i}"])
        with torch.no_grad():
            ours(x), ours(x, adapter_names=["p", f"t{i}", "q"])
        ours.delete_adapter(f"t{i}")
    assert set(ours.dora_norms._adapters) <= {"p"}
    assert ours._adapter_stack._stacked is None
    ours.set_adapter("p")
    with torch.no_grad():
        twin = dense_peft_twin(ours)
        assert_exact(ours(x), twin(x), what="after the deletions")
