"""Fused LoRA on AQLM-quantized linear layers (CPU and CUDA kernels, PEFT drop-in)."""

from . import ops
from .dispatch import dispatch_aqlm, register
from .layer import AqlmLoraLinear
from .ops import aqlm_linear, aqlm_lora_linear
from .quantize import parse_scheme, quantize_linear, quantize_model

__all__ = [
    "ops",
    "aqlm_linear",
    "aqlm_lora_linear",
    "AqlmLoraLinear",
    "dispatch_aqlm",
    "register",
    "parse_scheme",
    "quantize_linear",
    "quantize_model",
]
__version__ = "0.1.0"
