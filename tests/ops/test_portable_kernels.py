"""The portable CPU kernels (used where the CPU lacks AVX2/FMA/F16C/BMI2) pass the op tests too.

AQLM_LORA_CPU_KERNELS=generic is read once per process, so the op tests run again in a child
process with it set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "path,selection",
    [
        ("tests/ops/test_ops.py", "test_aqlm_gemm and (N1 or N7)"),
        ("tests/ops/test_ops.py", "test_lora_forward and (N1 or N7)"),
        ("tests/ops/test_ops.py", "test_lora_backward and N7"),
        ("tests/ops/test_scheme_grid.py", "fp32"),
        ("tests/ops/test_decode_kernels.py", "cb_fp32 or thread"),
    ],
    ids=["gemm", "lora_forward", "lora_backward", "scheme_grid", "decode_kernels"],
)
@pytest.mark.slow
def test_generic_kernels_pass_op_tests(path, selection):
    env = dict(os.environ, AQLM_LORA_CPU_KERNELS="generic")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-k", selection],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
