"""scripts/gpu_smoke.py, scripts/gpu/ and scripts/gpu_check.sh, exercised without a GPU: the smoke
test's comparisons on the CPU kernels (its CUDA-only sections with the CUDA calls mocked), that it
catches wrong results, which GEMV branches its schemes reach, that the op list comes from the
library's registration (a registered op without a kernel fails), and a dry run of the whole check
script on the CPU (no build, the existing in-place library)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from aqlm_lora.scheme import Scheme

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _load_smoke():
    """gpu_smoke.py by path (scripts/ is no package); running it puts scripts/gpu/ on sys.path."""
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = _load_smoke()
cases = importlib.import_module("smoke_cases")
checks = importlib.import_module("smoke_checks")
big_index = importlib.import_module("smoke_big_index")
registry = importlib.import_module("op_registry")
check_registration = importlib.import_module("check_registration")


def _session(lines: list[str], ops=None):
    return smoke.Smoke(torch.device("cpu"), lines.append, **({} if ops is None else {"ops": ops}))


def test_smoke_passes_on_cpu():
    lines: list[str] = []
    s = smoke.run(smoke.parse_args(["--device", "cpu", "--quick", "--tokens", "1,9"]), lines.append)
    text = "\n".join(lines)
    assert not s.failures, "\n".join(line for line in lines if line.startswith("FAIL"))
    assert not s.warnings, s.warnings
    assert s.checks > 700, s.checks
    big = ("dropout_mask over > 65536", "tiled LoRA dropout over > 65536", "decode LoRA shrink with indices > 65536")
    for title in big:
        assert f"== {title}" in text, title
    assert "8x8 og1 ig8" in text and "2x8 og16 ig8" in text and "4x8 og2 ig8" in text
    assert lines[-1].startswith(f"gpu_smoke: {s.checks} checks, 0 failures, 0 warnings"), lines[-1]


def test_smoke_main_exit_status(monkeypatch):
    monkeypatch.setattr(smoke, "run", lambda args: types.SimpleNamespace(failures=["x"]))
    assert smoke.main(["--device", "cpu"]) == 1
    monkeypatch.setattr(smoke, "run", lambda args: types.SimpleNamespace(failures=[]))
    assert smoke.main(["--device", "cpu"]) == 0


@pytest.mark.parametrize("optin", [232448, 166912, 101376], ids=["H100-H200", "A100", "sm86"])
def test_threshold_schemes_reach_every_gemv_branch(monkeypatch, optin):
    """For the device's opt-in shared memory the schemes include: 8-bit codebooks above the 48 KiB
    default (opt-in attribute), the largest that fit, 8-bit ones that must fall back to the global
    kernel, 16-bit ones (global), and the generic kernel."""
    kinds = []
    for scheme, _, _ in cases.decode_schemes(optin):
        bytes_ = scheme.num_codebooks * 2**scheme.nbits * scheme.out_group_size * 8 * 4
        assert cases.staged_codebook_bytes(scheme) == bytes_
        kinds.append((scheme.nbits, bytes_, cases.expected_gemv_kernel(scheme, optin)))
    smem = [b for n, b, k in kinds if k == "gemv_ig8_smem_kernel"]
    assert any(b > cases.DEFAULT_SMEM for b in smem), "no scheme needs the opt-in attribute"
    assert max(smem) > optin - cases.BOOK_ROW_BYTES_8BIT, "the largest fitting codebooks are missing"
    assert any(n <= 8 and b > optin and k == "gemv_ig8_global_kernel" for n, b, k in kinds), "no 8-bit fallback"
    assert any(n == 16 and k == "gemv_ig8_global_kernel" for n, b, k in kinds)
    assert any(k == "gemv_generic_kernel" for _, _, k in kinds)


def test_gemv_branch_rule_matches_gemv_cu():
    """expected_gemv_kernel follows decode_gemv's choice in csrc/cuda/decode.cu."""
    src = (ROOT / "csrc" / "cuda" / "decode.cu").read_text()
    assert "d.num_codebooks * d.codebook_size * d.out_group * 8 * static_cast<int64_t>(sizeof(float))" in src
    # Patterns rather than whole lines: the rule, not the code around it, is what is mirrored.
    assert re.search(r"<= static_cast<int64_t>\(prop->sharedMemPerBlockOptin\)", src)
    assert re.search(r"d\.nbits <= 8 && smem_fits", src)
    assert re.search(r"d\.in_group [!=]= 8", src)
    assert "constexpr int64_t kDefaultSmem = 48 * 1024" in src
    kernels = (ROOT / "csrc" / "cuda" / "kernels.cuh").read_text()
    assert f"constexpr int64_t kDecodeMaxRows = {cases.DECODE_MAX_ROWS};" in kernels  # smoke and bench mirror it
    bench = (ROOT / "benchmarks" / "bench_cuda.py").read_text()
    assert re.search(rf"^DECODE_MAX_ROWS = {cases.DECODE_MAX_ROWS}\b", bench, re.M)
    assert any(n <= cases.DECODE_MAX_ROWS for _, n in cases.STREAM_CASES)
    assert any(n > cases.DECODE_MAX_ROWS for _, n in cases.STREAM_CASES)
    assert cases.expected_gemv_kernel(Scheme(8, 8), 232448) == "gemv_ig8_smem_kernel"
    assert cases.expected_gemv_kernel(Scheme(2, 8, out_group_size=16), 232448) == "gemv_ig8_global_kernel"
    assert cases.expected_gemv_kernel(Scheme(1, 16), 232448) == "gemv_ig8_global_kernel"
    assert cases.expected_gemv_kernel(Scheme(1, 16, in_group_size=16), 232448) == "gemv_generic_kernel"


