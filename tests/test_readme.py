"""The README's Python examples run as written and print what the README says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# A block states its output in comment lines "# prints: <line>", in order.
EXPECTED = [re.findall(r"^# prints: (.*)$", block, flags=re.M) for block in BLOCKS]


def test_readme_has_examples():
    assert len(BLOCKS) >= 2
    assert all(EXPECTED), "every README example must say what it prints ('# prints: ...')"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_prints_what_it_says(index, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()
    assert printed == EXPECTED[index], f"README says {EXPECTED[index]}, the code printed {printed}"
    assert not re.search(r"\b(nan|inf)\b", proc.stdout, flags=re.I), proc.stdout
