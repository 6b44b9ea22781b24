"""benchmarks/bench_dora.py, bench_merge.py and bench_multi_adapter.py run end to end on tiny inputs and write
their table, CSV and plot (they are scripts, not tests: this only keeps them from rotting)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from aqlm_lora.app.demo import run_demo
from tests.support.cli import TINY_DEMO

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str, *argv, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *map(str, argv)], capture_output=True, text=True, timeout=900, cwd=cwd
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_dora_tiny(tmp_path):
    printed = _script(
        "bench_dora.py",
        "--shape",
        "64x128",
        "--n",
        "4",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--out",
        tmp_path,
        cwd=tmp_path,
    )
    assert "| ours DoRA |" in printed and "ours DoRA / ours LoRA: training step" in printed
    rows = list(csv.DictReader(open(tmp_path / "bench_dora.csv")))
    assert {r["layer"] for r in rows} == {"ours LoRA", "ours DoRA", "PEFT DoRA, dense W"}
    assert all(float(r["median_s"]) > 0 for r in rows)
    assert (tmp_path / "bench_dora.md").is_file() and (tmp_path / "bench_dora.png").is_file()


@pytest.mark.slow
def test_bench_merge_on_a_tiny_demo(tmp_path):
    run_demo(str(tmp_path / "demo"), progress=False, config=TINY_DEMO)
    out = tmp_path / "out"
    argv = ["--demo-dir", tmp_path / "demo", "--tune-steps", "2", "--calibration-windows", "4", "--out", out]
    printed = _script("bench_merge.py", *argv, cwd=tmp_path)
    rows = list(csv.DictReader(open(out / "bench_merge.csv")))
    assert [r["form"].split(" (")[0] for r in rows] == [
        "AQLM",
        "AQLM + LoRA",
        "merged dense",
        "merged re-quantized",
        "merged re-quantized + codebook tuning",
    ]
    ppl = [float(r["perplexity"]) for r in rows]
    assert ppl[2] == pytest.approx(ppl[1], rel=1e-4), "a dense merge is exact"
    assert float(rows[1]["gain_kept"]) == pytest.approx(1.0)
    assert "| merged re-quantized (2 rounds) |" in printed and (out / "bench_merge.png").is_file()


@pytest.mark.slow
def test_bench_multi_adapter_quick(tmp_path):
    printed = _script("bench_multi_adapter.py", "--quick", "--out", tmp_path, cwd=tmp_path)
    assert "| 2x8 | decode |" in printed and "| 1x16 | prefill |" in printed
    rows = list(csv.DictReader(open(tmp_path / "bench_multi_adapter.csv")))
    assert rows and (tmp_path / "bench_multi_adapter.png").is_file()
