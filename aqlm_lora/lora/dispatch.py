"""Make PEFT build :class:`~aqlm_lora.lora.layer.AqlmLoraLinear` for ``aqlm.QuantizedLinear`` layers.

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

Registered configs also put the AQLM layers the adapter does *not* target on our kernels, and
expand ``target_modules="all-linear"`` to the AQLM layers. PEFT builds a model in
``LoraModel.inject_adapter`` (for ``get_peft_model``, ``PeftModel.from_pretrained``,
``add_adapter`` and ``inject_adapter_in_model``), and that is the only place where a config meets
its model: :func:`register` cannot see the model, and neither can the layer PEFT builds for one
target. So the first :func:`register` wraps ``peft.tuners.lora.LoraModel.inject_adapter`` once per
process, and the wrapper acts only for configs that carry our registration (any other config goes
to PEFT untouched). For those it

1. replaces ``target_modules="all-linear"`` by :func:`all_linear_targets` of the model (PEFT's own
   expansion knows only ``nn.Linear``/``Conv1D``, finds no layer in an AQLM model and fails);
2. after PEFT has built the adapter, calls :func:`aqlm_lora.use_fused_kernels` on the model, unless
   the config was registered with ``fused_base=False``.

We chose this over patching ``aqlm.QuantizedLinear.forward`` on the class while registered: that
would switch every AQLM layer of the process (other models, PEFT's stock layer one compares
against) and could not be undone for one model without undoing it for all. The wrapper's effect is
limited to the model being adapted, by a registered config, and is undone per model with
:func:`aqlm_lora.restore_aqlm_kernels`. Installing it is idempotent and takes a lock.

The same first :func:`register` wraps ``LoraModel._unload_and_optionally_merge`` (what
``merge_and_unload`` runs): for a model holding our layers it warns once about the model's growth
and updates the AQLM quantization config (see :mod:`aqlm_lora.lora.merge`), and wraps
``peft.utils.hotswap.hotswap_adapter_from_state_dict`` (which ``hotswap_adapter`` calls): it writes
the new weights through ``.data``, which no cache key sees, so afterwards every
:class:`AqlmLoraLinear` of the model drops its caches (``clear_caches``). A reference to the function
taken before the first :func:`register` is the unwrapped one.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Optional

import aqlm
import peft.utils.hotswap
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .fused_base import restore_checkpoint_layout, use_fused_kernels
from .layer import AqlmLoraLinear
from .merge import merging, update_quantization_config

__all__ = ["all_linear_targets", "dispatch_aqlm", "register"]

logger = logging.getLogger("aqlm_lora")

# Classification heads PEFT leaves out of "all-linear" when a model has no output embeddings.
_CLASSIFIER_HEADS = ("score", "classifier")
# Set on a registered config by register(fused_base=...); not a dataclass field, so never saved.
_FUSED_BASE_ATTR = "_aqlm_lora_fused_base"
_HOOK_LOCK = threading.Lock()


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


def register(config: LoraConfig, *, fused_base: bool = True) -> LoraConfig:
    """Register :class:`AqlmLoraLinear` for ``aqlm.QuantizedLinear`` on ``config``; returns ``config``.

    Uses PEFT's ``LoraConfig._register_custom_module``, so ``get_peft_model(model, register(cfg))``
    and ``PeftModel.from_pretrained(model, path, config=register(LoraConfig.from_pretrained(path)))``
    build our layers. The registration is not saved with the config.

    When PEFT builds the adapter on a model (see the module docstring for how):

    - ``target_modules="all-linear"`` is expanded to :func:`all_linear_targets` of the model (every
      ``aqlm.QuantizedLinear`` and ``nn.Linear`` but the output head), logged on the ``aqlm_lora``
      logger; the saved adapter config lists those names.
    - with ``fused_base=True`` (default) every ``aqlm.QuantizedLinear`` of the model, targeted or
      not, runs on our kernels (:func:`aqlm_lora.use_fused_kernels`); undo it with
      :func:`aqlm_lora.restore_aqlm_kernels`. ``fused_base=False`` leaves the untargeted ones on
      aqlm's own forward.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"aqlm_lora.register expects a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({aqlm.QuantizedLinear: AqlmLoraLinear})
    setattr(config, _FUSED_BASE_ATTR, bool(fused_base))
    _install_injection_hook()
    return config


