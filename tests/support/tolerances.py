"""The suite's tolerance rules, in one place.

* float32 (``assert_close_fp32``): the largest error is within ``rtol`` of the expected tensor's
  scale (its largest magnitude, at least 1).
* bf16/fp16 (``assert_low_precision_ok``): our error against an exact (fp32 or float64) result is
  at most 2x the error of plain PyTorch computing the same thing at that dtype, plus a tiny floor.
* The fuzz tests' elementwise bound against the float64 oracle (``oracle_bound``) applies the
  float32 rule's ``FP32_RTOL`` to each output's sum of |terms| instead of the tensor's scale.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

FP32_RTOL = 1e-5  # float32 accumulation over a few hundred terms stays well inside this
FP64_RTOL = 1e-12
LOW_PRECISION_FACTOR = 2.0  # "at most 2x plain PyTorch's error at that dtype"
LOW_PRECISION_FLOOR = 1e-6  # relative to the exact result's scale: where plain PyTorch happens to be exact
UNDERFLOW_TERMS = 1024  # terms whose underflow (flushed to zero, at worst) one output may absorb


def _label(what: str) -> str:
    return f"{what}: " if what else ""


def _scale(t: Tensor) -> float:
    return max(1.0, t.abs().max().item())


def _max_error(actual: Tensor, expected: Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_close_fp32(
    actual: Optional[Tensor], expected: Optional[Tensor], rtol: float = FP32_RTOL, what: str = ""
) -> None:
    """float32: max |actual - expected| <= rtol * max(1, max |expected|), same shape and dtype.

    Both None passes (a gradient that neither side computes); one None fails."""
    label = _label(what)
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{label}one of the tensors is None"
        return
    assert actual.shape == expected.shape, f"{label}shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{label}dtype {actual.dtype}, expected {expected.dtype}"
    if expected.numel() == 0:
        return
    scale, err = _scale(expected), _max_error(actual, expected)
    assert err <= rtol * scale, f"{label}max error {err:.3g} > {rtol} * {scale:.3g}"


def assert_low_precision_ok(actual: Tensor, plain: Tensor, exact: Tensor, what: str = "") -> None:
    """bf16/fp16: max |actual - exact| <= 2 * max |plain - exact| + 1e-6 * max(1, max |exact|).

    ``plain`` is plain PyTorch at ``actual``'s dtype; ``exact`` an fp32 or float64 result of the
    same computation."""
    label = _label(what)
    shapes = (tuple(actual.shape), tuple(plain.shape), tuple(exact.shape))
    assert shapes[0] == shapes[1] == shapes[2], f"{label}shapes (actual, plain, exact) {shapes}"
    assert actual.dtype == plain.dtype, f"{label}dtype {actual.dtype}, plain PyTorch's {plain.dtype}"
    if exact.numel() == 0:
        return
    ours, theirs = _max_error(actual, exact), _max_error(plain, exact)
    floor = LOW_PRECISION_FLOOR * _scale(exact)
    assert ours <= LOW_PRECISION_FACTOR * theirs + floor, (
        f"{label}error {ours:.3g} > {LOW_PRECISION_FACTOR:g} x plain PyTorch's {theirs:.3g}"
    )


def assert_outputs_and_grads_ok(
    out: Tensor,
    grads: dict[str, Optional[Tensor]],
    exact: tuple[Tensor, dict[str, Optional[Tensor]]],
    plain: Callable[[], tuple[Tensor, dict[str, Optional[Tensor]]]],
    dtype: torch.dtype,
) -> None:
    """A layer's output and gradients against the fp32 ``exact`` ones: fp32 closely; a lower ``dtype``
    within the error of ``plain()`` (the same computation in plain PyTorch at ``dtype``)."""
    exact_out, exact_grads = exact
    assert out.dtype == dtype
    assert grads.keys() == exact_grads.keys()
    if dtype == torch.float32:
        assert_close_fp32(out, exact_out, what="output")
        for name, grad in grads.items():
            assert_close_fp32(grad, exact_grads[name], what=name)
        return
    plain_out, plain_grads = plain()
    assert plain_out.dtype == dtype
    assert_low_precision_ok(out, plain_out, exact_out, what="output")
    for name, grad in grads.items():
        if exact_grads[name] is None:
            assert grad is None and plain_grads[name] is None, name
            continue
        assert grad.dtype == dtype, name
        assert_low_precision_ok(grad, plain_grads[name], exact_grads[name], what=name)


def accumulation_rtol(acc: torch.dtype) -> float:
    """Error allowance of one accumulation in ``acc``, relative to the sum of |terms|."""
    return FP64_RTOL if acc == torch.float64 else FP32_RTOL


def oracle_bound(exact: np.ndarray, mag: np.ndarray, dtype: torch.dtype, acc: torch.dtype) -> np.ndarray:
    """Elementwise bound on |ours - exact| for a result stored in ``dtype``, accumulated in ``acc``:
    eps(dtype) |exact| (the final rounding) + rtol(acc) * sum|terms| (``mag``) + an underflow floor.

    The floor covers the output dtype's subnormal spacing and values below the accumulation dtype's
    normal range (a float32-accumulated result cannot hold 1e-100)."""
    info = torch.finfo(dtype)
    floor = info.tiny * info.eps + UNDERFLOW_TERMS * torch.finfo(acc).tiny
    return info.eps * np.abs(exact) + accumulation_rtol(acc) * mag + floor
