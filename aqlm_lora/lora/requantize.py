"""``merge_and_quantize``: merge a PEFT model's adapters into its AQLM layers and re-quantize them.

Each adapted layer's merged weight (:func:`aqlm_lora.lora.merge.merged_weight`: ``W + s*B@A``, DoRA's
rows rescaled, LoRA biases added) is quantized again in the base layer's own scheme, warm-started
from its codes, codebooks and scales (:func:`aqlm_lora.quantize.quantize_weight` with
``warm_start``): no k-means, the scales refitted, then a few refinement rounds. The result is the
unloaded transformers model with new ``aqlm.QuantizedLinear`` layers where adapters were, the same
AQLM quantization config, and ``save_pretrained`` writes an AQLM checkpoint of it.

Adapted layers that are dense in the checkpoint (``nn.Linear``: layers quantization skipped) are
merged densely by PEFT's own layer merge, as ``merge_and_unload`` would: unloading alone would drop
their adapters.

Every scheme holds a merged DoRA adapter: its row rescaling folds into one scale per row exactly
(``og == 1``) and is fitted like any other change of the weight otherwise. What an AQLM layer cannot
hold is a LoRA bias where the base layer has no bias (the checkpoint's architecture has none): that
is refused, before anything changes.
"""

from __future__ import annotations

import logging
from typing import Optional

import aqlm
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTuner
from torch import Tensor, nn

from ..quantize import QuantizedWeight, layer_scheme, quantize_weight
from .codebook_tuning import teacher_log_probs, tune_codebooks
from .fused_base import on_fused_kernels, restore_checkpoint_layout, use_fused_kernels
from .layer import AqlmLoraLinear
from .merge import merged_weight

__all__ = ["merge_and_quantize"]

logger = logging.getLogger("aqlm_lora")


def _adapted_layers(model: nn.Module, adapter_names: Optional[list[str]]) -> tuple[nn.Module, dict, dict]:
    """The tuner (``LoraModel``), then ``{name in the transformers model: (layer, adapters to merge)}`` of
    the AQLM layers and of the other (dense) LoRA layers."""
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, BaseTuner):
        raise TypeError(f"merge_and_quantize needs a PeftModel or LoraModel, got {type(model).__name__}")
    found, dense = {}, {}
    for name, module in tuner.model.named_modules():
        ours = isinstance(module, AqlmLoraLinear)
        # Only LoRA layers on a dense base merge densely (PEFT's stock AQLM layer cannot merge).
        if not ours and not (isinstance(module, LoraLayer) and _dense_base(module)):
            continue
        wanted = adapter_names if adapter_names is not None else list(module.active_adapters)
        names = [n for n in wanted if n in module.lora_A or n in module.lora_embedding_A]
        if module.merged:
            raise ValueError(f"merge_and_quantize: layer {name} has merged adapters; unmerge() them first")
        if not names or module.disable_adapters:
            continue
        if not ours and any(module.lora_bias.get(n) for n in names) and _bias(module) is None:
            # PEFT's merge would fail half-way (RuntimeError); refuse before anything changes.
            raise ValueError(
                f"merge_and_quantize: layer {name} has a LoRA bias (lora_bias=True) but no bias to merge it into"
            )
        (found if ours else dense)[name] = (module, names)
    return tuner, found, dense


def _dense_base(layer: LoraLayer) -> bool:
    return not isinstance(layer.get_base_layer(), aqlm.QuantizedLinear)


def _bias(layer: LoraLayer) -> Optional[Tensor]:
    return getattr(layer.get_base_layer(), "bias", None)  # an nn.Embedding has none


