"""What the fuzz tests (tests/ops/test_fuzz.py) draw: layer cases over the whole AQLM parameter
space, non-finite cases, and the tensors of a case in the memory layouts it names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st
from torch import Tensor

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LORA_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "transposed", "strided", "offset", "broadcast"]
GROUP_SIZES = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 63, 64]
ROWS = [0, 1, 2, 3, 7, 8, 9, 15, 16, 63, 64, 65, 128, 129, 300, 600]
MAX_FEATURES = 256
MAX_ROW_WORK = 1 << 22  # N * in_features * out_features (about): keeps each example fast
MAX_CODEBOOK_ELEMENTS = 1 << 18  # C * 2**nbits * og * ig: keeps each example fast

# Mirrors of the CPU kernels' thresholds (csrc/cpu/decode.cpp), only to label examples.
DECODE_MAX_ROWS = 8
DECODE_MAX_ACCUMULATORS = 64
LUT_MAX_BYTES = 8 << 20


def kernel_path(nbits: int, num_codebooks: int, out_group: int, in_groups: int, n: int) -> str:
    if n == 0:
        return "empty"
    if n <= DECODE_MAX_ROWS and out_group * n <= DECODE_MAX_ACCUMULATORS:
        if nbits > 8:
            return "decode-gather"
        if in_groups * num_codebooks * 2**nbits * out_group * n * 4 <= LUT_MAX_BYTES:
            return "decode-lut"
    return "blocked"


@dataclass(frozen=True)
class Geometry:
    """A layer's AQLM format: codebooks of 2**nbits codes over [out_group, in_group] blocks, a grid
    of [out_groups, in_groups] blocks."""

    nbits: int
    num_codebooks: int
    out_group: int
    in_group: int
    out_groups: int
    in_groups: int

    @property
    def in_features(self) -> int:
        return self.in_groups * self.in_group

    @property
    def out_features(self) -> int:
        return self.out_groups * self.out_group

    @property
    def path(self) -> str:
        """The CPU kernel path the case's N rows take."""
        return kernel_path(self.nbits, self.num_codebooks, self.out_group, self.in_groups, self.n)


# ---------------------------------------------------------------------------------------------
# Layer cases


def _group_size(limit: int) -> st.SearchStrategy[int]:
    special = [g for g in GROUP_SIZES if g <= limit]
    return st.one_of(st.sampled_from(special), st.integers(1, limit))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _leading_dims(draw, n: int, ndim: int) -> tuple[int, ...]:
    """Leading dims of an ndim-d input with N = n rows (ndim 1: a single row)."""
    if ndim == 1:
        return ()
    if n == 0:
        dims = [draw(st.integers(0, 3)) for _ in range(ndim - 1)]
        dims[draw(st.integers(0, ndim - 2))] = 0
        return tuple(dims)
    dims, rest = [], n
    for _ in range(ndim - 2):
        d = draw(st.sampled_from(_divisors(rest)))
        dims.append(d)
        rest //= d
    return (*dims, rest)


@dataclass(frozen=True)
class LayerCase(Geometry):
    code_dtype: torch.dtype
    leading: tuple[int, ...]  # input shape = (*leading, in_features)
    rank: int
    input_dtype: torch.dtype
    codebook_dtype: torch.dtype
    scales_dtype: torch.dtype
    bias_dtype: Optional[torch.dtype]  # None: no bias
    lora_dtype: torch.dtype
    lora_bias_dtype: Optional[torch.dtype]  # None: no lora_bias
    scaling: float
    dropout_p: float
    seed: int
    offset: int
    x_layout: str
    grad_layout: str
    weight_layout: str
    lora_layout: str
    vector_layout: str
    x_scale: float
    grad_mean: float  # large means make fp16 column sums of the output gradient overflow
    data_seed: int

    @property
    def n(self) -> int:
        return math.prod(self.leading)