def test_op_list_is_the_schema_registration():
    """The scripts' op list is what csrc/aqlm_lora.cpp declares, read back from the dispatcher."""
    src = (ROOT / "csrc" / "aqlm_lora.cpp").read_text()
    declared = re.findall(r'm\.def\(\s*"(\w+)\(', src)
    assert len(declared) >= 6, declared
    assert registry.registered_ops() == sorted(declared)
    assert registry.missing_kernels("CPU") == []


def test_registry_refuses_an_unloaded_library():
    with pytest.raises(RuntimeError, match="not loaded"):
        registry.missing_kernels("CPU", namespace="aqlm_lora_not_loaded")


@pytest.fixture
def op_without_cpu_kernel():
    """An extra aqlm_lora op with a Meta kernel only, as a new op whose CPU kernel was forgotten."""
    name = "gpu_smoke_test_extra"
    lib = torch.library.Library("aqlm_lora", "FRAGMENT")
    lib.define(f"{name}(Tensor x) -> Tensor")
    lib.impl(name, lambda x: torch.empty_like(x), "Meta")
    try:
        yield name
    finally:
        lib._destroy()
    assert name not in registry.registered_ops()


def test_a_registered_op_without_a_kernel_fails_every_check(op_without_cpu_kernel, capsys):
    name = op_without_cpu_kernel
    assert name in registry.registered_ops()
    assert registry.missing_kernels("CPU") == [name]
    assert check_registration.main(["--device", "cpu"]) == 1
    assert f"no CPU kernel for {name}" in capsys.readouterr().err
    s = _session([])
    assert not checks.check_registration(s) and s.failures == ["CPU kernels registered"]
    s = _session([])
    checks.check_coverage(s)  # no comparison for the new op either
    assert s.failures == ["every registered op is compared"]


def test_check_registration_script_passes_on_the_built_library(capsys):
    assert check_registration.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert all(f"aqlm_lora::{op}" in out for op in registry.registered_ops()), out


