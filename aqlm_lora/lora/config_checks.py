"""Which ``LoraConfig`` options an AQLM layer supports: the others raise a ``ValueError`` that says
why and what to do, or are reset with PEFT's own warning, never silently ignored."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from peft import LoraConfig

__all__ = ["check_supported", "prepare_config"]

# init_lora_weights values that read or rewrite the dense base weight (SVD, QR, quantization error,
# gradients). An AQLM layer has no dense weight to read and its codes cannot absorb a residual.
_DENSE_WEIGHT_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga", "mica")


def _dense_init_name(init_lora_weights: Any) -> Optional[str]:
    if not isinstance(init_lora_weights, str):
        return None
    lowered = init_lora_weights.lower()
    for name in _DENSE_WEIGHT_INITS:
        if lowered == name or lowered.startswith(name + "_"):
            return init_lora_weights
    return None


def check_supported(config: LoraConfig, cls_name: str) -> None:
    """Raise ValueError for options AQLM bases cannot support, saying why and what to do."""
    if config.use_dora and config.lora_bias:  # LoraConfig refuses it too; a config edited afterwards may not be
        raise ValueError(f"{cls_name}: lora_bias=True is not supported for DoRA (as in PEFT); pass use_dora=False")
    if getattr(config, "use_qalora", False):  # PEFT implements QALoRA for GPTQ layers only
        raise ValueError(
            f"{cls_name} does not implement QALoRA (use_qalora=True): its input pooling exists in PEFT for GPTQ "
            "layers only, and an AQLM layer would silently get plain LoRA. Pass use_qalora=False."
        )
    dense_init = _dense_init_name(config.init_lora_weights)
    if dense_init is not None:
        raise ValueError(
            f"{cls_name} does not support init_lora_weights={dense_init!r}: it reads (and, for most of these, "
            "rewrites) the dense base weight, and an AQLM layer has only codes, codebooks and scales - its "
            "weight cannot absorb a residual without re-quantizing. Use init_lora_weights=True, False, "
            "'gaussian', 'eva' or 'orthogonal', or apply the init on the dense model before quantizing."
        )


def prepare_config(config: LoraConfig, cls_name: str, parameter_name: Optional[str]) -> None:
    """The checks of a new layer: :func:`check_supported`, plus what only construction sees."""
    if parameter_name is not None:  # PEFT's target_parameters reached an AQLM layer
        raise ValueError(
            f"{cls_name} cannot adapt one parameter of an AQLM layer (target_parameters={parameter_name!r}): "
            "its codes, codebooks and scales are not a weight matrix. Target the layer with target_modules."
        )
    if config.fan_in_fan_out:  # as PEFT's lora.Linear does: an AQLM weight is [out, in]
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is an AQLM layer. Setting fan_in_fan_out to False.",
            stacklevel=4,
        )
        config.fan_in_fan_out = False
    check_supported(config, cls_name)
