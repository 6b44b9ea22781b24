"""LoRA adapters: new ones on every AQLM/linear layer, saved ones checked against the model and loaded.

Adapters are plain PEFT adapters (``save_pretrained``), built through :func:`aqlm_lora.register`
so every ``aqlm.QuantizedLinear`` gets our fused layer.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor, nn

from .errors import UserError, is_int, is_number, one_line
from .files import PathLike, check_input_dir, check_safetensors, torch_load
from .models import lora_targets


def _lora_config(r: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")


def new_adapter(model: nn.Module, r: int, alpha: float, dropout: float, *, ours: bool = True):
    """``get_peft_model`` with a fresh LoRA adapter on every linear/AQLM layer but the head.

    ``ours=False`` builds PEFT's stock layers (``peft.tuners.lora.aqlm.AqlmLoraLinear``) instead.
    """
    from peft import get_peft_model

    from ..lora.dispatch import register

    if r < 1:
        raise UserError(f"--r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {dropout}")
    config = _lora_config(r, alpha, dropout, lora_targets(model))
    return get_peft_model(model, register(config) if ours else config)


def _adapter_tensors(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        check_safetensors(weights)
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.is_file():
        tensors = torch_load(legacy, "adapter")
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise UserError(f"{legacy} does not hold a dict of tensors")
        return {k: tuple(v.shape) for k, v in tensors.items()}
    raise UserError(f"adapter directory {adapter_dir} has no adapter_model.safetensors")


def check_adapter_fits(model: nn.Module, adapter_dir: PathLike) -> None:
    """Raise :class:`UserError` unless every LoRA tensor of the adapter matches a layer of ``model``."""
    adapter_dir = check_input_dir(adapter_dir, "adapter directory", must_contain="adapter_config.json")
    modules = dict(model.named_modules())
    shapes = _adapter_tensors(adapter_dir)
    if not shapes:
        raise UserError(f"adapter {adapter_dir} holds no tensors")
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        for part in (".lora_A.", ".lora_B."):
            if part in name:
                module_name, kind = name.split(part)[0], part.strip(".")
                break
        else:
            continue  # other saved tensors (e.g. modules_to_save) are PEFT's business
        module = modules.get(module_name)
        if module is None or not hasattr(module, "in_features"):
            raise UserError(f"adapter {adapter_dir} does not fit this model: it has no layer {module_name}")
        expect = module.in_features if kind == "lora_A" else module.out_features
        got = shape[1] if kind == "lora_A" else shape[0]
        if len(shape) != 2 or got != expect:
            raise UserError(
                f"adapter {adapter_dir} does not fit this model: {key} has shape {list(shape)}, but layer "
                f"{module_name} has {module.in_features} inputs and {module.out_features} outputs"
            )


def load_adapter(model: nn.Module, adapter_dir: PathLike, *, trainable: bool = False):
    """``PeftModel.from_pretrained`` through :func:`aqlm_lora.register`, after checking the adapter fits."""
    from peft import PeftModel

    from ..lora.dispatch import register

    check_adapter_fits(model, adapter_dir)
    config = read_lora_config(adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=register(config), is_trainable=trainable)


def read_lora_config(adapter_dir: PathLike):
    """The adapter's ``LoraConfig``; :class:`UserError` when it does not parse or a field is out of range."""
    from peft import LoraConfig

    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path} is not a usable LoRA config: {one_line(exc)}") from None
    _check_lora_config(config, path)
    return config


def _check_lora_config(config, path: Path) -> None:
    """The fields we train and run with must have the right type and range (PEFT takes any JSON value)."""
    r, alpha, dropout = config.r, config.lora_alpha, config.lora_dropout
    if not is_int(r) or r < 1:
        raise UserError(f"{path}: r must be an integer >= 1, got {r!r}")
    if not is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"{path}: lora_alpha must be a finite number > 0, got {alpha!r}")
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise UserError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