def test_smoke_weights_with_wider_code_storage_use_its_whole_range():
    s = _session([])
    codes, books, scales = s.weight("2x8", 6, 80, torch.float32, torch.int16)
    assert codes.dtype == torch.int16 and codes.shape == (6, 10, 2)
    assert int(codes.min()) < -128 or int(codes.max()) > 127  # read mod 2**8 by the kernels
    assert books.shape == (2, 256, 1, 8) and scales.shape == (6, 1, 1, 1)


def test_device_probe_and_build_paths(tmp_path, capsys):
    probe = importlib.import_module("probe_device")
    build_paths = importlib.import_module("build_paths")
    assert probe.main(["--device", "cpu"]) == 0
    assert probe.main(["--device", "cuda"]) == (0 if torch.cuda.is_available() else 1)
    assert probe.main(["--device", "cpu", "--cuda-build"]) == (0 if torch.version.cuda else 1)
    capsys.readouterr()
    assert build_paths.main(["ninja-dir"]) == 0
    found = capsys.readouterr().out.strip()
    assert not found or (Path(found) / "ninja").is_file(), found
    assert build_paths.main(["cuda-includes"]) == 0
    for folder in filter(None, capsys.readouterr().out.strip().split(":")):
        assert any((Path(folder) / h).is_file() for h in build_paths.CUDA_HEADERS), folder
    assert build_paths.main(["nonsense"]) == 2


def test_wheel_unpacking_and_junit_counts(tmp_path):
    import zipfile

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/__init__.py", "VALUE = 1\n")
    dest = tmp_path / "deps"
    assert importlib.import_module("unpack_wheels").main([str(dest), str(wheel)]) == 0
    assert (dest / "demo_pkg" / "__init__.py").read_text() == "VALUE = 1\n"
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/>'
        '<testsuite tests="3" failures="0" errors="0" skipped="0"/></testsuites>'
    )
    assert importlib.import_module("junit_counts").counts(str(xml)) == "6 passed, 1 failed, 1 errors, 2 skipped"


def _corrupting_ops(name, corrupt):
    """aqlm_lora.ops with op `name`'s output passed through `corrupt`."""
    from aqlm_lora import ops as real

    fake = types.SimpleNamespace(**{k: getattr(real, k) for k in registry.registered_ops()})

    def wrapped(*args, **kwargs):
        return corrupt(getattr(real, name)(*args, **kwargs))

    setattr(fake, name, wrapped)
    return fake


def test_smoke_catches_a_wrong_mask_element_past_the_limit():
    limit = 2**16

    def flip(mask):
        flat = mask.reshape(-1)
        if flat.numel() > limit:
            flat[limit + 5] = ~flat[limit + 5]
        return mask

    lines: list[str] = []
    s = _session(lines, _corrupting_ops("dropout_mask", flip))
    big_index.check_big_mask(s, limit)
    assert f"dropout_mask elements [{limit - 4096}, {limit + 4096}) of" in s.failures[0], s.failures
    for name in s.failures:  # only windows that hold the flipped element fail
        a, b = (int(v) for v in name.split("[")[1].split(")")[0].split(", "))
        assert a <= limit + 5 < b, name


def test_smoke_catches_a_small_gemm_error():
    s = _session([], _corrupting_ops("aqlm_gemm", lambda y: y * 1.01))
    w = s.weight("2x8", 6, 80, torch.float16)
    s.run_case("corrupted", w, s.randn(3, 80, dtype=torch.float16), torch.float16)
    assert s.failures == ["aqlm_gemm corrupted"], s.failures


def test_smoke_section_turns_exceptions_into_failures():
    lines: list[str] = []
    s = _session(lines)
    with s.section("boom"):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    assert s.failures == ["boom"] and any("illegal memory access" in line for line in lines)


class _FakeStream:
    def synchronize(self):
        pass


