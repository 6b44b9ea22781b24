"""Loading causal LMs (dense or AQLM) from local Hugging Face folders, and finding their layers.

Configs and weight files are checked before transformers sees them, so a wrong-typed config field
or a truncated ``*.safetensors`` file is reported by name (:class:`~aqlm_lora.app.errors.UserError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import UserError, is_int, one_line
from .files import PathLike, check_input_dir, check_safetensors

# ``--dtype`` choices of the CLI.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = tuple(DTYPES)


def quiet_transformers() -> None:
    """No info logs or loading/saving progress bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model_config(model_dir: PathLike):
    """The transformers config of a model directory; :class:`UserError` naming ``config.json`` if unusable."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - bad JSON, a wrong-typed field, an unknown model type...
        raise UserError(f"{path} is not a usable model config: {one_line(exc)}") from None


def config_dtype(config) -> Optional[torch.dtype]:
    """The floating dtype a model config records (``dtype`` / ``torch_dtype``), or None."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def check_seq(config, seq: int, model_dir: PathLike, flag: str = "--seq") -> None:
    """A window longer than the model's positions (``max_position_embeddings``) is refused."""
    limit = getattr(config, "max_position_embeddings", None)
    if is_int(limit) and seq > limit:
        raise UserError(
            f"{flag} {seq} is longer than the {limit} positions of {model_dir} (max_position_embeddings in config.json)"
        )


def load_causal_lm(model_dir: PathLike, dtype: torch.dtype = torch.float32):
    """A causal LM (float32 unless ``dtype``) from a local Hugging Face directory (dense or AQLM).

    The config and every ``*.safetensors`` file are checked first, so a wrong-typed config field or
    a truncated weight file is reported (as :class:`UserError`) by name.
    """
    from transformers import AutoModelForCausalLM

    model_dir = check_input_dir(model_dir, "model directory", must_contain="config.json")
    load_model_config(model_dir)
    for weights in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, EOFError) as exc:
        raise UserError(f"cannot load a causal LM from {model_dir}: {one_line(exc)}") from None
    return model


def aqlm_layer_names(model: nn.Module) -> list[str]:
    """Names of the ``aqlm.QuantizedLinear`` modules of ``model`` (none: a dense model)."""
    from aqlm import QuantizedLinear

    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def lora_targets(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Leaf names (``q_proj``, ...) of the AQLM / linear layers to adapt (the output head excluded)."""
    from aqlm import QuantizedLinear

    names = set()
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, nn.Linear)) and name.rsplit(".", 1)[-1] not in skip:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise UserError(f"{type(model).__name__} has no linear or AQLM layers to put LoRA on")
    return sorted(names)
