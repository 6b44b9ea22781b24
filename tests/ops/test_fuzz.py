"""Property-based fuzzing of every op, the fake kernels and both autograd entry points (issue 10).

Hypothesis draws the whole AQLM parameter space: 1..8 codebooks of 1..16 bits (int8 or int16
codes), in/out groups 1..64, feature counts up to 256, N 0..600 rows (both sides of every CPU
kernel threshold: decode for N <= 8, lookup tables for nbits <= 8, codebook gathers otherwise,
blocked dequantize + GEMM for more rows), 1-4-d inputs, non-contiguous layouts (transposed,
strided with a storage offset, offset, broadcast with stride 0) of every tensor argument, every
dtype mix, bias, LoRA bias, dropout and scaling. Each example checks:

* every op, the autograd entry points (``aqlm_lora_linear``, ``aqlm_linear``) and
  ``aqlm_lora.reference`` against the float64 oracle of ``tests/support/fuzz_oracle.py``, elementwise,
  with a bound scaled by the magnitude of the terms:
  ``|ours - exact| <= eps(out dtype) * |exact| + rtol(acc) * sum|terms| + (roundings the op
  documents)``, rtol 1e-5 for float32 accumulation and 1e-12 for float64;
* bf16/fp16 outputs also against the project's rule (tests/support/weights.assert_low_precision_ok: at
  most 2x the error of plain PyTorch at that dtype, both vs float64);
* the dropout mask against the reference Philox, bit for bit;
* the fake kernels against the real outputs: shape, dtype and significant strides.

A second, smaller property puts NaN/±Inf into the inputs and compares where non-finite values
come out with F.linear on the dequantized weight in float64.

Profiles: CI runs AQLM_LORA_FUZZ_EXAMPLES=200 layer examples (the default; the non-finite
property runs half as many) from a fixed seed (AQLM_LORA_FUZZ_SEED, default 0), so a CI failure
replays locally; about 15-20 s on 2 idle cores. A long run::

    AQLM_LORA_FUZZ_EXAMPLES=5000 AQLM_LORA_FUZZ_SEED=$RANDOM .venv/bin/python -m pytest tests/ops/test_fuzz.py -s

Each test prints how many examples ran and which kernel paths they took (a ``fuzz:`` line).
Each check raises its own AssertionError subclass, so hypothesis shrinks distinct failing checks
separately and reports one minimal example for each. Hypothesis stops drawing new examples at
the first failure, so one bug can hide another: AQLM_LORA_FUZZ_ONLY=prefix,... makes only the
checks whose names start with one of the prefixes fail (e.g. ``fake.`` or ``aqlm_lora_linear.``).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, seed, settings
from hypothesis import strategies as st
from torch import Tensor

from aqlm_lora import ops
from aqlm_lora import reference as ref
from tests.support import fuzz_oracle as oracle
from tests.support.weights import assert_low_precision_ok

EXAMPLES = int(os.environ.get("AQLM_LORA_FUZZ_EXAMPLES", "200"))
FUZZ_SEED = int(os.environ.get("AQLM_LORA_FUZZ_SEED", "0"))
# Triage: only these checks (comma-separated name prefixes, e.g. "aqlm_lora_linear.dlora_bias,fake.")
# fail, so a known bug does not hide the others (hypothesis stops generating at its first failure).
ONLY = tuple(c for c in os.environ.get("AQLM_LORA_FUZZ_ONLY", "").split(",") if c)

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


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


# With native bf16 dot products the CPU kernels run bf16 many-row GEMMs in bf16 (W rounded to
# bf16, as plain bf16 PyTorch does): one more bf16 rounding of the base layer's terms.
NATIVE_BF16 = _cpu_has_native_bf16()

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def kernel_path(nbits: int, num_codebooks: int, out_group: int, in_groups: int, n: int) -> str:
    if n == 0:
        return "empty"
    if n <= DECODE_MAX_ROWS and out_group * n <= DECODE_MAX_ACCUMULATORS:
        if nbits > 8:
            return "decode-gather"
        if in_groups * num_codebooks * 2**nbits * out_group * n * 4 <= LUT_MAX_BYTES:
            return "decode-lut"
    return "blocked"


# ---------------------------------------------------------------------------------------------
# Strategies


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
class LayerCase:
    nbits: int
    num_codebooks: int
    out_group: int
    in_group: int
    out_groups: int
    in_groups: int
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

    @property
    def in_features(self) -> int:
        return self.in_groups * self.in_group

    @property
    def out_features(self) -> int:
        return self.out_groups * self.out_group

    @property
    def path(self) -> str:
        return kernel_path(self.nbits, self.num_codebooks, self.out_group, self.in_groups, self.n)


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
# Tensors


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


# ---------------------------------------------------------------------------------------------
# Checks


_MISMATCH_TYPES: dict[str, type] = {}


def mismatch(check: str) -> type:
    """One AssertionError subclass per check, so hypothesis tells the failing checks apart."""
    if check not in _MISMATCH_TYPES:
        name = "Mismatch_" + "".join(c if c.isalnum() else "_" for c in check)
        _MISMATCH_TYPES[check] = type(name, (AssertionError,), {})
    return _MISMATCH_TYPES[check]


def fail(check: str, message: str) -> None:
    if ONLY and not check.startswith(ONLY):
        return
    raise mismatch(check)(f"{check}: {message}")


UNDERFLOW_TERMS = 1024  # terms whose underflow (flushed to zero, at worst) one output may absorb


def acc_rtol(acc: torch.dtype) -> float:
    """Error allowance of one op's accumulation, relative to the sum of |terms|."""
    return 1e-12 if acc == torch.float64 else 1e-5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def check_close(
    check: str,
    actual: Tensor,
    want: oracle.Value,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    acc: torch.dtype,
    extra: Optional[np.ndarray] = None,
) -> None:
    """Elementwise: |actual - exact| <= eps(dtype) |exact| + rtol(acc) * mag + extra + floor.

    The floor covers underflow: the output dtype's subnormal spacing, and values below the
    accumulation dtype's normal range (a float32-accumulated result cannot hold 1e-100)."""
    if tuple(actual.shape) != tuple(shape) or actual.dtype != dtype:
        return fail(check, f"{tuple(actual.shape)} {actual.dtype}, expected {tuple(shape)} {dtype}")
    got = oracle.f64(actual).reshape(want.exact.shape)
    info = torch.finfo(dtype)
    floor = info.tiny * info.eps + UNDERFLOW_TERMS * torch.finfo(acc).tiny
    bound = info.eps * np.abs(want.exact) + acc_rtol(acc) * want.mag + floor
    if extra is not None:
        bound = bound + extra
    err = np.abs(got - want.exact)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(err / bound, nan=np.inf), -1.0)), err.shape)
        fail(
            check,
            f"{int(bad.sum())} of {bad.size} elements off; worst at {tuple(int(i) for i in idx)}: "
            f"got {float(got[idx])!r}, exact {float(want.exact[idx])!r}, error {err[idx]:.3g} > bound {bound[idx]:.3g} "
            f"(sum|terms| {want.mag[idx]:.3g})",
        )


