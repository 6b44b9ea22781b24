"""Fused LoRA on AQLM-quantized linear layers (CPU and CUDA kernels, PEFT drop-in).

``import aqlm_lora`` needs only torch: it loads the ops (``aqlm_lora.ops``, ``torch.ops.aqlm_lora.*``)
and the functional entry points ``aqlm_linear`` / ``aqlm_lora_linear``. The PEFT layer
(``AqlmLoraLinear``, ``dispatch_aqlm``, ``register``, ``all_linear_targets``, which need ``aqlm``
and ``peft``), the whole-model switch to our kernels (``use_fused_kernels``,
``restore_aqlm_kernels``, ``FusedKernels``, torch only) and the
quantizer (``parse_scheme``, ``quantize_linear``, ``quantize_model``) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import ops
from .functional import aqlm_linear, aqlm_lora_linear, aqlm_lora_mixed_linear

# Top-level name -> submodule that defines it, imported on first attribute access.
_LAZY = {
    "AqlmLoraLinear": "lora.layer",
    "dispatch_aqlm": "lora.dispatch",
    "register": "lora.dispatch",
    "all_linear_targets": "lora.dispatch",
    "use_fused_kernels": "lora.fused_base",
    "restore_aqlm_kernels": "lora.fused_base",
    "FusedKernels": "lora.fused_base",
    "parse_scheme": "scheme",
    "Scheme": "scheme",
    "merge_and_quantize": "lora.requantize",
    "merge_and_unload": "lora.merge",
    "quantize_linear": "quantize",
    "quantize_model": "quantize",
}
# Third-party packages the lazy submodules import; a missing one gets a message naming it.
_OPTIONAL = {"aqlm": "aqlm", "peft": "peft", "transformers": "transformers"}

__all__ = [
    "ops",
    "aqlm_linear",
    "aqlm_lora_linear",
    "aqlm_lora_mixed_linear",
    "AqlmLoraLinear",
    "dispatch_aqlm",
    "register",
    "all_linear_targets",
    "use_fused_kernels",
    "restore_aqlm_kernels",
    "FusedKernels",
    "Scheme",
    "parse_scheme",
    "merge_and_quantize",
    "merge_and_unload",
    "quantize_linear",
    "quantize_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    submodule = _LAZY.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{submodule}", __name__)
    except ImportError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in _OPTIONAL:
            raise
        raise ImportError(
            f"aqlm_lora.{name} needs the '{missing}' package, which is not installed "
            f"(pip install {_OPTIONAL[missing]}); the ops and aqlm_lora.aqlm_linear / "
            "aqlm_lora.aqlm_lora_linear work without it",
            name=missing,
        ) from err
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
