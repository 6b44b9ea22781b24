"""Fused LoRA on AQLM-quantized linear layers (CPU and CUDA kernels, PEFT drop-in)."""

from . import ops
from .ops import aqlm_linear, aqlm_lora_linear

__all__ = ["ops", "aqlm_linear", "aqlm_lora_linear"]
__version__ = "0.1.0"