def check_plain_rule(check: str, actual: Tensor, plain: Tensor, want: oracle.Value) -> None:
    """bf16/fp16: the project's rule (tests.support.weights.assert_low_precision_ok) against the float64 oracle."""
    if actual.dtype not in (torch.bfloat16, torch.float16):
        return
    exact = torch.from_numpy(want.exact).reshape(actual.shape)
    try:
        assert_low_precision_ok(actual, plain, exact)
    except AssertionError as e:
        fail(check, str(e))


def _meta(t):
    """A meta tensor with t's shape, strides and dtype (a cheap stand-in for a FakeTensor)."""
    if not isinstance(t, Tensor):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def check_fake(check: str, op: Callable, args: tuple, real: tuple[Tensor, ...]) -> None:
    """The fake kernel (registered for meta tensors too) gives the real outputs' shapes, dtypes and
    significant strides (those of dims longer than 1)."""
    fake = op(*(_meta(a) for a in args))
    fake = fake if isinstance(fake, tuple) else (fake,)
    for i, (r, f) in enumerate(zip(real, fake)):
        if tuple(r.shape) != tuple(f.shape) or r.dtype != f.dtype:
            fail(check, f"output {i}: fake {tuple(f.shape)} {f.dtype}, real {tuple(r.shape)} {r.dtype}")
        significant = [d for d in range(r.dim()) if r.shape[d] > 1]
        if r.numel() > 0 and any(r.stride(d) != f.stride(d) for d in significant):
            fail(check, f"output {i} of shape {tuple(r.shape)}: fake strides {f.stride()}, real {r.stride()}")