def _requantized(name: str, layer: AqlmLoraLinear, adapters: list[str], **kwargs) -> tuple[nn.Module, list[float]]:
    base = layer.quantized_base()
    weight, bias = merged_weight(layer, adapters)
    if bias is not None and base.bias is None:
        raise ValueError(
            f"merge_and_quantize: layer {name} has a LoRA bias (lora_bias=True) but its AQLM layer has no bias, "
            "so the checkpoint cannot hold it; merge to a dense model instead (merge_and_unload)"
        )
    codes, codebooks, scales = layer.quantized_weight()
    scheme = layer_scheme(base)
    start = QuantizedWeight(codes, codebooks, scales, scheme)
    q = quantize_weight(weight, scheme, dtype=codebooks.dtype, name=f"layer {name}", warm_start=start, **kwargs)
    return q.to_linear(bias, codebooks.device), q.errors


def merge_and_quantize(
    model: nn.Module,
    *,
    rounds: int = 2,
    beam_size: int = 1,
    adapter_names: Optional[list[str]] = None,
    errors: Optional[dict[str, list[float]]] = None,
    calibration: Optional[Tensor] = None,
    tune_steps: int = 100,
    tune_lr: float = 1e-4,
    tune_batch: int = 8,
    losses: Optional[list[float]] = None,
) -> nn.Module:
    """Merge the adapters of a PEFT model of AQLM layers and re-quantize the merged layers; returns the model.

    ``model``: a ``PeftModel`` (or ``LoraModel``) built through :func:`aqlm_lora.register`. Every
    :class:`~aqlm_lora.lora.layer.AqlmLoraLinear` with active adapters (or ``adapter_names``) gets
    a new ``aqlm.QuantizedLinear`` of its base's scheme and dtype, fitted to its merged weight from
    the base's codes (``rounds`` refinement rounds, ``beam_size`` as in
    :func:`~aqlm_lora.quantize.quantize_weight`); then the adapters are unloaded. The returned model
    is the base transformers model (``model`` itself is used up): its other AQLM layers and its
    quantization config are unchanged, so ``save_pretrained`` writes an AQLM checkpoint.

    ``errors``, if given, receives ``{layer name: ||W' - W_q|| / ||W'|| per round}`` for the merged
    weights ``W'`` (round 0: the warm start after its scale refit). ``ValueError`` (nothing changed)
    for a layer that cannot hold its adapter (a LoRA bias on a bias-less layer) or a merged layer.

    ``calibration`` (token windows ``[N, T]``): the weight fit treats every direction alike, so then
    the new layers' codebooks and scales are tuned to the adapted model's outputs on these windows
    (:func:`aqlm_lora.lora.codebook_tuning.tune_codebooks`: ``tune_steps`` Adam steps of
    ``tune_batch`` windows at ``tune_lr``, codes fixed); ``losses`` receives the KL of each step.
    The teacher's log-probabilities are kept for all windows (``N * T * vocab`` floats).
    """
    tuner, layers, dense_layers = _adapted_layers(model, adapter_names)
    if not layers:
        raise ValueError("merge_and_quantize: no AQLM layer of this model has an active adapter to merge")
    fused = any(on_fused_kernels(m) for m in tuner.model.modules() if isinstance(m, aqlm.QuantizedLinear))
    new_layers = {}
    for name, (layer, adapters) in layers.items():
        new_layers[name], layer_errors = _requantized(name, layer, adapters, rounds=rounds, beam_size=beam_size)
        if errors is not None:
            errors[name] = layer_errors
        logger.info("merge_and_quantize %s: relative error %s", name, " -> ".join(f"{e:.4f}" for e in layer_errors))
    targets = None if calibration is None else teacher_log_probs(model, calibration, tune_batch)
    for layer, adapters in dense_layers.values():
        layer.merge(adapter_names=adapters)  # into the dense base layer, which unload() keeps
    unloaded = tuner.unload()
    for name, layer in new_layers.items():
        unloaded.set_submodule(name, layer)
    if targets is not None:
        step_losses = tune_codebooks(
            unloaded, list(new_layers.values()), calibration, targets, steps=tune_steps, lr=tune_lr, batch=tune_batch
        )
        if losses is not None:
            losses.extend(step_losses)
    if fused:
        use_fused_kernels(unloaded)
    restore_checkpoint_layout(unloaded)  # layers aqlm's own CPU forward permuted: saved next, as loaded
    return unloaded
