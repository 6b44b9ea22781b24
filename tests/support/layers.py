"""Helpers for the layer and PEFT-integration tests: random AQLM layers, our LoRA layer on them in
the adapter setups the tests sweep, PEFT's own layer on a deterministic dense base (the oracle),
gradient collection and a tiny AQLM Llama. The tolerance rules are in tests/support/tolerances.py."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Optional

import aqlm
import torch
import torch.nn.functional as F
from aqlm.utils import _dequantize_weight, unpack_int_data
from peft import LoraConfig
from peft.tuners.lora.aqlm import AqlmLoraLinear as PeftAqlmLoraLinear
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import Tensor, nn

from aqlm_lora import AqlmLoraLinear
from tests.support.weights import SCHEME_IDS, SCHEMES, Scheme  # noqa: F401  (one scheme list for all tests)

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
# out_features spans several of the CPU kernels' row blocks (and a partial one)
IN_FEATURES, OUT_FEATURES = 64, 160


def make_quantized_linear(
    scheme: Scheme,
    in_features: int = IN_FEATURES,
    out_features: int = OUT_FEATURES,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    seed: int = 0,
) -> aqlm.QuantizedLinear:
    """An ``aqlm.QuantizedLinear`` with codes over the full range of their dtype and random codebooks."""
    layer = aqlm.QuantizedLinear(
        in_features,
        out_features,
        **scheme.aqlm_kwargs(),
        bias=bias,
        device="cpu",
        dtype=dtype,
    )
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(layer.codes.dtype)
    with torch.no_grad():
        codes = torch.randint(info.min, info.max + 1, layer.codes.shape, generator=g, dtype=torch.int64)
        layer.codes.copy_(codes.to(layer.codes.dtype))
        std = 1.0 / math.sqrt(scheme.num_codebooks * scheme.in_group_size)
        layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=g) * std)
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=g) + 0.5)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=g))
    return layer


def dense_weight(layer: aqlm.QuantizedLinear, dtype: Optional[torch.dtype] = None) -> Tensor:
    """aqlm's own dequantization of a pristine (never-run) layer, computed in ``dtype``."""
    dtype = dtype or layer.codebooks.dtype
    codes = unpack_int_data(layer.codes.data, layer.nbits_per_codebook)
    return _dequantize_weight(codes, layer.codebooks.data.to(dtype), layer.scales.data.to(dtype))


def use_dense_forward(layer: aqlm.QuantizedLinear, dtype: Optional[torch.dtype] = None) -> aqlm.QuantizedLinear:
    """Replace ``layer.forward`` by ``F.linear`` with its dequantized weight: aqlm's CPU math without
    its racy numba kernel, its fp32-only assertion or its in-place code permutation."""
    weight = dense_weight(layer, dtype)
    bias = None if layer.bias is None else layer.bias.data.to(weight.dtype)

    def forward(x: Tensor) -> Tensor:
        return F.linear(x, weight, bias)

    layer.forward = forward
    return layer


def lora_config(**kwargs) -> LoraConfig:
    defaults = dict(r=4, lora_alpha=8, init_lora_weights=False)
    defaults.update(kwargs)
    return LoraConfig(**defaults)


# Adapter setups of lora_layer: one adapter; rsLoRA with a LoRA bias; two active adapters; two
# adapters picked per row (adapter_names); adapters disabled.
MODES = ["single", "rslora_bias", "multi", "mixed", "disabled"]


def lora_layer(
    scheme: Scheme, mode: str = "single", dtype: torch.dtype = torch.float32, bias: bool = True
) -> AqlmLoraLinear:
    """Our layer on a random AQLM layer (``mode`` one of MODES): adapter "a" (r=4, alpha=8) and, in
    the multi and mixed modes, "b" (r=6, alpha=3); every LoRA bias is random, not zero."""
    base = make_quantized_linear(scheme, bias=bias)
    special = mode == "rslora_bias"
    layer = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=lora_config(use_rslora=special, lora_bias=special))
    if mode in ("multi", "mixed"):
        layer.update_layer("b", 6, lora_alpha=3, config=lora_config(r=6, lora_alpha=3, lora_bias=True))
        with torch.no_grad():
            layer.lora_B["b"].bias.normal_()
    if special:
        with torch.no_grad():
            layer.lora_B["a"].bias.normal_()
    if mode == "multi":
        layer.set_adapter(["a", "b"])
    if mode == "disabled":
        layer.enable_adapters(False)
    return layer.to(dtype)