def overflows(value: np.ndarray, dtype: Optional[torch.dtype]) -> bool:
    """Whether exact results come near the largest finite value of their (fp16) output dtype."""
    if dtype is None or value.size == 0:
        return False
    return bool(np.abs(value).max() > torch.finfo(dtype).max / 2)


# ---------------------------------------------------------------------------------------------
# The layer property


STATS: dict[str, Counter] = {"layer": Counter(), "nonfinite": Counter()}


def _rows(t: Tensor, features: int) -> np.ndarray:
    return oracle.f64(t).reshape(-1, features)


MASK_SAMPLES = 4096
# The reference is slow on purpose (Python Philox, a [O, I, C, og, ig] gather): it is checked on
# the examples whose weight has at most this many codebook terms and, with dropout, whose input
# has at most REFERENCE_DROPOUT_NUMEL elements; the ops are checked on every example.
REFERENCE_MAX_TERMS = 1 << 16
REFERENCE_DROPOUT_NUMEL = 1 << 14


def check_mask(keep: Tensor, x: Tensor, p: float, seed_: int, offset: int) -> None:
    if keep.shape != x.shape or keep.dtype != torch.bool:
        fail("dropout_mask", f"shape {tuple(keep.shape)} {keep.dtype}, expected {tuple(x.shape)} bool")
    flat = keep.reshape(-1)
    if flat.numel() <= MASK_SAMPLES:
        want = ref.dropout_mask(flat, p, seed_, offset)
        index = torch.arange(flat.numel())
    else:
        g = torch.Generator().manual_seed(seed_ ^ offset)
        index = torch.randint(0, flat.numel(), (MASK_SAMPLES,), generator=g)
        words = torch.stack(ref.philox4x32_10(index >> 2, offset, seed_), dim=-1)
        word = words.gather(1, (index & 3).unsqueeze(1)).squeeze(1)
        want = (word >> 8).to(torch.float32) * (1.0 / 16777216.0) >= torch.tensor(p, dtype=torch.float32)
        flat = flat[index]
    if not torch.equal(flat, want):
        bad = index[(flat != want).nonzero()[0]].item()
        fail(
            "dropout_mask",
            f"differs from the reference Philox at element {bad} (and {int((flat != want).sum())} in all)",
        )


