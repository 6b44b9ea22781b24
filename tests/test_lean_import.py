"""``import aqlm_lora``, every op and the functional entry points work where aqlm and peft are not
installed (a GPU box with only torch, say); the PEFT layer's names load lazily and say which package
is missing; test modules that need those packages are skipped there instead of failing collection.

Each check runs in a fresh interpreter in which a meta path finder makes the named packages
unimportable (ModuleNotFoundError, as when they are not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCK = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    """
)

LEAN = textwrap.dedent(
    """
    import math

    import torch

    import aqlm_lora
    from aqlm_lora import ops
    from aqlm_lora import reference as ref

    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not loaded, f"import aqlm_lora imported {loaded}"

    torch.manual_seed(0)
    codes = torch.randint(-128, 128, (12, 5, 2), dtype=torch.int8)
    codebooks = torch.randn(2, 256, 1, 8) / 4
    scales = torch.rand(12, 1, 1, 1) + 0.5
    w = (codes, codebooks, scales)
    bias = torch.randn(12)
    lora_A, lora_B, lora_bias = torch.randn(3, 40) / 6, torch.randn(12, 3), torch.randn(12)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    for n in (1, 4, 20):  # decode and many-row paths
        x = torch.randn(n, 40)
        g = torch.randn(n, 12)
        close(ops.dequantize(*w), ref.dequantize(*w))
        close(ops.aqlm_gemm(x, *w, bias), ref.aqlm_gemm(x, *w, bias))
        close(ops.aqlm_gemm_t(g, *w), ref.aqlm_gemm_t(g, *w))
        assert torch.equal(ops.dropout_mask(x, 0.3, 7, 2), ref.dropout_mask(x, 0.3, 7, 2))
        args = (*w, bias, lora_A, lora_B, lora_bias, 0.5, 0.3, 7, 2)
        y, xa = ops.lora_forward(x, *args)
        y_ref, xa_ref = ref.lora_forward(x, *args)
        close(y, y_ref)
        close(xa, xa_ref)
        bargs = (*w, lora_A, lora_B, 0.5, 0.3, 7, 2, True)
        for a, b in zip(ops.lora_backward(g, x, xa, *bargs), ref.lora_backward(g, x, xa, *bargs)):
            close(a, b)
        # the same ops straight from torch.ops
        close(torch.ops.aqlm_lora.aqlm_gemm(x, *w, bias), ref.aqlm_gemm(x, *w, bias))
        assert torch.equal(torch.ops.aqlm_lora.dropout_mask(x, 0.3, 7, 2), ref.dropout_mask(x, 0.3, 7, 2))

        # functional entry points, with autograd
        xg = x.clone().requires_grad_()
        A, B = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
        out = aqlm_lora.aqlm_lora_linear(xg, *w, bias, A, B, 0.5, 0.3, lora_bias, seed=7, offset=2)
        out.backward(g)
        xr = x.clone().requires_grad_()
        Ar, Br = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
        ref.lora_linear(xr, *w, bias, Ar, Br, 0.5, 0.3, lora_bias, seed=7, offset=2).backward(g)
        for a, b in ((out, y_ref), (xg.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
            close(a, b)
        xg = x.clone().requires_grad_()
        base = aqlm_lora.aqlm_linear(xg, *w, bias)
        base.sum().backward()
        close(base, ref.aqlm_gemm(x, *w, bias))
        close(xg.grad, ref.aqlm_gemm_t(torch.ones(n, 12), *w))

    # the quantizer's scheme parser needs only torch
    assert aqlm_lora.parse_scheme("2x8") == aqlm_lora.parse_scheme("2x8g8")

    # the PEFT layer's names: listed, lazily loaded, and refused with the missing package's name
    missing = sys.argv[2]
    for name in ("AqlmLoraLinear", "dispatch_aqlm", "register"):
        assert name in aqlm_lora.__all__ and name in dir(aqlm_lora), name
        try:
            getattr(aqlm_lora, name)
        except ImportError as err:
            text = str(err)
            assert f"'{missing}'" in text and "not installed" in text, text
            assert err.name == missing, err.name
        else:
            raise AssertionError(f"aqlm_lora.{name} loaded without {missing}")
    try:
        from aqlm_lora import AqlmLoraLinear  # noqa: F401
    except ImportError as err:
        assert f"'{missing}'" in str(err), str(err)
    else:
        raise AssertionError("from aqlm_lora import AqlmLoraLinear worked")
    try:
        aqlm_lora.no_such_name
    except AttributeError:
        pass
    else:
        raise AssertionError("aqlm_lora.no_such_name did not raise AttributeError")
    print("lean import ok")
    """
)


def _run(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ops_and_functional_api_without_aqlm_and_peft():
    proc = _run(LEAN, "aqlm,peft", "aqlm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lean import ok" in proc.stdout


def test_layer_names_name_peft_when_only_peft_is_missing():
    proc = _run(LEAN, "peft", "peft")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_layer_names_load_when_everything_is_installed():
    import aqlm_lora

    assert aqlm_lora.AqlmLoraLinear.__module__ == "aqlm_lora.lora.layer"
    assert aqlm_lora.dispatch_aqlm.__module__ == "aqlm_lora.lora.dispatch"
    assert aqlm_lora.register.__module__ == "aqlm_lora.lora.dispatch"
    assert callable(aqlm_lora.quantize_model) and callable(aqlm_lora.quantize_linear)


COLLECT = textwrap.dedent(
    """
    import pytest

    sys.exit(pytest.main(sys.argv[2:]))
    """
)


def test_suite_skips_modules_that_need_missing_packages():
    """Without aqlm and peft: the modules that import them are reported as skipped (not collection
    errors), the op tests still collect, and an oracle-based test skips while others pass."""
    files = ["tests/lora/test_layer.py", "tests/lora/test_peft_integration.py"]
    files += ["tests/ops/test_ops.py", "tests/ops/test_dropout.py"]
    select = "test_dequantize and cpu and fp32 and 2x8- or test_kernel_mask_equals_reference and cpu"
    proc = _run(COLLECT, "aqlm,peft", *files, "-q", "-rs", "-p", "no:cacheprovider", "-k", select)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "test_layer.py needs the 'aqlm' package, which is not installed" in out, out
    assert "test_peft_integration.py needs the 'aqlm' package" in out, out
    assert "error" not in out.splitlines()[-1], out
    assert " passed" in out and " skipped" in out, out


def test_suite_import_errors_of_installed_packages_still_fail(tmp_path):
    """An import error that is not a missing optional package stays a collection error."""
    bad = tmp_path / "test_broken_import.py"
    bad.write_text("import aqlm_lora.no_such_module\n\ndef test_never():\n    pass\n")
    conftest = tmp_path / "conftest.py"
    conftest.write_text((ROOT / "tests" / "conftest.py").read_text())
    proc = _run(COLLECT, "aqlm,peft", str(bad), "-q", "-p", "no:cacheprovider")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "error" in (proc.stdout + proc.stderr).lower()
