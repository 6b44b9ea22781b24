"""Make PEFT build :class:`~aqlm_lora.layer.AqlmLoraLinear` for ``aqlm.QuantizedLinear`` layers.

New model::

    from peft import LoraConfig, get_peft_model
    import aqlm_lora

    model = get_peft_model(model, aqlm_lora.register(LoraConfig(r=16, target_modules=["q_proj", "v_proj"])))

Load a saved adapter (PEFT does not save the custom-module registration, so register the loaded
config again and pass it)::

    from peft import LoraConfig, PeftModel

    config = aqlm_lora.register(LoraConfig.from_pretrained(path))
    model = PeftModel.from_pretrained(model, path, config=config)  # is_trainable=True to keep training

The adapter files are the same as with PEFT's own AQLM layer, in both directions.
"""

from __future__ import annotations

from typing import Any, Optional

import aqlm
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from .layer import AqlmLoraLinear

__all__ = ["dispatch_aqlm", "register"]


def dispatch_aqlm(
    target: torch.nn.Module,
    adapter_name: str,
    lora_config: Optional[LoraConfig] = None,
    **kwargs: Any,
) -> Optional[torch.nn.Module]:
    """An :class:`AqlmLoraLinear` when ``target`` (or its base layer) is an ``aqlm.QuantizedLinear``, else None.

    PEFT's dispatcher signature: the LoRA config comes as ``config=`` (PEFT >= 0.19) or
    ``lora_config=`` (older PEFT); the remaining keyword arguments (``r``, ``lora_alpha``, ...)
    go to the layer.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, aqlm.QuantizedLinear):
        return None
    config = kwargs.pop("config", None) or lora_config
    if config is not None:
        kwargs["config"] = config
    return AqlmLoraLinear(target, adapter_name, **kwargs)


def register(config: LoraConfig) -> LoraConfig:
    """Register :class:`AqlmLoraLinear` for ``aqlm.QuantizedLinear`` on ``config``; returns ``config``.

    Uses PEFT's ``LoraConfig._register_custom_module``, so ``get_peft_model(model, register(cfg))``
    and ``PeftModel.from_pretrained(model, path, config=register(LoraConfig.from_pretrained(path)))``
    build our layers. The registration is not saved with the config.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"aqlm_lora.register expects a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({aqlm.QuantizedLinear: AqlmLoraLinear})
    return config