def run_layer_case(case: LayerCase) -> None:
    t = make_tensors(case)
    n, fin, fout = case.n, case.in_features, case.out_features
    in_shape, out_shape = t.x.shape, t.grad.shape
    dt, acc = case.input_dtype, compute_dtype(case.input_dtype)
    s, p = case.scaling, case.dropout_p
    seed_, offset = case.seed, case.offset

    # The float64 oracle, first: examples whose exact fp16 outputs overflow are not valid.
    w = oracle.dequantize(*t.weight())
    if w.exact.size <= 64:
        np.testing.assert_allclose(w.exact, oracle.dequantize_by_element(*t.weight()), rtol=1e-13, atol=1e-300)
    x, g = _rows(t.x, fin), _rows(t.grad, fout)
    keep = ops.dropout_mask(t.x, p, seed_, offset) if p > 0 else None
    keep_np = None if keep is None else keep.numpy().reshape(n, fin)
    fwd = oracle.forward(x, w, t.bias, t.lora_A, t.lora_B, t.lora_bias, s, keep_np, p)
    bwd = oracle.backward(g, fwd, w, t.lora_A, t.lora_B, s, keep_np, p)
    base = oracle.forward(x, w, t.bias, None, None, None, 0.0, None, 0.0).out
    gemm_t = oracle.base_backward(g, w)
    assume(not overflows(w.exact, case.codebook_dtype))
    for value in (fwd.out.exact, base.exact, gemm_t.exact, bwd.dx.exact):
        assume(not overflows(value, dt))
    assume(not overflows(bwd.dbias.exact, case.bias_dtype))
    assume(not overflows(bwd.dlora_bias.exact, case.lora_bias_dtype))

    STATS["layer"][case.path] += 1
    STATS["layer"]["examples"] += 1
    event(f"path={case.path}")
    event(f"input={dt}")

    # One more bf16 rounding of the base layer's terms on the bf16-GEMM path (see NATIVE_BF16).
    bf16_gemm = NATIVE_BF16 and dt == torch.bfloat16 and case.path == "blocked"
    base_extra = eps(torch.bfloat16) * fwd.base.mag if bf16_gemm else None
    base_t_extra = eps(torch.bfloat16) * gemm_t.mag if bf16_gemm else None
    w_acc = compute_dtype(case.codebook_dtype)

    # dequantize
    out = ops.dequantize(*t.weight())
    check_close("dequantize", out, w, case.codebook_dtype, (fout, fin), w_acc)
    check_fake("fake.dequantize", ops.dequantize, t.weight(), (out,))
    small_weight = fout * fin * case.num_codebooks <= REFERENCE_MAX_TERMS
    check_reference = small_weight and (p == 0 or n * fin <= REFERENCE_DROPOUT_NUMEL)
    STATS["layer"]["with-reference"] += check_reference
    if small_weight:
        check_close("reference.dequantize", ref.dequantize(*t.weight()), w, case.codebook_dtype, (fout, fin), w_acc)

    # dropout_mask (the reference's Philox in Python is slow: large masks are checked at sampled elements)
    if keep is not None:
        check_mask(keep, t.x, p, seed_, offset)
        check_fake("fake.dropout_mask", ops.dropout_mask, (t.x, p, seed_, offset), (keep,))

    # W-dense plain PyTorch at the input dtype, for the project's low-precision rule.
    w_dt = torch.from_numpy(w.exact).to(dt)
    bias_dt = None if t.bias is None else t.bias.to(dt)

    # aqlm_gemm
    out_base_shape = (*in_shape[:-1], fout)
    args = (t.x, *t.weight(), t.bias)
    out = ops.aqlm_gemm(*args)
    check_close("aqlm_gemm", out, base, dt, out_base_shape, acc, base_extra)
    check_plain_rule("aqlm_gemm.plain_rule", out, F.linear(t.x, w_dt, bias_dt), base)
    check_fake("fake.aqlm_gemm", ops.aqlm_gemm, args, (out,))
    if small_weight:
        check_close("reference.aqlm_gemm", ref.aqlm_gemm(*args), base, dt, out_base_shape, acc)

    # aqlm_gemm_t
    args = (t.grad, *t.weight())
    out = ops.aqlm_gemm_t(*args)
    check_close("aqlm_gemm_t", out, gemm_t, dt, (*out_shape[:-1], fin), acc, base_t_extra)
    check_plain_rule("aqlm_gemm_t.plain_rule", out, t.grad @ w_dt, gemm_t)
    check_fake("fake.aqlm_gemm_t", ops.aqlm_gemm_t, args, (out,))
    if small_weight:
        check_close("reference.aqlm_gemm_t", ref.aqlm_gemm_t(*args), gemm_t, dt, (*out_shape[:-1], fin), acc)

    # lora_forward
    la, lb_dt = case.lora_dtype, case.lora_bias_dtype
    args = (t.x, *t.weight(), t.bias, t.lora_A, t.lora_B, t.lora_bias, s, p, seed_, offset)
    out, xa = ops.lora_forward(*args)
    check_close("lora_forward.out", out, fwd.out, dt, out_shape, acc, base_extra)
    check_close("lora_forward.xa", xa, fwd.xa, la, (n, case.rank), acc)
    xd = t.x if keep is None else t.x * keep.to(dt) / (1.0 - p)
    plain = F.linear(t.x, w_dt, bias_dt) + F.linear(F.linear(xd, t.lora_A.to(dt)), t.lora_B.to(dt)) * s
    if t.lora_bias is not None:
        plain = plain + t.lora_bias.to(dt) * s
    check_plain_rule("lora_forward.plain_rule", out, plain, fwd.out)
    check_fake("fake.lora_forward", ops.lora_forward, args, (out, xa))
    if check_reference:
        r_out, r_xa = ref.lora_forward(*args)
        check_close("reference.lora_forward.out", r_out, fwd.out, dt, out_shape, acc)
        check_close("reference.lora_forward.xa", r_xa, fwd.xa, la, (n, case.rank), acc)

    # lora_backward, given the op's own (rounded) xa
    bwd_xa = oracle.backward(g, fwd, w, t.lora_A, t.lora_B, s, keep_np, p, xa=oracle.f64(xa))
    tail = (*t.weight(), t.lora_A, t.lora_B, s, p, seed_, offset)
    args = (t.grad, t.x, xa, *tail, True)
    dx, da, db = ops.lora_backward(*args)
    check_close("lora_backward.dx", dx, bwd_xa.dx, dt, in_shape, acc, base_t_extra)
    check_close("lora_backward.dA", da, bwd_xa.dA, la, (case.rank, fin), acc)
    check_close("lora_backward.dB", db, bwd_xa.dB, la, (fout, case.rank), acc)
    check_fake("fake.lora_backward", ops.lora_backward, args, (dx, da, db))
    skipped, da2, db2 = ops.lora_backward(*args[:-1], False)
    if skipped.shape != (0,) or not torch.equal(da2, da) or not torch.equal(db2, db):
        fail("lora_backward.no_input_grad", f"grad_input {tuple(skipped.shape)}, or dA/dB differ from input_grad=True")
    check_fake("fake.lora_backward.no_input_grad", ops.lora_backward, (*args[:-1], False), (skipped, da2, db2))
    if check_reference:
        r_dx, r_da, r_db = ref.lora_backward(*args)
        check_close("reference.lora_backward.dx", r_dx, bwd_xa.dx, dt, in_shape, acc)
        check_close("reference.lora_backward.dA", r_da, bwd_xa.dA, la, (case.rank, fin), acc)
        check_close("reference.lora_backward.dB", r_db, bwd_xa.dB, la, (fout, case.rank), acc)

    # Autograd: aqlm_lora_linear. Output and parameter gradients; xa is saved in lora_A's dtype
    # (one rounding in dB), bias gradients may be summed in the output gradient's dtype (one
    # rounding each, as plain PyTorch does when bias is cast to the activations' dtype).
    x_leaf = t.x.detach().requires_grad_()
    leaves = {"x": x_leaf, "lora_A": t.lora_A.detach().requires_grad_(), "lora_B": t.lora_B.detach().requires_grad_()}
    if t.bias is not None:
        leaves["bias"] = t.bias.detach().requires_grad_()
    if t.lora_bias is not None:
        leaves["lora_bias"] = t.lora_bias.detach().requires_grad_()
    y = ops.aqlm_lora_linear(
        x_leaf, *t.weight(), leaves.get("bias"), leaves["lora_A"], leaves["lora_B"], s, p, leaves.get("lora_bias"),
        training=True, seed=seed_, offset=offset,
    )  # fmt: skip
    check_close("aqlm_lora_linear.out", y, fwd.out, dt, out_shape, acc, base_extra)
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), t.grad)))
    check_close("aqlm_lora_linear.dx", grads["x"], bwd.dx, dt, in_shape, acc, base_t_extra)
    check_close("aqlm_lora_linear.dA", grads["lora_A"], bwd.dA, la, (case.rank, fin), acc)
    check_close("aqlm_lora_linear.dB", grads["lora_B"], bwd.dB, la, (fout, case.rank), acc, eps(la) * bwd.dB.mag)
    if "bias" in grads:
        extra = eps(dt) * np.abs(bwd.dbias.exact)
        check_close("aqlm_lora_linear.dbias", grads["bias"], bwd.dbias, case.bias_dtype, (fout,), acc, extra)
    if "lora_bias" in grads:
        extra = 2 * eps(dt) * np.abs(bwd.dlora_bias.exact)
        check_close("aqlm_lora_linear.dlora_bias", grads["lora_bias"], bwd.dlora_bias, lb_dt, (fout,), acc, extra)

    # Autograd: aqlm_linear (base layer only).
    x_leaf = t.x.detach().requires_grad_()
    base_leaves = [x_leaf] + ([leaves["bias"]] if t.bias is not None else [])
    y = ops.aqlm_linear(x_leaf, *t.weight(), base_leaves[1] if t.bias is not None else None)
    check_close("aqlm_linear.out", y, base, dt, out_base_shape, acc, base_extra)
    base_grads = torch.autograd.grad(y, base_leaves, t.grad)
    check_close("aqlm_linear.dx", base_grads[0], gemm_t, dt, in_shape, acc, base_t_extra)
    if t.bias is not None:
        extra = eps(dt) * np.abs(bwd.dbias.exact)
        check_close("aqlm_linear.dbias", base_grads[1], bwd.dbias, case.bias_dtype, (fout,), acc, extra)


