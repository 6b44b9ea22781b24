"""``aqlm-lora bench``: ``benchmarks/cpu/bench_linear.py`` of the source checkout (``--quick`` unless ``--full``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .errors import UserError


def bench_script() -> Optional[Path]:
    """``benchmarks/cpu/bench_linear.py`` of the source checkout (next to the package, or in the cwd)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / "benchmarks" / "cpu" / "bench_linear.py"
        if candidate.is_file():
            return candidate
    return None


def run(args) -> int:
    script = bench_script()
    if script is None:
        raise UserError(
            "benchmarks/cpu/bench_linear.py not found: it ships with the source checkout, not the installed "
            "package; run `aqlm-lora bench` from the repository root"
        )
    command = [sys.executable, str(script)] + ([] if args.full else ["--quick"]) + list(args.extra)
    print("running " + " ".join(command), file=sys.stderr)
    # Kineto (the profiler behind the peak-memory column) prints profiler_start/stop lines per
    # measurement at every log level below 6; the user can still ask for them.
    env = dict(os.environ)
    env.setdefault("KINETO_LOG_LEVEL", "6")
    return subprocess.call(command, cwd=str(script.parent.parent), env=env)
