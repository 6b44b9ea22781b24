"""The schemes and dtypes the tests sweep, random weights (``aqlm_lora.scheme``), devices, tolerances."""

from __future__ import annotations

import torch
from torch import Tensor

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


def assert_close_fp32(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    """float32: max error within rtol of the output's scale."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


def assert_low_precision_ok(actual: Tensor, plain: Tensor, exact: Tensor) -> None:
    """Low precision: our error vs an fp32 reference is at most 2x plain PyTorch's at that dtype."""
    assert actual.shape == exact.shape and actual.dtype == plain.dtype
    if exact.numel() == 0:
        return
    ours = (actual.double() - exact.double()).abs().max().item()
    theirs = (plain.double() - exact.double()).abs().max().item()
    floor = 1e-6 * max(1.0, exact.abs().max().item())
    assert ours <= 2 * theirs + floor, f"error {ours:.3g} > 2 x plain PyTorch's {theirs:.3g}"
