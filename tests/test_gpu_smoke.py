"""scripts/gpu_smoke.py and scripts/gpu_check.sh, exercised without a GPU: the smoke test's
comparisons on the CPU kernels (its CUDA-only sections with the CUDA calls mocked), that it
catches wrong results, which GEMV branches its schemes reach, and a dry run of the whole check
script on the CPU (no build, the existing in-place library)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _load_smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = _load_smoke()


def _session(lines: list[str]):
    return smoke.Smoke(torch.device("cpu"), lines.append)


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
    monkeypatch.setattr(smoke, "shared_memory_optin", lambda dev: optin)
    kinds = []
    for C, nbits, og, ig, _, _ in smoke.decode_schemes(_session([])):
        bytes_ = C * 2**nbits * og * 8 * 4
        kinds.append((nbits, bytes_, smoke.expected_gemv_kernel(C, nbits, og, ig, optin)))
    smem = [b for n, b, k in kinds if k == "gemv_ig8_smem_kernel"]
    assert any(b > smoke.DEFAULT_SMEM for b in smem), "no scheme needs the opt-in attribute"
    assert max(smem) > optin - smoke.BOOK_ROW_BYTES_8BIT, "the largest fitting codebooks are missing"
    assert any(n <= 8 and b > optin and k == "gemv_ig8_global_kernel" for n, b, k in kinds), "no 8-bit fallback"
    assert any(n == 16 and k == "gemv_ig8_global_kernel" for n, b, k in kinds)
    assert any(k == "gemv_generic_kernel" for _, _, k in kinds)


def test_gemv_branch_rule_matches_gemv_cu():
    """expected_gemv_kernel follows decode_gemv's choice in csrc/cuda/decode.cu."""
    src = (ROOT / "csrc" / "cuda" / "decode.cu").read_text()
    assert "d.num_codebooks * d.codebook_size * d.out_group * 8 * static_cast<int64_t>(sizeof(float))" in src
    assert "smem_bytes <= static_cast<int64_t>(prop->sharedMemPerBlockOptin)" in src
    assert "if (ig8 && d.nbits <= 8 && smem_fits)" in src
    assert "constexpr int64_t kDefaultSmem = 48 * 1024" in src
    assert smoke.expected_gemv_kernel(8, 8, 1, 8, 232448) == "gemv_ig8_smem_kernel"
    assert smoke.expected_gemv_kernel(2, 8, 16, 8, 232448) == "gemv_ig8_global_kernel"
    assert smoke.expected_gemv_kernel(1, 16, 1, 8, 232448) == "gemv_ig8_global_kernel"
    assert smoke.expected_gemv_kernel(1, 16, 1, 16, 232448) == "gemv_generic_kernel"


def _corrupting_ops(monkeypatch, name, corrupt):
    real = smoke.ops
    fake = types.SimpleNamespace(**{k: getattr(real, k) for k in smoke.OPS})

    def wrapped(*args, **kwargs):
        return corrupt(getattr(real, name)(*args, **kwargs))

    setattr(fake, name, wrapped)
    monkeypatch.setattr(smoke, "ops", fake)


def test_smoke_catches_a_wrong_mask_element_past_the_limit(monkeypatch):
    limit = 2**16

    def flip(mask):
        flat = mask.reshape(-1)
        if flat.numel() > limit:
            flat[limit + 5] = ~flat[limit + 5]
        return mask

    _corrupting_ops(monkeypatch, "dropout_mask", flip)
    lines: list[str] = []
    s = _session(lines)
    smoke.check_big_mask(s, limit)
    assert f"dropout_mask elements [{limit - 4096}, {limit + 4096}) of" in s.failures[0], s.failures
    for name in s.failures:  # only windows that hold the flipped element fail
        a, b = (int(v) for v in name.split("[")[1].split(")")[0].split(", "))
        assert a <= limit + 5 < b, name


def test_smoke_catches_a_small_gemm_error(monkeypatch):
    _corrupting_ops(monkeypatch, "aqlm_gemm", lambda y: y * 1.01)
    s = _session([])
    w = s.weight(2, 8, 1, 8, 6, 10, torch.float16)
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
    smoke.check_streams(s)
    assert not s.failures, s.failures
    assert s.checks == 4 * 9 * 2, s.checks
    smoke.check_branches(s)  # no CUDA kernels to see here: warnings only, never failures
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
        "GPU_CHECK_SMOKE_ARGS": "--quick --tokens 1 --no-big",
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
    assert "smoke " in summary and " checks, 0 failures" in summary, summary
    assert "pytest 12 passed, 0 failed, 0 errors, 0 skipped" in summary, summary
    for name in ("gpu_check.log", "smoke.log", "pytest.log", "pytest_junit.xml"):
        assert (out / name).is_file(), name
    assert "--durations" not in summary and "slowest" in (out / "pytest.log").read_text()
    assert (out / "gpu_check.log").read_text().strip().splitlines()[-1] == summary


def test_gpu_check_dry_run_reports_failures(tmp_path):
    proc, out = _dry_run(tmp_path, GPU_CHECK_SMOKE_ARGS="--no-such-option", GPU_CHECK_PYTEST_K="no_such_test")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text().strip()
    assert summary.startswith("gpu_check: FAILED (smoke pytest) in "), summary
    assert "pytest no test collected" in summary, summary