def all_linear_targets(model: nn.Module) -> list[str]:
    """Full names of the layers PEFT's ``"all-linear"`` means, AQLM layers included, for ``target_modules``.

    Every ``aqlm.QuantizedLinear``, ``nn.Linear`` and transformers ``Conv1D`` (or a PEFT tuner layer
    wrapping one), except, as PEFT does, the output head (``get_output_embeddings()``; for a model
    without one, a top-level ``score``/``classifier`` head) and the insides of existing tuner layers.
    """
    linear: tuple[type, ...] = (nn.Linear, aqlm.QuantizedLinear)
    try:
        from transformers.pytorch_utils import Conv1D

        linear += (Conv1D,)
    except ImportError:
        pass
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    heads = {id(head)} if head is not None else {id(getattr(model, n, None)) for n in _CLASSIFIER_HEADS} - {id(None)}
    inside_tuners = [name + "." for name, m in model.named_modules() if name and isinstance(m, BaseTunerLayer)]
    names = []
    for name, module in model.named_modules():
        if not name or id(module) in heads or any(name.startswith(prefix) for prefix in inside_tuners):
            continue
        base = _base(module)
        if isinstance(base, linear) and id(base) not in heads:
            names.append(name)
    return names


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _expand_all_linear(model: nn.Module) -> list[str]:
    names = all_linear_targets(model)
    modules = dict(model.named_modules())
    aqlm_count = sum(isinstance(_base(modules[name]), aqlm.QuantizedLinear) for name in names)
    if not names:
        raise ValueError(
            f"aqlm_lora: target_modules='all-linear' matches no layer of {type(model).__name__}: it has no "
            "aqlm.QuantizedLinear, nn.Linear or Conv1D besides its output head"
        )
    logger.info(
        "aqlm_lora: target_modules='all-linear' expanded to %d layers (%d of them AQLM) of %s",
        len(names),
        aqlm_count,
        type(model).__name__,
    )
    return names


def _registered(config: Any) -> bool:
    mapping = getattr(config, "_custom_modules", None) or {}
    custom = mapping.get(aqlm.QuantizedLinear)
    return isinstance(custom, type) and issubclass(custom, AqlmLoraLinear)


def _install_injection_hook() -> None:
    """Wrap ``LoraModel.inject_adapter`` once per process (see the module docstring)."""
    with _HOOK_LOCK:
        original = LoraModel.inject_adapter
        if getattr(original, "_aqlm_lora_hook", False):
            return

        @functools.wraps(original)
        def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
            config = self.peft_config.get(adapter_name)
            if not _registered(config):
                return original(self, model, adapter_name, *args, **kwargs)
            targets = config.target_modules
            if isinstance(targets, str) and targets.lower() == "all-linear":
                # A set, as PEFT's own expansion and LoraConfig make it (add_weighted_adapter
                # refuses a list and mixed types).
                config.target_modules = set(_expand_all_linear(model))
            result = original(self, model, adapter_name, *args, **kwargs)
            if getattr(config, _FUSED_BASE_ATTR, True):
                use_fused_kernels(model)
            return result

        inject_adapter._aqlm_lora_hook = True
        LoraModel.inject_adapter = inject_adapter
        _install_unload_hook()
        _install_hotswap_hook()


def _install_unload_hook() -> None:
    """Wrap ``LoraModel._unload_and_optionally_merge`` (``merge_and_unload``) once per process.

    For a model holding our layers, a merge warns once with the model's growth instead of once per
    layer (:func:`aqlm_lora.lora.merge.merging`). Afterwards, also after ``unload()`` (which keeps
    layers merged earlier by ``merge_adapter`` dense), the AQLM quantization config lists the
    layers that became dense (else the checkpoint reloads them as uninitialized AQLM layers), and
    codes aqlm's own CPU forward permuted are put back in the checkpoint layout
    (:func:`~aqlm_lora.lora.fused_base.restore_checkpoint_layout`). Any other model goes to PEFT
    untouched.
    """
    original = LoraModel._unload_and_optionally_merge
    if getattr(original, "_aqlm_lora_hook", False):
        return

    @functools.wraps(original)
    def unload(self, merge: bool = True, *args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(m, AqlmLoraLinear) for m in self.model.modules()):
            return original(self, merge, *args, **kwargs)
        if merge:
            with merging(self.model):
                model = original(self, merge, *args, **kwargs)
        else:  # unload(): layers merged earlier (merge_adapter) come back dense, as in PEFT
            model = original(self, merge, *args, **kwargs)
        update_quantization_config(model)
        restore_checkpoint_layout(model)
        return model

    unload._aqlm_lora_hook = True
    LoraModel._unload_and_optionally_merge = unload


def _install_hotswap_hook() -> None:
    """Wrap ``peft.utils.hotswap.hotswap_adapter_from_state_dict`` once per process (see the module docstring)."""
    original = peft.utils.hotswap.hotswap_adapter_from_state_dict
    if getattr(original, "_aqlm_lora_hook", False):
        return

    @functools.wraps(original)
    def hotswap_adapter_from_state_dict(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        layers = [m for m in model.modules() if isinstance(m, AqlmLoraLinear)]
        for layer in layers:  # before too: the caches' weak references make swap_tensors (larger ranks) refuse
            layer.clear_caches()
        try:
            return original(model, *args, **kwargs)
        finally:  # a swap that failed half-way has written some weights too
            for layer in layers:
                layer.clear_caches()

    hotswap_adapter_from_state_dict._aqlm_lora_hook = True
    peft.utils.hotswap.hotswap_adapter_from_state_dict = hotswap_adapter_from_state_dict
