"""Merging adapters into AQLM layers: the merged dense weight, the layer's merged state, ``merge_and_unload``.

``W + s*B@A`` is not representable in the codes, so a merged :class:`~aqlm_lora.lora.layer.AqlmLoraLinear`
swaps in a dense ``nn.Linear`` base layer holding the dequantized weight with the adapters folded in
(PEFT's formulas: ``W + s*B@A`` for LoRA; ``m / ||W0 + s*B@A|| * (W + s*B@A)`` for DoRA, ``W0`` the
unmerged weight, ``W`` the weight so far) and keeps the ``aqlm.QuantizedLinear`` aside, untouched;
``unmerge()`` puts that very object back. The merged weight is always recomputed from the codes in
float32 (float64 for float64 codebooks) and rounded once to the dense dtype, so merging adapters one
by one gives the same weight as merging them together.

The dense dtype defaults to the codebooks' dtype; :func:`merge_and_unload` takes another. Inside
PEFT's ``merge_and_unload`` (:func:`merging`, installed by :func:`aqlm_lora.register`) the layers do
not warn one by one: one warning says how much the whole model grew.
"""

from __future__ import annotations

import contextvars
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import Tensor, nn

from .. import ops

if TYPE_CHECKING:
    from .layer import AqlmLoraLinear

__all__ = [
    "dequantize_model",
    "merge_and_unload",
    "merge_layer",
    "merged_weight",
    "merging",
    "tensor_bytes",
    "unmerge_layer",
    "update_quantization_config",
]

_MIB = 1 << 20


@dataclass
class _Merging:
    """One ``merge_and_unload`` in progress: the dense dtype and what the layers added."""

    dtype: Optional[torch.dtype]
    layers: int = 0
    removed: int = 0  # bytes of the quantized layers replaced
    added: int = 0  # bytes of their dense replacements
    dtypes: set = field(default_factory=set)


_CURRENT: contextvars.ContextVar[Optional[_Merging]] = contextvars.ContextVar("aqlm_lora_merging", default=None)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def merged_weight(layer: AqlmLoraLinear, names: list[str]) -> tuple[Tensor, Optional[Tensor]]:
    """``(weight, bias)`` of the quantized base with the adapters ``names`` merged in order, in float32
    (float64 for float64 codebooks). ``bias`` is None only when neither the base nor an adapter has one."""
    codes, codebooks, scales = layer.quantized_weight()
    acc = _acc(codebooks.dtype)
    unmerged = ops.dequantize(codes, codebooks.to(acc), scales.to(acc))
    base_bias = layer.quantized_base().bias
    base_bias = None if base_bias is None else base_bias.to(acc)
    weight, bias = unmerged, base_bias
    for name in names:
        scaling = layer.scaling[name]
        lora_A, lora_B = layer.lora_A[name].weight.to(acc), layer.lora_B[name]
        delta = (lora_B.weight.to(acc) @ lora_A) * scaling
        lora_bias = None if lora_B.bias is None else lora_B.bias.to(acc) * scaling
        if lora_bias is not None:
            bias = lora_bias if bias is None else bias + lora_bias
        if name in layer.lora_magnitude_vector:  # the norm of the unmerged weight, as forward uses
            factor = layer.lora_magnitude_vector[name].weight.to(acc) / torch.linalg.norm(unmerged + delta, dim=1)
            weight = factor[:, None] * (weight + delta)
            # Forward rescales all but the base bias (dora_step: scale * (prev - bias + v) + bias),
            # earlier adapters' lora_bias included; PEFT's own merge leaves the bias unscaled, which
            # changes the outputs when a lora_bias comes before a DoRA adapter.
            if bias is not None and bias is not base_bias:
                bias = factor * bias if base_bias is None else base_bias + factor * (bias - base_bias)
        else:
            weight = weight + delta
    return weight, bias


def _dense_dtype(layer: AqlmLoraLinear, requested: Optional[torch.dtype]) -> torch.dtype:
    current = _CURRENT.get()
    dtype = requested or (current.dtype if current is not None else None) or layer.quantized_base().codebooks.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"merge: the dense dtype must be a floating dtype, got {dtype}")
    return dtype