def dropout_layer(p: float) -> AqlmLoraLinear:
    """Our layer on a 2x8 AQLM layer with adapter "a" (r=4, alpha=8, random LoRA bias) and LoRA dropout ``p``."""
    layer = AqlmLoraLinear(
        make_quantized_linear(SCHEMES[1]), "a", r=4, lora_alpha=8, config=lora_config(lora_dropout=p, lora_bias=True)
    )
    with torch.no_grad():
        layer.lora_B["a"].bias.normal_()
    return layer


def peft_twin(ours: nn.Module, dtype: Optional[torch.dtype] = None, dense_base: bool = True) -> PeftAqlmLoraLinear:
    """PEFT's own AqlmLoraLinear with the same adapters and weights as ``ours``, on a copy of its base.

    With ``dtype`` every float tensor (base and adapters) is cast to it; with ``dense_base`` the
    base computes with the dense dequantized weight (in ``dtype``).
    """
    base = copy.deepcopy(ours.get_base_layer())
    if dtype is not None:
        base.to(dtype)
    if dense_base:
        use_dense_forward(base)
    return twin_of(ours, PeftAqlmLoraLinear, base, dtype)


def twin_of(ours: nn.Module, layer_class: type, base: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``layer_class`` (a PEFT LoRA layer) on ``base`` with ours' adapters, weights, active set and mode."""
    names = list(ours.lora_A.keys())
    first = names[0]
    twin = layer_class(base, first, config=config_of(ours, first), r=ours.r[first], lora_alpha=ours.lora_alpha[first])
    for name in names[1:]:
        twin.update_layer(name, ours.r[name], lora_alpha=ours.lora_alpha[name], config=config_of(ours, name))
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("base_layer.")}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("base_layer.") for k in missing), (missing, unexpected)
    if dtype is not None:
        for module in (twin.lora_A, twin.lora_B, twin.lora_magnitude_vector):
            module.to(dtype)
    twin.set_adapter(list(ours.active_adapters))
    twin.enable_adapters(not ours.disable_adapters)
    twin.train(ours.training)
    return twin


def dense_peft_twin(ours: nn.Module, dtype: Optional[torch.dtype] = None) -> PeftLinear:
    """PEFT's ``lora.Linear`` on an ``nn.Linear`` holding ours' dequantized weight, with ours' adapters,
    active set and mode, everything in ``dtype`` (default: the codebooks' dtype): the dense oracle."""
    base = ours.get_base_layer()
    dtype = dtype or base.codebooks.dtype
    dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(dense_weight(base, dtype))
        if base.bias is not None:
            dense.bias.copy_(base.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return twin_of(ours, PeftLinear, dense, dtype)


def config_of(layer: nn.Module, name: str) -> LoraConfig:
    """The LoraConfig that rebuilds adapter ``name`` of ``layer`` (LoRA or DoRA)."""
    dropout = layer.lora_dropout[name]
    return LoraConfig(
        r=layer.r[name],
        lora_alpha=layer.lora_alpha[name],
        lora_dropout=float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0,
        use_rslora=layer.use_rslora[name],
        use_dora=name in layer.lora_magnitude_vector,
        lora_bias=layer.lora_bias[name],
        init_lora_weights=False,
    )


def adapter_params(layer: nn.Module) -> dict[str, Tensor]:
    """Trainable adapter tensors (A, B, DoRA's magnitudes) by state-dict name."""
    prefixes = ("lora_A.", "lora_B.", "lora_magnitude_vector.")
    return {n: p for n, p in layer.named_parameters() if n.startswith(prefixes)}


def run_with_grads(layer: nn.Module, x: Tensor, grad_out: Optional[Tensor] = None, **kwargs):
    """Forward on a leaf copy of ``x``, backward with ``grad_out``; returns (out, {name: grad})."""
    for p in adapter_params(layer).values():
        p.requires_grad_(True)
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, **kwargs)
    g = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    out.backward(g)
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in adapter_params(layer).items()})
    return out.detach(), grads


