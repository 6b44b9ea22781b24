"""The schemes and dtypes the tests sweep, random weights (from ``aqlm_lora.scheme``) and the devices
they run on. The tolerance rules are in tests/support/tolerances.py."""

from __future__ import annotations

import torch

from aqlm_lora.scheme import AqlmWeight, Scheme, random_weight  # noqa: F401  (re-exported for the tests)

SCHEMES = [
    Scheme(1, 16),
    Scheme(2, 8),
    Scheme(1, 8),
    Scheme(4, 8),
    Scheme(1, 16, in_group_size=16),
    Scheme(2, 8, out_group_size=2),
]
SCHEME_IDS = [str(s) for s in SCHEMES]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def cuda_kernels_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("aqlm_lora::aqlm_gemm", "CUDA")


def devices() -> list[str]:
    """CPU always; CUDA when a GPU is present and the CUDA kernels were built."""
    found = ["cpu"]
    if torch.cuda.is_available() and cuda_kernels_built():
        found.append("cuda")
    return found