def merge_layer(
    layer: AqlmLoraLinear, names: list[str], safe_merge: bool = False, dtype: Optional[torch.dtype] = None
) -> None:
    """Merge ``names`` (already checked by PEFT's ``check_adapters_to_merge``) into ``layer``."""
    names = [name for name in names if name in layer.lora_A]
    if not names:
        return
    if layer.base_layer is not layer.get_base_layer():
        raise NotImplementedError(
            f"{type(layer).__name__}: merging into a base layer wrapped by another tuner layer is not supported; "
            "merge the outer adapters first (merge_and_unload) or unload them"
        )
    all_names = list(layer.merged_adapters) + names
    weight, bias = merged_weight(layer, all_names)
    if safe_merge and not (bool(torch.isfinite(weight).all()) and (bias is None or bool(torch.isfinite(bias).all()))):
        raise ValueError(f"NaNs detected in the merged weights. The adapters {names} seem to be broken")
    quantized = layer.quantized_base()
    dense = layer.base_layer if layer.merged else None
    dtype = dense.weight.dtype if dense is not None else _dense_dtype(layer, dtype)
    if dense is None or (bias is not None and dense.bias is None):
        dense = nn.Linear(
            layer.in_features, layer.out_features, bias=bias is not None, device=weight.device, dtype=dtype
        )
        dense.requires_grad_(False)
    dense.weight.copy_(weight)
    if bias is not None:
        dense.bias.copy_(bias)
    if not layer.merged:
        layer.__dict__["_quantized_base"] = quantized
        _report(layer, quantized, dense)
    layer.base_layer = dense
    layer.merged_adapters.extend(names)


def unmerge_layer(layer: AqlmLoraLinear) -> None:
    """Put the quantized base layer back (the very object, on the dense layer's device) and forget the merge."""
    if not layer.merged:
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=3)
        return
    quantized = layer.__dict__.pop("_quantized_base")
    device = layer.base_layer.weight.device
    if quantized.codebooks.device != device:
        quantized.to(device)
    layer.base_layer = quantized
    layer.merged_adapters.clear()