@st.composite
def layer_cases(draw) -> LayerCase:
    nbits = draw(st.integers(1, 16))
    size = 2**nbits
    num_codebooks = draw(st.integers(1, max(1, min(8, MAX_CODEBOOK_ELEMENTS // size))))
    room = max(1, MAX_CODEBOOK_ELEMENTS // (num_codebooks * size))  # og * ig budget
    in_group = draw(_group_size(min(64, room)))
    out_group = draw(_group_size(min(64, max(1, room // in_group))))
    wide = nbits > 8 or draw(st.booleans())
    ndim = draw(st.integers(1, 4))
    n = 1 if ndim == 1 else draw(st.one_of(st.sampled_from(ROWS), st.integers(0, 600)))
    in_groups = draw(st.integers(1, MAX_FEATURES // in_group))
    out_room = MAX_ROW_WORK // (max(1, n) * in_groups * in_group * out_group)  # many rows: smaller weights
    out_groups = draw(st.integers(1, max(1, min(MAX_FEATURES // out_group, out_room))))
    optional_float = st.one_of(st.none(), st.sampled_from(FLOATS))
    return LayerCase(
        nbits=nbits,
        num_codebooks=num_codebooks,
        out_group=out_group,
        in_group=in_group,
        out_groups=out_groups,
        in_groups=in_groups,
        code_dtype=torch.int16 if wide else torch.int8,
        leading=draw(_leading_dims(n, ndim)),
        rank=draw(st.integers(0, 8)),
        input_dtype=draw(st.sampled_from(FLOATS)),
        codebook_dtype=draw(st.sampled_from(FLOATS)),
        scales_dtype=draw(st.sampled_from(FLOATS)),
        bias_dtype=draw(optional_float),
        lora_dtype=draw(st.sampled_from(LORA_DTYPES)),
        lora_bias_dtype=draw(optional_float),
        scaling=draw(st.one_of(st.sampled_from([1.0, 0.5, 2.0, -1.25, 0.0]), st.floats(-4, 4))),
        dropout_p=draw(st.one_of(st.sampled_from([0.0, 0.1, 0.5]), st.floats(0.0, 0.95))),
        seed=draw(st.integers(0, 2**63 - 1)),
        offset=draw(st.integers(0, 2**63 - 1)),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        grad_layout=draw(st.sampled_from(LAYOUTS)),
        weight_layout=draw(st.sampled_from(LAYOUTS)),
        lora_layout=draw(st.sampled_from(LAYOUTS)),
        vector_layout=draw(st.sampled_from(LAYOUTS)),
        x_scale=draw(st.sampled_from([1.0, 1e-3, 16.0])),
        grad_mean=draw(st.sampled_from([0.0, 1.0, 200.0])),
        data_seed=draw(st.integers(0, 2**32 - 1)),
    )


# ---------------------------------------------------------------------------------------------
# Non-finite cases: NaN/±Inf in the inputs, small layers


@dataclass(frozen=True)
class NonFiniteCase(Geometry):
    n: int
    input_dtype: torch.dtype
    codebook_dtype: torch.dtype
    rank: int
    specials: tuple[tuple[int, float], ...]  # (flat position mod numel, value) in x and in grad
    data_seed: int


@st.composite
def nonfinite_cases(draw) -> NonFiniteCase:
    nbits = draw(st.integers(1, 16))
    num_codebooks = draw(st.integers(1, max(1, min(4, (1 << 16) // 2**nbits))))
    in_group = draw(_group_size(16 if nbits < 14 else 4))
    out_group = draw(_group_size(4))
    specials = st.tuples(st.integers(0, 10**6), st.sampled_from([math.nan, math.inf, -math.inf]))
    return NonFiniteCase(
        nbits=nbits,
        num_codebooks=num_codebooks,
        out_group=out_group,
        in_group=in_group,
        out_groups=draw(st.integers(1, 64 // out_group)),
        in_groups=draw(st.integers(1, 64 // in_group)),
        n=draw(st.one_of(st.sampled_from([1, 2, 8, 9, 16]), st.integers(1, 20))),
        input_dtype=draw(st.sampled_from(FLOATS)),
        codebook_dtype=draw(st.sampled_from(FLOATS)),
        rank=draw(st.integers(1, 4)),
        specials=tuple(draw(st.lists(specials, min_size=1, max_size=4))),
        data_seed=draw(st.integers(0, 2**32 - 1)),
    )


# ---------------------------------------------------------------------------------------------
# Tensors of a layer case


def relayout(t: Tensor, layout: str) -> Tensor:
    """``t`` as a tensor with these values (broadcast: t[0] repeated) and the given memory layout."""
    if layout == "transposed" and t.dim() >= 2:
        dims = list(reversed(range(t.dim())))
        return t.permute(dims).contiguous().permute(dims)
    if layout == "strided":
        buf = t.new_zeros((*t.shape[:-1], 2 * t.shape[-1] + 1))
        buf[..., 1::2] = t
        return buf[..., 1::2]  # stride 2 along the last dim, storage offset 1
    if layout == "offset":
        flat = t.new_zeros(t.numel() + 5)
        flat[5:] = t.reshape(-1)
        return flat[5:].view(t.shape)
    if layout == "broadcast" and t.dim() >= 1 and t.shape[0] > 1:
        return t[:1].expand(t.shape)  # stride 0 along dim 0
    return t.contiguous()


@dataclass
class LayerTensors:
    x: Tensor
    grad: Tensor
    codes: Tensor
    codebooks: Tensor
    scales: Tensor
    bias: Optional[Tensor]
    lora_A: Tensor
    lora_B: Tensor
    lora_bias: Optional[Tensor]

    def weight(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.codes, self.codebooks, self.scales


def make_tensors(case: LayerCase) -> LayerTensors:
    g = torch.Generator().manual_seed(case.data_seed)

    def randn(*shape: int, scale: float = 1.0, mean: float = 0.0) -> Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale + mean

    info = torch.iinfo(case.code_dtype)
    code_shape = (case.out_groups, case.in_groups, case.num_codebooks)
    codes = torch.randint(info.min, info.max + 1, code_shape, generator=g, dtype=torch.int64).to(case.code_dtype)
    cb_scale = 1.0 / math.sqrt(case.num_codebooks * case.in_group)
    codebooks = randn(case.num_codebooks, 2**case.nbits, case.out_group, case.in_group, scale=cb_scale)
    signs = torch.randint(0, 2, (case.out_groups, 1, 1, 1), generator=g) * 2 - 1
    scales = (torch.rand(case.out_groups, 1, 1, 1, generator=g, dtype=torch.float64) + 0.5) * signs
    x = randn(*case.leading, case.in_features, scale=case.x_scale)
    grad = randn(*case.leading, case.out_features, mean=case.grad_mean)
    lora_A = randn(case.rank, case.in_features, scale=1.0 / math.sqrt(case.in_features))
    lora_B = randn(case.out_features, case.rank, scale=0.5)
    bias = randn(case.out_features)
    lora_bias = randn(case.out_features)

    def vector(t: Tensor, dtype: Optional[torch.dtype]) -> Optional[Tensor]:
        return None if dtype is None else relayout(t.to(dtype), case.vector_layout)

    return LayerTensors(
        x=relayout(x.to(case.input_dtype), case.x_layout),
        grad=relayout(grad.to(case.input_dtype), case.grad_layout),
        codes=relayout(codes, case.weight_layout),
        codebooks=relayout(codebooks.to(case.codebook_dtype), case.weight_layout),
        scales=relayout(scales.to(case.scales_dtype), case.weight_layout),
        bias=vector(bias, case.bias_dtype),
        lora_A=relayout(lora_A.to(case.lora_dtype), case.lora_layout),
        lora_B=relayout(lora_B.to(case.lora_dtype), case.lora_layout),
        lora_bias=vector(lora_bias, case.lora_bias_dtype),
    )