def _summary(name: str) -> str:
    counts = STATS[name]
    rest = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "examples")
    return (
        f"fuzz: {name}: {counts['examples']} examples run, shrinking included ({rest}); "
        f"max_examples={EXAMPLES}, seed={FUZZ_SEED}" + (f", only={','.join(ONLY)}" if ONLY else "")
    )


@seed(FUZZ_SEED)
@SETTINGS
@given(case=layer_cases())
def _layer_property(case: LayerCase) -> None:
    run_layer_case(case)


def test_fuzz_layer(capsys):
    STATS["layer"].clear()
    try:
        _layer_property()
    finally:
        with capsys.disabled():
            print("\n" + _summary("layer"))
    assert STATS["layer"]["examples"] > 0


# ---------------------------------------------------------------------------------------------
# Non-finite inputs: NaN/±Inf come out where F.linear on the dequantized weight puts them.


@dataclass(frozen=True)
class NonFiniteCase:
    nbits: int
    num_codebooks: int
    out_group: int
    in_group: int
    out_groups: int
    in_groups: int
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


def _classes(t: Tensor) -> Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    t = t.detach().double()
    return torch.isnan(t) * 1 + torch.isposinf(t) * 2 + torch.isneginf(t) * 3


def check_nonfinite(check: str, actual: Tensor, expected: Tensor) -> None:
    got, want = _classes(actual), _classes(expected.to(actual.dtype))
    if not torch.equal(got, want):
        names = ["finite", "NaN", "+Inf", "-Inf"]
        idx = tuple(int(i) for i in (got != want).nonzero()[0])
        fail(
            check,
            f"{int((got != want).sum())} elements differ; at {idx}: {names[got[idx]]}, expected {names[want[idx]]}",
        )


