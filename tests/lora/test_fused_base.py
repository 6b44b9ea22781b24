"""``aqlm_lora.use_fused_kernels`` / ``restore_aqlm_kernels``: a whole model's AQLM layers on our
kernels without PEFT (inference, backward, ``generate()``) against the dense-dequantized model, and
the patch undone exactly (also around aqlm's in-place code permutation and accelerate's hooks)."""

import copy
import pickle

import aqlm
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

import aqlm_lora
from aqlm_lora.app import train
from aqlm_lora.lora.fused_base import FusedKernels, on_fused_kernels, restore_aqlm_kernels, use_fused_kernels
from tests.support.layers import (
    TINY_LLAMA,
    Scheme,
    dense_weight,
    make_quantized_linear,
    tiny_aqlm_llama,
)
from tests.support.tolerances import assert_close_fp32

LLAMA = TINY_LLAMA
SCHEMES = {"1x16g8": Scheme(1, 16), "2x8g8": Scheme(2, 8)}
AQLM_LAYERS = 7 * LLAMA["num_hidden_layers"]


def build(scheme: Scheme) -> LlamaForCausalLM:
    """A random tiny Llama whose linear layers but lm_head are aqlm.QuantizedLinear (never run)."""
    return tiny_aqlm_llama(scheme).eval()


