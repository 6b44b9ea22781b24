"""AQLM schemes: the one ``Scheme`` (parse, format), code storage, and random weights.

A scheme ``CxB g<ig> o<og>`` stores each ``og x ig`` group of a weight as ``C`` codes of ``B`` bits
into ``C`` codebooks of ``2**B`` entries. Needs torch only: the quantizer, the tests, both
benchmarks and the GPU smoke test all make their schemes and weights here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

_SCHEME_RE = re.compile(r"^(\d+)x(\d+)(?:g(\d+))?(?:o(\d+))?$")


@dataclass(frozen=True)
class Scheme:
    """An AQLM scheme: ``num_codebooks`` codebooks of ``2**nbits`` entries of ``out_group x in_group``."""

    num_codebooks: int
    nbits: int
    in_group_size: int = 8
    out_group_size: int = 1

    def __post_init__(self):
        for name in ("num_codebooks", "nbits", "in_group_size", "out_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"scheme {name} must be a positive integer, got {value!r}")
        if self.nbits > 16:
            raise ValueError(f"scheme nbits must be 1..16 (codes are int8/int16), got {self.nbits}")
        if self.num_codebooks > 64:
            raise ValueError(f"scheme num_codebooks must be 1..64, got {self.num_codebooks}")

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.nbits <= 8 else torch.int16

    @property
    def bits_per_weight(self) -> float:
        """Bits of codes per weight (scales and codebooks not counted)."""
        return self.num_codebooks * self.nbits / (self.in_group_size * self.out_group_size)

    def __str__(self) -> str:
        text = f"{self.num_codebooks}x{self.nbits}"
        text += f"g{self.in_group_size}" if self.in_group_size != 8 else ""
        return text + (f"o{self.out_group_size}" if self.out_group_size != 1 else "")

    def aqlm_kwargs(self) -> dict[str, int]:
        """The scheme in the argument names ``aqlm.QuantizedLinear`` and ``transformers.AqlmConfig`` share."""
        return dict(
            in_group_size=self.in_group_size,
            out_group_size=self.out_group_size,
            num_codebooks=self.num_codebooks,
            nbits_per_codebook=self.nbits,
        )

    def aqlm_config(self, linear_weights_not_to_quantize: Iterable[str] = ()):
        """The ``transformers.AqlmConfig`` of this scheme."""
        from transformers import AqlmConfig

        return AqlmConfig(**self.aqlm_kwargs(), linear_weights_not_to_quantize=list(linear_weights_not_to_quantize))


SCHEME_GRAMMAR = (
    "<codebooks>x<bits>[g<in_group>][o<out_group>], e.g. 2x8, 1x16, 1x16g16, 2x8g8o2 "
    "(in_group defaults to 8, out_group to 1; bits 1..16)"
)


def parse_scheme(text: Union[str, Scheme]) -> Scheme:
    """Parse a scheme string (grammar: :data:`SCHEME_GRAMMAR`; case and spaces ignored).

    ``"2x8"`` -> 2 codebooks of 2**8 entries, groups of 1 x 8; ``"1x16g16"`` -> 1 codebook of
    2**16 entries of 1 x 16; ``"2x8g8o2"`` -> 2 codebooks of 2 x 8 groups. Raises ``ValueError``.
    """
    if isinstance(text, Scheme):
        return text
    if not isinstance(text, str):
        raise ValueError(f"scheme must be a string like '2x8', got {type(text).__name__}")
    match = _SCHEME_RE.match(text.strip().lower().replace(" ", ""))
    if match is None:
        raise ValueError(f"invalid scheme {text!r}: expected {SCHEME_GRAMMAR}")
    codebooks, bits, in_group, out_group = match.groups()
    try:
        return Scheme(
            num_codebooks=int(codebooks),
            nbits=int(bits),
            in_group_size=int(in_group) if in_group else 8,
            out_group_size=int(out_group) if out_group else 1,
        )
    except ValueError as exc:
        raise ValueError(f"invalid scheme {text!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Code storage


def pack_codes(codes: Tensor, nbits: int) -> Tensor:
    """Code values in ``[0, 2**nbits)`` -> AQLM's signed storage (int8 / int16)."""
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**nbits):
        raise ValueError(f"code values must lie in [0, 2**{nbits})")
    signed = torch.where(codes >= 2 ** (nbits - 1), codes - 2**nbits, codes)
    return signed.to(torch.int8 if nbits <= 8 else torch.int16)


def unpack_codes(codes: Tensor, nbits: int) -> Tensor:
    """AQLM's signed storage -> code values in ``[0, 2**nbits)`` (int64)."""
    return codes.to(torch.int64) % (2**nbits)




# ---------------------------------------------------------------------------------------------
# Random weights (tests, benchmarks, the GPU smoke test)


@dataclass
class AqlmWeight:
    """The tensors of one AQLM layer, in the shapes ``aqlm.QuantizedLinear`` holds them."""

    codes: Tensor  # [out/og, in/ig, C] int8/int16, signed
    codebooks: Tensor  # [C, 2**nbits, og, ig]
    scales: Tensor  # [out/og, 1, 1, 1]
    bias: Optional[Tensor]  # [out] or None
    scheme: Scheme

    @property
    def out_features(self) -> int:
        return self.codes.shape[0] * self.scheme.out_group_size

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * self.scheme.in_group_size

    def args(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, codebooks, scales)``, the order every op takes them in."""
        return self.codes, self.codebooks, self.scales


def random_weight(
    scheme: Union[str, Scheme],
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    bias: bool = False,
    generator: Optional[torch.Generator] = None,
) -> AqlmWeight:
    """A random AQLM weight: codes uniform over the whole signed range of their storage dtype (so
    negative codes and the top entries are exercised), codebooks ``randn / sqrt(C * ig)`` (outputs
    of order one), scales in [0.5, 1.5). Drawn on the CPU, so a seed gives the same weight anywhere."""
    scheme = parse_scheme(scheme)
    og, ig = scheme.out_group_size, scheme.in_group_size
    if out_features % og or in_features % ig:
        raise ValueError(f"a {out_features}x{in_features} weight does not divide into {og}x{ig} groups of {scheme}")
    g = generator or torch.Generator().manual_seed(0)
    info = torch.iinfo(scheme.code_dtype)
    shape = (out_features // og, in_features // ig, scheme.num_codebooks)
    codes = torch.randint(info.min, info.max + 1, shape, generator=g, dtype=torch.int64).to(scheme.code_dtype)
    codebooks = torch.randn(scheme.num_codebooks, scheme.codebook_size, og, ig, generator=g)
    codebooks /= math.sqrt(scheme.num_codebooks * ig)
    scales = torch.rand(shape[0], 1, 1, 1, generator=g) + 0.5
    b = torch.randn(out_features, generator=g) if bias else None
    to = dict(device=device, dtype=dtype)
    return AqlmWeight(
        codes.to(device), codebooks.to(**to), scales.to(**to), None if b is None else b.to(**to), scheme
    )