def run_nonfinite_case(case: NonFiniteCase) -> None:
    g = torch.Generator().manual_seed(case.data_seed)
    code_dtype = torch.int16 if case.nbits > 8 else torch.int8
    info = torch.iinfo(code_dtype)
    codes = torch.randint(info.min, info.max + 1, (case.out_groups, case.in_groups, case.num_codebooks), generator=g)
    codes = codes.to(code_dtype)
    cb_shape = (case.num_codebooks, 2**case.nbits, case.out_group, case.in_group)
    codebooks = (torch.randn(cb_shape, generator=g) / math.sqrt(case.in_group)).to(case.codebook_dtype)
    scales = (torch.rand(case.out_groups, 1, 1, 1, generator=g) + 0.5).to(case.codebook_dtype)
    fin, fout = case.in_groups * case.in_group, case.out_groups * case.out_group
    dt = case.input_dtype
    x = torch.randn(case.n, fin, generator=g, dtype=torch.float64)
    grad = torch.randn(case.n, fout, generator=g, dtype=torch.float64)
    for pos, value in case.specials:
        x.view(-1)[pos % x.numel()] = value
        grad.view(-1)[pos % grad.numel()] = value
    x, grad = x.to(dt), grad.to(dt)
    lora_A = torch.randn(case.rank, fin, generator=g) / math.sqrt(fin)
    lora_B = torch.randn(fout, case.rank, generator=g)
    w = torch.from_numpy(oracle.dequantize(codes, codebooks, scales).exact)

    STATS["nonfinite"]["examples"] += 1
    STATS["nonfinite"][kernel_path(case.nbits, case.num_codebooks, case.out_group, case.in_groups, case.n)] += 1

    check_nonfinite("nonfinite.aqlm_gemm", ops.aqlm_gemm(x, codes, codebooks, scales, None), F.linear(x.double(), w))
    check_nonfinite("nonfinite.aqlm_gemm_t", ops.aqlm_gemm_t(grad, codes, codebooks, scales), grad.double() @ w)
    out, _ = ops.lora_forward(x, codes, codebooks, scales, None, lora_A, lora_B, None, 0.5, 0.0, 0, 0)
    xd = x.double()
    plain = F.linear(xd, w) + F.linear(F.linear(xd, lora_A.double()), lora_B.double()) * 0.5
    check_nonfinite("nonfinite.lora_forward", out, plain)


@seed(FUZZ_SEED)
@settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))
@given(case=nonfinite_cases())
def _nonfinite_property(case: NonFiniteCase) -> None:
    run_nonfinite_case(case)


def test_fuzz_nonfinite(capsys):
    STATS["nonfinite"].clear()
    try:
        _nonfinite_property()
    finally:
        with capsys.disabled():
            print("\n" + _summary("nonfinite"))
    assert STATS["nonfinite"]["examples"] > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_relayout_keeps_values(layout):
    t = torch.arange(24.0).reshape(2, 3, 4)
    r = relayout(t, layout)
    want = t[:1].expand(t.shape) if layout == "broadcast" else t
    assert torch.equal(r, want)
    if layout == "offset":
        assert r.storage_offset() > 0
    elif layout != "contiguous":
        assert not r.is_contiguous()