def densify(model: nn.Module) -> nn.Module:
    """A copy with every aqlm.QuantizedLinear replaced by nn.Linear holding aqlm's dequantized weight."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, aqlm.QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=False)
            dense.weight.data = dense_weight(module).clone()
            dense.requires_grad_(False)  # as the AQLM tensors: only the rest of the model trains
            model.set_submodule(name, dense)
    return model


def aqlm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, aqlm.QuantizedLinear)]


def ids(seed: int = 0, rows: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: nn.Module, tokens: torch.Tensor) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------


def test_exports():
    assert aqlm_lora.use_fused_kernels is use_fused_kernels
    assert aqlm_lora.restore_aqlm_kernels is restore_aqlm_kernels
    assert aqlm_lora.FusedKernels is FusedKernels
    assert {"use_fused_kernels", "restore_aqlm_kernels", "FusedKernels"} <= set(aqlm_lora.__all__)
    assert train.use_fused_base is use_fused_kernels  # the training helpers' old name


@pytest.mark.parametrize("scheme", list(SCHEMES), ids=list(SCHEMES))
def test_inference_and_backward_without_peft_match_dense(scheme):
    model = build(SCHEMES[scheme])
    dense = densify(model)
    handle = use_fused_kernels(model)
    assert handle.count == len(handle.patched) == AQLM_LAYERS
    assert all(on_fused_kernels(m) for m in aqlm_layers(model))
    tokens = ids()
    with torch.no_grad():
        assert_close_fp32(model(input_ids=tokens).logits, dense(input_ids=tokens).logits, rtol=1e-5, what="logits")
    model.train(), dense.train()
    loss, grads = loss_and_grads(model, tokens)
    dense_loss, dense_grads = loss_and_grads(dense, tokens)
    assert loss == pytest.approx(dense_loss, rel=1e-5)
    assert grads.keys() == dense_grads.keys() and "model.embed_tokens.weight" in grads
    for name, grad in grads.items():  # the embedding's gradient went back through every AQLM layer
        assert_close_fp32(grad, dense_grads[name], rtol=1e-5, what=name)


@pytest.mark.parametrize("scheme", list(SCHEMES), ids=list(SCHEMES))
def test_generate_matches_dense(scheme):
    model = build(SCHEMES[scheme])
    dense = densify(model)
    use_fused_kernels(model)
    prompt = ids(seed=1, rows=2, length=5)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours, theirs = model.generate(prompt, **kwargs), dense.generate(prompt, **kwargs)
    assert ours.shape == (2, 17) and torch.equal(ours, theirs)


def test_restore_and_context_manager():
    model = build(SCHEMES["2x8g8"])
    layers = aqlm_layers(model)
    with use_fused_kernels(model) as handle:
        assert handle.count == AQLM_LAYERS and all(on_fused_kernels(m) for m in layers)
        again = use_fused_kernels(model)  # already patched: nothing to do, nothing to undo
        assert again.count == AQLM_LAYERS and again.patched == () and again.restore() == 0
        assert all(on_fused_kernels(m) for m in layers)
    assert not any(on_fused_kernels(m) or "forward" in vars(m) for m in layers)
    assert handle.restore() == 0  # undone once only
    assert use_fused_kernels(model).count == AQLM_LAYERS
    assert restore_aqlm_kernels(model) == AQLM_LAYERS and restore_aqlm_kernels(model) == 0
    assert all(type(m).forward is aqlm.QuantizedLinear.forward and "forward" not in vars(m) for m in layers)
    assert use_fused_kernels(nn.Sequential(nn.Linear(2, 2))).count == 0


def test_restore_puts_back_an_earlier_instance_forward():
    layer = make_quantized_linear(Scheme(2, 8), bias=True)
    mine = lambda x: x  # noqa: E731  (someone else's instance-level forward)
    layer.forward = mine
    handle = use_fused_kernels(layer)
    assert handle.count == 1 and on_fused_kernels(layer)
    x = torch.randn(3, layer.in_features)
    assert_close_fp32(layer(x), F.linear(x, dense_weight(layer), layer.bias), what="patched")
    handle.restore()
    assert layer.forward is mine


def test_codes_as_stored_and_after_aqlm_permuted_them():
    """aqlm's own first CPU forward permutes 8-bit codes in place; ours reads either layout and
    never writes them."""
    layer = make_quantized_linear(Scheme(2, 8), bias=True)
    x = torch.randn(4, layer.in_features)
    expected = F.linear(x, dense_weight(layer), layer.bias)
    stored = layer.codes.detach().clone()
    with use_fused_kernels(layer):
        assert_close_fp32(layer(x), expected, what="fresh codes")
    assert torch.equal(layer.codes, stored)  # our forward left them alone
    with torch.no_grad():
        layer(x[:1])  # aqlm's forward (numba on one thread): permutes the codes
    assert layer.codes.shape != stored.shape
    permuted = layer.codes.detach().clone()
    with use_fused_kernels(layer):
        assert_close_fp32(layer(x), expected, what="permuted codes")
    assert torch.equal(layer.codes, permuted)


def test_deepcopy_and_pickle_keep_the_patch_on_the_copy():
    layer = make_quantized_linear(Scheme(1, 16), bias=True)
    use_fused_kernels(layer)
    x = torch.randn(2, layer.in_features)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert on_fused_kernels(clone) and vars(clone)["forward"].layer is clone
        with torch.no_grad():
            clone.scales.mul_(2)  # the copy computes with its own tensors
        assert_close_fp32(clone(x), F.linear(x, dense_weight(clone), clone.bias), what="copy")
    assert_close_fp32(layer(x), F.linear(x, dense_weight(layer), layer.bias), what="original")


def test_accelerate_hooks_keep_working():
    """accelerate's hooks move the real forward to ``_old_forward``; ours replaces that one."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    x = torch.randn(2, 64)
    for patch_first in (False, True):
        layer = make_quantized_linear(Scheme(2, 8), bias=True)
        expected = F.linear(x, dense_weight(layer), layer.bias)
        if patch_first:
            handle = use_fused_kernels(layer)
        add_hook_to_module(layer, Count())
        if not patch_first:
            handle = use_fused_kernels(layer)
        assert on_fused_kernels(layer)
        calls = Count.calls
        assert_close_fp32(layer(x), expected, what=f"hooked, patch_first={patch_first}")
        assert Count.calls == calls + 1
        handle.restore()
        assert not on_fused_kernels(layer)
        assert layer._old_forward.__func__ is aqlm.QuantizedLinear.forward  # the hook still has a forward
        remove_hook_from_module(layer)
        assert "forward" not in vars(layer) or not on_fused_kernels(layer)
