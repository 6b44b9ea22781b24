"""LoRA adapters: new ones on every AQLM/linear layer, saved ones checked against the model and loaded.

Adapters are plain PEFT adapters (``save_pretrained``), built through :func:`aqlm_lora.register`
so every ``aqlm.QuantizedLinear`` gets our fused layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

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


# LoRA tensors (key ends, after the layer's name): (ndim, the dim that must equal one of the layer's
# sizes, which one: 0 inputs / vocabulary, 1 outputs / embedding size).
_LORA_DIMS = {
    "lora_A.weight": (2, 1, 0),
    "lora_B.weight": (2, 0, 1),
    "lora_B.bias": (1, 0, 1),  # lora_bias=True
    "lora_magnitude_vector": (1, 0, 1),  # DoRA
    "lora_embedding_A": (2, 1, 0),
    "lora_embedding_B": (2, 0, 1),
}


def _unwrapped(module: nn.Module) -> nn.Module:
    """The layer a PEFT wrapper (LoRA layer, modules_to_save copy) stands for: a second adapter meets them."""
    if isinstance(getattr(module, "original_module", None), nn.Module):
        return module.original_module
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _sizes(layer: nn.Module) -> Optional[tuple[tuple[int, int], str]]:
    """The two sizes of a linear, AQLM or embedding layer, and how to say them; None for other layers."""
    if isinstance(layer, nn.Embedding):
        n, d = layer.num_embeddings, layer.embedding_dim
        return (n, d), f"{n} embeddings of size {d}"
    if hasattr(layer, "in_features"):
        n, d = layer.in_features, layer.out_features
        return (n, d), f"{n} inputs and {d} outputs"
    return None


def check_adapter_fits(model: nn.Module, adapter_dir: PathLike) -> None:
    """Raise :class:`UserError` unless every tensor of the adapter fits ``model``: each LoRA tensor the
    sizes of its layer, each full copy of a model tensor (``modules_to_save``, embeddings saved with
    their LoRA) that tensor's shape; PEFT would stop with a size-mismatch traceback."""
    adapter_dir = check_input_dir(adapter_dir, "adapter directory", must_contain="adapter_config.json")
    modules = dict(model.named_modules())
    shapes = _adapter_tensors(adapter_dir)
    if not shapes:
        raise UserError(f"adapter {adapter_dir} holds no tensors")
    misfit = f"adapter {adapter_dir} does not fit this model"
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        lora = next((end for end in _LORA_DIMS if name.endswith(f".{end}")), None)
        if lora is None:
            _check_full_tensor(modules, name, shape, f"{misfit}: {key} has shape {list(shape)}")
            continue
        module_name = name[: -len(lora) - 1]
        module = modules.get(module_name)
        sizes = None if module is None else _sizes(_unwrapped(module))
        if sizes is None:
            raise UserError(f"{misfit}: it has no layer {module_name}")
        ndim, dim, which = _LORA_DIMS[lora]
        if len(shape) != ndim or shape[dim] != sizes[0][which]:
            raise UserError(f"{misfit}: {key} has shape {list(shape)}, but layer {module_name} has {sizes[1]}")


def _check_full_tensor(modules: dict, name: str, shape: tuple[int, ...], found: str) -> None:
    """A saved copy of a model tensor (``lm_head.weight``, ``embed_tokens.base_layer.weight``) must keep its shape."""
    module_name, _, attr = name.rpartition(".")
    module_name = module_name.removesuffix(".base_layer")  # the model's own layer, wrapped or not
    module = modules.get(module_name)
    tensor = None if module is None else getattr(_unwrapped(module), attr, None)
    if isinstance(tensor, Tensor) and tuple(tensor.shape) != tuple(shape):
        raise UserError(f"{found}, but {module_name}.{attr} has shape {list(tensor.shape)}")


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
