"""Fused LoRA on AQLM-quantized linear layers (CPU and CUDA kernels, PEFT drop-in)."""

from . import ops
from .dispatch import dispatch_aqlm, register
from .layer import AqlmLoraLinear
from .ops import aqlm_linear, aqlm_lora_linear

__all__ = ["ops", "aqlm_linear", "aqlm_lora_linear", "AqlmLoraLinear", "dispatch_aqlm", "register"]
__version__ = "0.1.0"
