"""Shared test helpers: AQLM schemes, random weights, devices, and the tolerance rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Scheme:
    num_codebooks: int
    nbits: int
    in_group: int = 8
    out_group: int = 1

    @property
    def id(self) -> str:
        suffix = "" if self.out_group == 1 else f"o{self.out_group}"
        return f"{self.num_codebooks}x{self.nbits}g{self.in_group}{suffix}"

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.nbits <= 8 else torch.int16


SCHEMES = [
    Scheme(1, 16),
    Scheme(2, 8),
    Scheme(1, 8),
    Scheme(4, 8),
    Scheme(1, 16, in_group=16),
    Scheme(2, 8, out_group=2),
]
SCHEME_IDS = [s.id for s in SCHEMES]

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


@dataclass
class AqlmWeight:
    codes: Tensor
    codebooks: Tensor
    scales: Tensor
    bias: Optional[Tensor]
    scheme: Scheme

    @property
    def out_features(self) -> int:
        return self.codes.shape[0] * self.scheme.out_group

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * self.scheme.in_group

    def args(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.codes, self.codebooks, self.scales


def make_weight(
    scheme: Scheme,
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    bias: bool = False,
    generator: Optional[torch.Generator] = None,
) -> AqlmWeight:
    """A random AQLM weight whose codes cover the full signed range of their storage dtype."""
    g = generator or torch.Generator().manual_seed(0)
    info = torch.iinfo(scheme.code_dtype)
    shape = (out_features // scheme.out_group, in_features // scheme.in_group, scheme.num_codebooks)
    codes = torch.randint(info.min, info.max + 1, shape, generator=g, dtype=torch.int64).to(scheme.code_dtype)
    codebooks = torch.randn(
        scheme.num_codebooks, 2**scheme.nbits, scheme.out_group, scheme.in_group, generator=g
    ) / math.sqrt(scheme.num_codebooks * scheme.in_group)
    scales = torch.rand(shape[0], 1, 1, 1, generator=g) + 0.5
    b = torch.randn(out_features, generator=g) if bias else None
    to = dict(device=device, dtype=dtype)
    return AqlmWeight(
        codes.to(device),
        codebooks.to(**to),
        scales.to(**to),
        None if b is None else b.to(**to),
        scheme,
    )


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