def test_stream_and_branch_sections_run_with_cuda_mocked(monkeypatch):
    """The CUDA-only sections, on CPU tensors with the stream/sync calls mocked: every comparison
    they make runs (and passes), so they cannot fail on the GPU box for a Python mistake."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    lines: list[str] = []
    s = _session(lines)
    checks.check_streams(s)
    assert not s.failures, s.failures
    assert s.checks == 5 * 10 * 2, s.checks  # 5 stream cases x every_op's 10 outputs x 2 comparisons
    checks.check_branches(s)  # no CUDA kernels to see here: warnings only, never failures
    assert not s.failures, s.failures


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _dry_run(tmp_path, **env):
    out = tmp_path / "out"
    full_env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_SKIP_BUILD": "1",
        "GPU_CHECK_PYTEST_FILES": "tests/ops/test_dropout.py",
        **env,
    }
    proc = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_gpu_check_dry_run_on_cpu(tmp_path):
    proc, out = _dry_run(tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    summary = (out / "summary.txt").read_text().strip()
    assert summary.startswith("gpu_check: PASSED in "), summary
    assert "smoke " in summary and " checks, 0 failures, 0 warnings" in summary, summary  # the CPU default args
    assert "pytest 12 passed, 0 failed, 0 errors, 0 skipped" in summary, summary
    for name in ("gpu_check.log", "smoke.log", "pytest.log", "pytest_junit.xml"):
        assert (out / name).is_file(), name
    assert "--durations" not in summary and "slowest" in (out / "pytest.log").read_text()
    log = (out / "gpu_check.log").read_text()
    assert log.strip().splitlines()[-1] == summary
    assert "ok: every one of the" in log and "aqlm_lora::lora_backward" in log  # the registration step


def test_gpu_check_dry_run_reports_failures(tmp_path):
    proc, out = _dry_run(tmp_path, GPU_CHECK_SMOKE_ARGS="--no-such-option", GPU_CHECK_PYTEST_K="no_such_test")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text().strip()
    assert summary.startswith("gpu_check: FAILED (smoke pytest) in "), summary
    assert "pytest no test collected" in summary, summary


def test_gpu_check_dry_run_stopped_by_the_time_cap_is_incomplete_not_failed(tmp_path):
    """pytest stopped by its time cap with no failure so far is INCOMPLETE (exit 3), not a FAILED
    kernel verdict; with a failure before the cap it stays FAILED."""
    tests = tmp_path / "test_slow.py"
    tests.write_text(
        "import time\n\ndef test_cpu_quick():\n    assert True\n\ndef test_cpu_slow():\n    time.sleep(120)\n"
    )
    proc, out = _dry_run(tmp_path, GPU_CHECK_PYTEST_FILES=str(tests), GPU_CHECK_PYTEST_CAP_S="15")
    summary = (out / "summary.txt").read_text().strip()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert summary.startswith("gpu_check: INCOMPLETE (pytest) in "), summary
    assert "pytest stopped at the time cap after: 1 passed, 0 failed" in summary, summary

    broken = tmp_path / "test_broken.py"  # a failure, then the slow test
    broken.write_text("def test_cpu_broken():\n    assert False\n")
    (tmp_path / "out").rename(tmp_path / "out1")
    proc, out = _dry_run(tmp_path, GPU_CHECK_PYTEST_FILES=f"{broken} {tests}", GPU_CHECK_PYTEST_CAP_S="15")
    summary = (out / "summary.txt").read_text().strip()
    assert proc.returncode == 1 and summary.startswith("gpu_check: FAILED (pytest) in "), summary


class _FakeEvent:
    """torch.cuda.Event on the CPU: wall-clock marks, so bench_cuda's timing code runs without a GPU."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.t = 0.0

    def record(self) -> None:
        import time

        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.t - self.t) * 1e3