def _report(layer: AqlmLoraLinear, quantized: nn.Module, dense: nn.Linear) -> None:
    removed, added = tensor_bytes(quantized), tensor_bytes(dense)
    current = _CURRENT.get()
    if current is not None:  # merge_and_unload warns once for the whole model
        current.layers += 1
        current.removed += removed
        current.added += added
        current.dtypes.add(dense.weight.dtype)
        return
    warnings.warn(
        f"{type(layer).__name__}: merged into a dense {_dtype_name(dense.weight.dtype)} copy of the AQLM layer: "
        f"{removed / _MIB:.2f} MiB -> {added / _MIB:.2f} MiB ({added / max(removed, 1):.1f}x); unmerge() restores it",
        UserWarning,
        stacklevel=4,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _base_bytes(model: nn.Module) -> int:
    """Bytes of the model without the adapters' own tensors."""
    total = tensor_bytes(model)
    for name, p in model.named_parameters():
        if ".lora_" in f".{name}":
            total -= p.numel() * p.element_size()
    return total


def activation_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The one floating dtype of the model's weights outside its AQLM layers and adapters (what its
    activations are, so what merged layers must accept); None when they have several or none."""
    aqlm = sys.modules.get("aqlm")
    quantized = {
        id(p)
        for m in model.modules()
        if aqlm is not None and isinstance(m, aqlm.QuantizedLinear)
        for p in m.parameters()
    }
    dtypes = {
        p.dtype
        for name, p in model.named_parameters()
        if p.is_floating_point() and id(p) not in quantized and ".lora_" not in name
    }
    return dtypes.pop() if len(dtypes) == 1 else None


@contextmanager
def merging(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """Around PEFT's merge of ``model``: layers merge to ``dtype`` quietly, one warning says how the model grew.

    Nested uses (our :func:`merge_and_unload` calling PEFT's) count once, in the outer one.
    """
    if _CURRENT.get() is not None:
        yield
        return
    before = _base_bytes(model)
    state = _Merging(dtype or activation_dtype(model))
    token = _CURRENT.set(state)
    try:
        yield
    finally:
        _CURRENT.reset(token)
    if state.layers:
        after = before - state.removed + state.added
        dtypes = ", ".join(sorted(_dtype_name(d) for d in state.dtypes))
        warnings.warn(
            f"merge_and_unload: {state.layers} AQLM layers became dense nn.Linear ({dtypes}): the model grows from "
            f"{before / _MIB:.1f} MiB to {after / _MIB:.1f} MiB ({(after - before) / _MIB:+.1f} MiB, "
            f"{after / max(before, 1):.2f}x); aqlm_lora.merge_and_quantize keeps it AQLM",
            UserWarning,
            stacklevel=4,
        )


def merge_and_unload(
    model: nn.Module,
    dtype: Optional[torch.dtype] = None,
    *,
    safe_merge: bool = False,
    adapter_names: Optional[list[str]] = None,
    progressbar: bool = False,
) -> nn.Module:
    """PEFT's ``merge_and_unload`` with the merged AQLM layers in ``dtype`` (default: the dtype of the
    model's other weights, its activations' dtype, so the merged model runs on the inputs it ran on;
    the codebooks' dtype where those weights have several dtypes).

    ``model`` is a ``PeftModel`` (or ``LoraModel``) holding :class:`~aqlm_lora.lora.layer.AqlmLoraLinear`
    layers. Each becomes an ``nn.Linear`` holding ``W_dequantized`` with its adapters merged in (biases
    included); AQLM layers without an adapter stay AQLM. One ``UserWarning`` says how much bigger the
    model became. The model's ``quantization_config`` then lists the dense layers as not quantized
    (or is removed when no AQLM layer is left), and codes that aqlm's own CPU forward permuted in
    place are put back in the checkpoint layout, so ``save_pretrained`` writes a checkpoint that
    transformers loads back as it is.
    """
    from .fused_base import restore_checkpoint_layout

    with merging(model, dtype):
        merged = model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
    update_quantization_config(merged)
    restore_checkpoint_layout(merged)  # the AQLM layers left are saved next: in the layout transformers loads
    return merged


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Replace every ``aqlm.QuantizedLinear`` of ``model`` by an ``nn.Linear`` holding its dequantized
    weight (in ``dtype``, default its codebooks' dtype); returns how many. Updates the quantization
    config (:func:`update_quantization_config`): with no AQLM layer left the model is a plain one."""
    from .fused_base import canonical_codes

    aqlm = sys.modules.get("aqlm")
    layers = [(n, m) for n, m in model.named_modules() if aqlm is not None and isinstance(m, aqlm.QuantizedLinear)]
    for name, layer in layers:
        codebooks = layer.codebooks
        weight = ops.dequantize(
            canonical_codes(layer), codebooks.to(_acc(codebooks.dtype)), layer.scales.to(_acc(codebooks.dtype))
        )
        linear = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=weight.device,
            dtype=dtype or codebooks.dtype,
        )
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        model.set_submodule(name, linear.requires_grad_(False))
    update_quantization_config(model)
    return len(layers)


def update_quantization_config(model: nn.Module) -> None:
    """Make ``model.config.quantization_config`` (AQLM) describe the layers as they are now.

    transformers' AQLM loader turns every ``nn.Linear`` not listed in ``linear_weights_not_to_quantize``
    into an AQLM layer; dense layers that replaced AQLM ones are added there (as ``name`` and
    ``name.weight``, as :func:`aqlm_lora.quantize.quantize_model` lists them). Without any AQLM layer
    left the model is no longer quantized: the config and transformers' quantizer are removed.
    """
    config = getattr(model, "config", None)
    qconfig = getattr(config, "quantization_config", None)
    aqlm = sys.modules.get("aqlm")
    if qconfig is None or aqlm is None:
        return
    if not any(isinstance(m, aqlm.QuantizedLinear) for m in model.modules()):
        del config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
        if getattr(model, "is_quantized", False):
            model.is_quantized = False
        return
    dense = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantizers = [qconfig, getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)]
    for q in quantizers:
        if q is None:
            continue
        listed = q.get("linear_weights_not_to_quantize") if isinstance(q, dict) else q.linear_weights_not_to_quantize
        names = list(dict.fromkeys(list(listed or []) + [n for name in dense for n in (name, f"{name}.weight")]))
        if isinstance(q, dict):
            q["linear_weights_not_to_quantize"] = names
        else:
            q.linear_weights_not_to_quantize = names
