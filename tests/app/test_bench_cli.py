"""``aqlm-lora bench`` / ``benchmarks/cpu/bench_linear.py``: where results go, no profiler noise, one scheme vocabulary.

Only the full sweep may write the committed ``benchmarks/results``; quick and filtered runs go to a
per-user cache folder unless ``--out`` says otherwise. Schemes and weights are ``aqlm_lora.scheme``'s."""

from __future__ import annotations

import hashlib
import math
import sys
import zlib
from pathlib import Path

import pytest
import torch

from aqlm_lora.app import cli
from aqlm_lora.scheme import Scheme, random_weight

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu"
RESULTS = BENCH.parent / "results"
sys.path.insert(0, str(BENCH))  # bench_linear imports measure as a sibling script

import bench_linear  # noqa: E402
import measure  # noqa: E402

# The smallest run the benchmark accepts: one 64x64 layer, one token count, our kernels only.
TINY = ["--shapes", "64x64", "--schemes", "2x8", "--dtypes", "fp32", "--tokens", "1"]
TINY += ["--train-tokens", "4", "--min-run-time", "0.01", "--no-stock"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "argv",
    [["--quick"], ["--shapes", "64x64"], ["--tokens", "1"], ["--schemes", "2x8"], ["--dtypes", "fp32"]]
    + [["--train-tokens", "4"], ["--no-stock"]],
)
def test_partial_runs_default_to_the_cache(argv, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bench_linear.parse_args(argv).out == tmp_path / "aqlm_lora" / "bench"


def test_cache_folder_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bench_linear.parse_args(["--quick"]).out == tmp_path / ".cache" / "aqlm_lora" / "bench"


def test_full_sweep_and_explicit_out(tmp_path):
    assert bench_linear.parse_args([]).out == RESULTS
    assert bench_linear.parse_args(["--threads", "1"]).out == RESULTS
    assert bench_linear.parse_args(["--quick", "--out", str(tmp_path)]).out == tmp_path
    assert bench_linear.parse_args(["--quick", "--out", str(RESULTS)]).out == RESULTS


def test_schemes_flag_takes_the_package_grammar(capsys):
    args = bench_linear.parse_args(["--schemes", "1x16g16,2x8", "--dtypes", "fp32"])
    assert args.scheme_list == [Scheme(1, 16, in_group_size=16), Scheme(2, 8)]
    assert [str(s) for s in bench_linear.parse_args([]).scheme_list] == ["1x16", "2x8"]
    with pytest.raises(SystemExit):
        bench_linear.parse_args(["--schemes", "2y8"])
    assert "invalid scheme '2y8'" in capsys.readouterr().err


def test_weights_are_the_seeded_random_weight_then_lora():
    """The subprocesses rebuild the main process's weights: one generator seeded from (shape, scheme)
    draws ``random_weight`` first, then the LoRA factors."""
    scheme = Scheme(2, 8)
    w = measure.make_weights(64, 32, scheme)
    g = torch.Generator().manual_seed(zlib.crc32(b"64x32-2x8"))
    expected = random_weight(scheme, 64, 32, generator=g)
    for got, want in zip(w.base.args(), expected.args()):
        assert torch.equal(got, want)
    assert torch.equal(w.lora_A, torch.randn(measure.LORA_RANK, 32, generator=g) / math.sqrt(32))
    assert w.base.scheme == scheme and (w.out_features, w.in_features) == (64, 32)
    assert w.fingerprint() == measure.make_weights(64, 32, scheme).fingerprint()
    assert w.fingerprint() != measure.make_weights(64, 32, Scheme(1, 16)).fingerprint()


def test_quick_bench_leaves_committed_results_and_is_quiet(monkeypatch, capfd, tmp_path):
    """The CLI's quick path end to end on a tiny layer (~15 s): files land in the cache folder,
    the committed results are untouched, and Kineto's profiler_start/stop lines are gone."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    committed = _digest(RESULTS)
    assert cli.main(["bench", *TINY]) == 0
    out, err = capfd.readouterr()
    written = tmp_path / "aqlm_lora" / "bench"
    assert {p.name for p in written.iterdir()} >= {"bench_linear.md", "bench_linear.csv", "bench_linear.png"}
    assert _digest(RESULTS) == committed
    assert "Mode: **quick**" in out
    assert "profiler_start" not in err and "profiler_stop" not in err and "USDT" not in err, err
    assert f"wrote {written / 'bench_linear.md'}" in err
