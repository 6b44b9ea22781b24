"""``benchmarks/cpu/bench_ggml.py`` (llama.cpp's CPU kernels as an anchor) runs end to end on a tiny shape.

Without ggml-python (made unimportable here) it still writes its table and CSV, ggml cells empty, with a
note on how to install it; with ggml-python installed, a second tiny run also times ggml and the block.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu"
sys.path.insert(0, str(BENCH))  # bench_ggml imports measure, report, ggml_runner as sibling scripts

import bench_ggml  # noqa: E402

# One small layer, two token counts, one interleaved round: a few seconds.
TINY = ["--quick", "--shapes", "256x512", "--tokens", "1,2", "--repeats", "1", "--min-run-time", "0.01"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()  # main() sets the benchmark's thread count
    yield
    torch.set_num_threads(threads)


def _rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(folder / "bench_ggml.csv")))


def test_without_ggml_the_ggml_columns_stay_empty(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ggml", None)  # `import ggml` raises ImportError
    bench_ggml.main([*TINY, "--out", str(tmp_path)])
    printed, logged = capsys.readouterr()
    assert "pip install ggml-python" in logged and "pip install ggml-python" in printed
    text = (tmp_path / "bench_ggml.md").read_text()
    assert text.strip() in printed
    assert "| 256x512 | 1 |" in text and "| 256x512 | 2 |" in text
    rows = _rows(tmp_path)
    ggml_rows = [r for r in rows if r["impl"].startswith("ggml ")]
    assert {r["impl"] for r in ggml_rows} == {f"ggml {t}" for t in bench_ggml.GGML_TYPES}
    assert all(r["median_ms"] == "" and "no ggml-python" in r["status"] for r in ggml_rows)
    ours = [r for r in rows if not r["impl"].startswith("ggml ")]
    assert {r["impl"] for r in ours} == {
        f"{who} {dtype}" for who in ("ours 2x8", "ours 1x16", "dense") for dtype in ("fp32", "bf16")
    }
    assert all(float(r["median_ms"]) > 0 and r["status"] == "ok" for r in ours)
    assert all(float(r["rel_err"]) < (1e-5 if r["impl"].endswith("fp32") else 2e-2) for r in ours)
    assert "| decode N=1: ours 2x8 fp32 / ggml iq2_xxs | <= 1.0x | not measured | n/a |" in text


def test_default_out_only_for_the_full_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bench_ggml.parse_args([]).out == bench_ggml.RESULTS
    assert bench_ggml.parse_args(["--quick"]).out == tmp_path / "aqlm_lora" / "bench" / "ggml"
    assert bench_ggml.parse_args(["--quick"]).block_dims is None
    assert bench_ggml.parse_args([]).block_dims == (4096, 11008)


@pytest.mark.skipif(importlib.util.find_spec("ggml") is None, reason="ggml-python is not installed")
def test_with_ggml_a_tiny_run_times_ggml_and_the_block(tmp_path, capsys):
    types = "f16,iq2_xxs,no_such_type"
    bench_ggml.main([*TINY, "--types", types, "--block", "256x512", "--out", str(tmp_path)])
    text = (tmp_path / "bench_ggml.md").read_text()
    assert "ggml types this ggml does not know: no_such_type." in text
    rows = _rows(tmp_path)
    linear = {(r["impl"], r["tokens"]): r for r in rows if r["kind"] == "linear"}
    for n in ("1", "2"):
        assert float(linear[("ggml f16", n)]["rel_err"]) < 1e-2  # right orientation: x @ W^T
        assert float(linear[("ggml iq2_xxs", n)]["rel_err"]) < 0.6  # 2-bit error, not garbage
        assert float(linear[("ggml iq2_xxs", n)]["median_ms"]) > 0
        assert linear[("ggml no_such_type", n)]["status"].startswith("not in ggml-python")
    block = {r["impl"]: r for r in rows if r["kind"] == "block"}
    assert float(block["ggml iq2_xxs"]["median_ms"]) > 0 and float(block["ours 2x8 + LoRA bf16"]["median_ms"]) > 0
    assert "| decode N=1: ours 2x8 fp32 / ggml iq2_xxs (worst of 1) | <= 1.0x |" in text
    assert (tmp_path / "bench_ggml.png").is_file()