def bench_with_fake_events(monkeypatch):
    """benchmarks/bench_cuda.py loaded as a module, with torch.cuda.Event faked for the CPU."""
    spec = importlib.util.spec_from_file_location("bench_cuda", ROOT / "benchmarks" / "bench_cuda.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_cuda", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    return bench


def test_bench_cuda_rows_run_with_cuda_events_faked(monkeypatch, tmp_path):
    """benchmarks/bench_cuda.py runs once on the GPU with no second chance: its row code (every
    column, the float64 error reference, the host-bound mark) runs here on CPU tensors."""
    from aqlm_lora import ops
    from aqlm_lora.scheme import parse_scheme

    bench = bench_with_fake_events(monkeypatch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    weight, lora_A, lora_B = bench.make_weight(64, 128, parse_scheme("2x8"), torch.device("cpu"))
    dense = ops.dequantize(*weight.args())
    notes: list[str] = []
    timer = bench.time_eager_us  # CUDA graphs need a GPU
    rows = [bench.measure_row(ops, weight, (lora_A, lora_B), dense, None, n, 0.002, "t", notes, timer) for n in (1, 12)]
    for row in rows:
        cells = dict(zip(bench.HEADER, row.cells()))
        assert len(row.cells()) == len(bench.HEADER) and cells["aqlm us"] == "n/a", cells
        err_ours, err_dense = (float(v) for v in cells["err ours / dense"].split(" / "))
        assert err_ours < 1e-2 and err_dense < 1e-2, cells
        assert re.fullmatch(r"[\d,.]+\*?", cells["ours us"]) and cells["ours/dense"].endswith("x"), cells
        assert re.fullmatch(r"[\d,.]+\*?", cells["dq+mm us"]) and cells["ours/dq+mm"].endswith("x"), cells
    checks = bench.verdicts(rows, []) + bench.thresholds(rows)
    assert checks[0].startswith("n/a decode N=1, ours <= 0.8x aqlm"), checks  # no aqlm column
    assert all(re.match(r"(PASS|FAIL|n/a) ", c) for c in checks[:-1]), checks
    assert checks[-1].startswith("decode/prefill threshold 64x128 2x8 g8: decode kernels faster at N in "), checks
    text = bench.render(rows, ["m"], notes, verdicts=checks)
    assert "| 64x128 | 2x8 g8 | 12 |" in text and "## Targets" in text
    bench.write_csv(tmp_path / "b.csv", rows, [])
    assert (tmp_path / "b.csv").read_text().count("64x128") == 2


def test_bench_cuda_training_table_runs_with_cuda_memory_faked(monkeypatch, tmp_path):
    """The bf16 training table (our layer vs PEFT's dense LoRA layer, time and peak memory) and its
    targets run here on CPU tensors, CUDA's events and memory counters faked."""
    from aqlm_lora import ops
    from aqlm_lora.scheme import parse_scheme

    bench = bench_with_fake_events(monkeypatch)
    peaks = iter([3 << 20, 8 << 20])  # ours, then dense
    for name, value in [
        ("synchronize", None),
        ("empty_cache", None),
        ("reset_peak_memory_stats", None),
        ("memory_allocated", 1 << 20),
    ]:
        monkeypatch.setattr(torch.cuda, name, lambda *args, _v=value, **kwargs: _v)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: next(peaks) + (1 << 20))
    notes: list[str] = []
    row = bench.measure_training(ops, 64, 128, parse_scheme("2x8"), 16, 0.002, notes, torch.device("cpu"))
    assert row.impl == "AqlmLoraLinear" and not notes, notes
    assert (row.ours_peak, row.dense_peak) == (3 << 20, 8 << 20)
    cells = dict(zip(bench.TRAIN_HEADER, bench.train_cells(row)))
    assert cells["peak ours/dense"] == "0.38x" and cells["time ours/dense"].endswith("x"), cells
    lines = bench.verdicts([], [row])
    assert (
        lines[-1]
        == "PASS training step N=16 bf16, peak memory <= 0.5x dense PEFT LoRA: 1/1 pass; worst 64x128 2x8 g8: 0.38x"
    )
    assert "## Training step, bf16, N = 16" in bench.render([], ["m"], notes, [row], lines)
