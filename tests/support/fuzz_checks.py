"""How the fuzz tests (tests/ops/test_fuzz.py) judge one result: against the float64 oracle of
tests/support/fuzz_oracle.py (the elementwise bound of tests/support/tolerances.py), the
low-precision rule, the fake kernels, the reference Philox mask and non-finite propagation.

Each check raises its own AssertionError subclass, so hypothesis shrinks distinct failing checks
separately. AQLM_LORA_FUZZ_ONLY=prefix,... makes only the checks whose names start with one of
the prefixes fail (hypothesis stops at the first failure, so one known bug can hide another)."""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from aqlm_lora import reference as ref
from tests.support import fuzz_oracle as oracle
from tests.support.tolerances import assert_low_precision_ok, oracle_bound

# Triage: only these checks (comma-separated name prefixes, e.g. "aqlm_lora_linear.dlora_bias,fake.")
# fail, so a known bug does not hide the others.
ONLY = tuple(c for c in os.environ.get("AQLM_LORA_FUZZ_ONLY", "").split(",") if c)
MASK_SAMPLES = 4096  # larger masks are checked at this many sampled elements (Python Philox is slow)

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


def check_close(
    check: str,
    actual: Tensor,
    want: oracle.Value,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    acc: torch.dtype,
    extra: Optional[np.ndarray] = None,
) -> None:
    """Elementwise: |actual - exact| <= tolerances.oracle_bound(...) + extra (roundings the op documents)."""
    if tuple(actual.shape) != tuple(shape) or actual.dtype != dtype:
        return fail(check, f"{tuple(actual.shape)} {actual.dtype}, expected {tuple(shape)} {dtype}")
    got = oracle.f64(actual).reshape(want.exact.shape)
    bound = oracle_bound(want.exact, want.mag, dtype, acc)
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
    """bf16/fp16: tolerances.assert_low_precision_ok against the float64 oracle."""
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


def check_mask(keep: Tensor, x: Tensor, p: float, seed_: int, offset: int) -> None:
    """The dropout mask equals the reference Philox's bit for bit (large masks at sampled elements)."""
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


def _classes(t: Tensor) -> Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    t = t.detach().double()
    return torch.isnan(t) * 1 + torch.isposinf(t) * 2 + torch.isneginf(t) * 3


def check_nonfinite(check: str, actual: Tensor, expected: Tensor) -> None:
    """NaN, +Inf and -Inf come out exactly where they do in ``expected`` (cast to actual's dtype)."""
    got, want = _classes(actual), _classes(expected.to(actual.dtype))
    if not torch.equal(got, want):
        names = ["finite", "NaN", "+Inf", "-Inf"]
        idx = tuple(int(i) for i in (got != want).nonzero()[0])
        fail(
            check,
            f"{int((got != want).sum())} elements differ; at {idx}: {names[got[idx]]}, expected {names[want[idx]]}",
        )
