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
* bf16/fp16 outputs also against the project's rule (tests/support/tolerances.assert_low_precision_ok:
  at most 2x the error of plain PyTorch at that dtype, both vs float64);
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

The cases are drawn in tests/support/fuzz_cases.py, run in tests/support/fuzz_runs.py and judged
in tests/support/fuzz_checks.py (bounds from tests/support/tolerances.py).
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.support.fuzz_cases import LAYOUTS, layer_cases, nonfinite_cases, relayout
from tests.support.fuzz_checks import ONLY
from tests.support.fuzz_runs import STATS, run_layer_case, run_nonfinite_case

EXAMPLES = int(os.environ.get("AQLM_LORA_FUZZ_EXAMPLES", "200"))
FUZZ_SEED = int(os.environ.get("AQLM_LORA_FUZZ_SEED", "0"))

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz_property(cases: st.SearchStrategy, run: Callable[..., None], max_examples: int) -> Callable[[], None]:
    """``run`` on ``max_examples`` cases drawn from the fixed seed, so a CI failure replays locally."""

    @seed(FUZZ_SEED)
    @settings(SETTINGS, max_examples=max_examples)
    @given(case=cases)
    def prop(case) -> None:
        run(case)

    return prop


def run_property(prop: str, check: Callable[[], None], capsys: pytest.CaptureFixture) -> None:
    """Run a property, print its ``fuzz:`` summary line even when it fails, and insist it ran."""
    STATS[prop].clear()
    try:
        check()
    finally:
        with capsys.disabled():
            print("\n" + summary(prop))
    assert STATS[prop]["examples"] > 0


def summary(prop: str) -> str:
    counts = STATS[prop]
    rest = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "examples")
    return (
        f"fuzz: {prop}: {counts['examples']} examples run, shrinking included ({rest}); "
        f"max_examples={EXAMPLES}, seed={FUZZ_SEED}" + (f", only={','.join(ONLY)}" if ONLY else "")
    )


@pytest.mark.slow
def test_fuzz_layer(capsys):
    run_property("layer", fuzz_property(layer_cases(), run_layer_case, EXAMPLES), capsys)


@pytest.mark.slow
def test_fuzz_nonfinite(capsys):
    """NaN/±Inf inputs, half as many examples as the layer property."""
    run_property("nonfinite", fuzz_property(nonfinite_cases(), run_nonfinite_case, max(1, EXAMPLES // 2)), capsys)


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
