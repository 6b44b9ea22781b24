"""The op tests pass with every CPU output and scratch buffer starting as NaN
(AQLM_LORA_DEBUG_FILL=nan): a kernel that leaves part of a buffer unwritten cannot hide behind
zeros or lucky memory. The mode is read once per process, so the tests run in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pytest_child(path: str, selection: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-k", selection],
        cwd=ROOT,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_debug_fill_mode_keeps_ops_exact():
    """With the mode on, a fully written output holds no NaN (the fill never leaks into results)."""
    code = (
        "import torch, aqlm_lora\n"
        "codes = torch.zeros(2, 1, 1, dtype=torch.int8)\n"
        "books = torch.ones(1, 4, 1, 8)\n"
        "w = torch.ops.aqlm_lora.dequantize(codes, books, torch.ones(2, 1, 1, 1))\n"
        "assert torch.equal(w, torch.ones(2, 8)), w\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, AQLM_LORA_DEBUG_FILL="nan"),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "path,selection",
    [
        ("tests/ops/test_scheme_grid.py", "fp32"),
        ("tests/ops/test_ops.py", "N1 or N7 or N300"),
        ("tests/ops/test_nonfinite.py", "fp32"),
    ],
    ids=["scheme_grid", "ops", "nonfinite"],
)
@pytest.mark.slow
def test_op_tests_pass_with_nan_filled_buffers(path, selection):
    proc = _pytest_child(path, selection, AQLM_LORA_DEBUG_FILL="nan")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
