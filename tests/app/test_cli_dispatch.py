"""Commands reached through ``main``: ``bench`` finds and runs the benchmark script, ``python -m aqlm_lora``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aqlm_lora.app import cli, cmd_bench
from tests.support.cli import assert_user_error, run


def test_bench_missing_script(monkeypatch, capsys):
    monkeypatch.setattr(cmd_bench, "bench_script", lambda: None)
    code, _, err = run(["bench"], capsys)
    assert_user_error(code, err, "bench_linear.py")


def test_bench_runs_the_script(monkeypatch, capfd, tmp_path):
    script = tmp_path / "benchmarks" / "bench_linear.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(cmd_bench, "bench_script", lambda: script)
    code = cli.main(["bench", "--out", str(tmp_path)])
    assert code == 3  # the script's exit code comes back
    assert "ARGS ['--quick', '--out', '" in capfd.readouterr().out


def test_entry_point_subprocess(tmp_path):
    """``python -m aqlm_lora``: one stderr line and exit code 1 for a user error."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, "-m", "aqlm_lora", "eval", str(tmp_path / "missing"), "--data", str(tmp_path / "d.txt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"aqlm-lora: error: model directory {tmp_path / 'missing'} does not exist"
    ]