def mixed_rows_output(twin: nn.Module, x: Tensor, names: list[str]) -> Tensor:
    """A mixed batch's output one row at a time: row ``i`` through ``twin`` with adapter ``names[i]``
    alone (``"__base__"``: adapters disabled)."""
    rows = []
    for i, name in enumerate(names):
        twin.enable_adapters(name != "__base__")
        if name != "__base__":
            twin.set_adapter(name)
        rows.append(twin(x[i : i + 1]))
    return torch.cat(rows)


def mixed_rows_oracle(twin: nn.Module, x: Tensor, grad_out: Tensor, names: list[str]):
    """A mixed batch one row at a time: row ``i`` through ``twin`` with adapter ``names[i]`` alone
    (``"__base__"``: adapters disabled); returns (out, {name: grad}) like :func:`run_with_grads`."""
    params = adapter_params(twin)
    for p in params.values():
        p.grad = None
    outs, x_grads = [], []
    for i, name in enumerate(names):
        twin.enable_adapters(name != "__base__")
        if name != "__base__":
            twin.set_adapter(name)
        for p in params.values():  # set_adapter freezes the adapters it does not activate
            p.requires_grad_(True)
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        out = twin(xi)
        out.backward(grad_out[i : i + 1].to(out.dtype))
        outs.append(out.detach())
        x_grads.append(xi.grad)
    return torch.cat(outs), {"input": torch.cat(x_grads), **{n: p.grad for n, p in params.items()}}


# A tiny Llama shared by the whole-model tests (PEFT integration, fused base).
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def tiny_aqlm_llama(scheme: Scheme):
    """A random tiny Llama whose linear layers (not lm_head) are aqlm.QuantizedLinear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for seed, (name, linear) in enumerate(linears):
        layer = make_quantized_linear(scheme, linear.in_features, linear.out_features, bias=False, seed=seed)
        layer.scales.data /= math.sqrt(linear.in_features)
        model.set_submodule(name, layer)
    return model


def edit_adapters(
    peft_model: nn.Module, lora_B: Callable[[Tensor], Any], magnitude: Callable[[Tensor], Any] = lambda p: p
) -> None:
    """Apply ``lora_B`` to every ``lora_B`` parameter (weight and bias) and ``magnitude`` to every DoRA
    magnitude of ``peft_model``, in place without gradients: adapters that change the output."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                lora_B(p)
            elif "lora_magnitude_vector" in name:
                magnitude(p)


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every AQLM layer replaced by an ``nn.Linear`` holding its dequantized
    weight (in the codebooks' dtype), frozen."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, aqlm.QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.to(module.codebooks.dtype).requires_grad_(False)
            with torch.no_grad():
                linear.weight.copy_(dense_weight(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            dense.set_submodule(name, linear)
    return dense


def random_adapter_state(model: nn.Module, adapter: str, seed: int) -> dict[str, Tensor]:
    """New random float64 weights for ``adapter`` of a PEFT model (DoRA magnitudes scaled), by state-dict key."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key and f".{adapter}." in key:
            noise = torch.randn(value.shape, generator=g, dtype=torch.float64)
            state[key] = value * (1.0 + noise.abs()) if "magnitude" in key else noise * 0.2
    return state


def peft_model_pair(targets: list[str], use_dora: bool, names: list[str]) -> tuple[nn.Module, nn.Module]:
    """(ours: the tiny AQLM Llama through ``aqlm_lora.register``, PEFT on its :func:`dense_copy`), both
    float64 and in eval mode, with adapters ``names`` (r=4, alpha=8) holding the same random weights."""
    from peft import get_peft_model

    from aqlm_lora import register

    quantized = tiny_aqlm_llama(SCHEMES[1]).double()
    dense = dense_copy(quantized)
    models = []
    for model, wrap in ((quantized, register), (dense, lambda c: c)):
        configs = [LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora) for _ in names]
        peft_model = get_peft_model(model, wrap(configs[0]), adapter_name=names[0])
        for name, config in zip(names[1:], configs[1:]):
            peft_model.add_adapter(name, wrap(config))
        models.append(peft_model.double().eval())
    for seed, name in enumerate(names):
        state = random_adapter_state(models[0], name, seed)
        for model in models:
            model.load_state_dict(state, strict=False)
    return models[0], models[1]
