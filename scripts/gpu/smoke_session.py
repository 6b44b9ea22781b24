"""One run of the GPU smoke test: its record of checks, the comparisons that make them, its random
inputs and weights, and one weight's every op against the reference (``Smoke.run_case``)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Union

import torch
from smoke_cases import TOL
from torch import Tensor

from aqlm_lora import ops as aqlm_ops
from aqlm_lora import reference as ref
from aqlm_lora.scheme import Scheme, random_weight

Weight = tuple[Tensor, Tensor, Tensor]  # (codes, codebooks, scales), the order every op takes


def max_errors(got: Tensor, want: Tensor) -> tuple[float, float]:
    """(max |got - want|, max |want|) in float64 (0 for empty tensors)."""
    if want.numel() == 0:
        return 0.0, 0.0
    g, w = got.double(), want.double()
    return float((g - w).abs().max()), float(w.abs().max())


class Smoke:
    """Checks on one device. ``ops`` is the implementation under test (``aqlm_lora.ops``; the tests
    pass a corrupted one to see the checks fail)."""

    def __init__(
        self, device: torch.device, log: Callable[[str], None] = print, ops: Union[ModuleType, Any] = aqlm_ops
    ):
        self.dev = device
        self.log = log
        self.ops = ops
        self.checks = 0
        self.failures: list[str] = []
        self.warnings: list[str] = []
        self.gen = torch.Generator().manual_seed(0)

    # ---- bookkeeping

    def record(self, name: str, ok: bool, detail: str) -> None:
        self.checks += 1
        if not ok:
            self.failures.append(name)
        self.log(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self.log(f"WARN {msg}")

    @contextmanager
    def section(self, title: str) -> Iterator[None]:
        """Runs one group of checks; an exception fails the group and the run goes on."""
        t0 = time.perf_counter()
        self.log(f"== {title}")
        try:
            yield
        except Exception as err:  # noqa: BLE001 - reported as a failure, the next section still runs
            self.record(title, False, f"raised {type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")
        finally:
            self.sync()
            self.log(f"   ({time.perf_counter() - t0:.1f}s)")

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    # ---- comparisons

    def close(self, name: str, got: Tensor, want: Tensor, tol: float) -> None:
        if got.shape != want.shape or got.dtype != want.dtype or got.device != want.device:
            self.record(
                name,
                False,
                f"got {tuple(got.shape)} {got.dtype} {got.device}, want {tuple(want.shape)} {want.dtype} {want.device}",
            )
            return
        err, scale = max_errors(got, want)
        self.close_errors(name, err, scale, bool(torch.isfinite(got).all()), tol)

    def close_errors(self, name: str, err: float, scale: float, finite: bool, tol: float) -> None:
        rel = err / max(scale, 1e-12) if scale > 0 else err
        self.record(name, rel <= tol and finite, f"rel err {rel:.2e} (tol {tol:.0e}){'' if finite else ', NOT FINITE'}")

    def equal(self, name: str, got: Tensor, want: Tensor) -> None:
        same = got.shape == want.shape and got.dtype == want.dtype and bool(torch.equal(got.cpu(), want.cpu()))
        shapes = f"{tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"
        self.record(name, same, "bit-identical" if same else f"differ ({shapes})")

    # ---- inputs

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(device=self.dev, dtype=dtype)

    def weight(
        self,
        scheme: Union[str, Scheme],
        out_features: int,
        in_features: int,
        dtype: torch.dtype,
        code_dtype: Optional[torch.dtype] = None,
    ) -> Weight:
        """A random weight on the device (``aqlm_lora.scheme.random_weight``). With a ``code_dtype``
        wider than the scheme's, the codes are drawn again over that dtype's whole range: the kernels
        must read them mod 2**nbits."""
        w = random_weight(scheme, out_features, in_features, dtype, self.dev, generator=self.gen)
        if code_dtype is None or code_dtype == w.codes.dtype:
            return w.args()
        info = torch.iinfo(code_dtype)
        codes = torch.randint(info.min, info.max + 1, w.codes.shape, generator=self.gen, dtype=torch.int64)
        return codes.to(device=self.dev, dtype=code_dtype), w.codebooks, w.scales

    # ---- one weight, one input: every op against the reference

    def run_case(
        self,
        tag: str,
        w: Weight,
        x: Tensor,
        dtype: torch.dtype,
        lora_dtype: Optional[torch.dtype] = None,
        r: int = 4,
        p: float = 0.25,
        seed: int = 1234,
        offset: int = 7,
    ) -> None:
        codes, codebooks, scales = w
        tol = max(TOL[dtype], TOL[codebooks.dtype])
        out_f, in_f = codes.shape[0] * codebooks.shape[2], codes.shape[1] * codebooks.shape[3]
        lora_dtype = lora_dtype or dtype
        ltol = max(tol, TOL[lora_dtype])
        bias = self.randn(out_f, dtype=dtype)
        self.close(f"aqlm_gemm {tag}", self.ops.aqlm_gemm(x, *w, bias), ref.aqlm_gemm(x, *w, bias), tol)
        g = self.randn(*x.shape[:-1], out_f, dtype=dtype)
        self.close(f"aqlm_gemm_t {tag}", self.ops.aqlm_gemm_t(g, *w), ref.aqlm_gemm_t(g, *w), tol)
        A = self.randn(r, in_f, dtype=lora_dtype, scale=1 / math.sqrt(max(in_f, 1)))
        B = self.randn(out_f, r, dtype=lora_dtype)
        lb = self.randn(out_f, dtype=lora_dtype)
        args = (codes, codebooks, scales, bias, A, B, lb, 0.5, p, seed, offset)
        y, xa = self.ops.lora_forward(x, *args)
        y_ref, xa_ref = ref.lora_forward(x, *args)
        self.close(f"lora_forward.out {tag}", y, y_ref, tol)
        self.close(f"lora_forward.xa {tag}", xa, xa_ref, ltol)
        bargs = (codes, codebooks, scales, A, B, 0.5, p, seed, offset)
        for input_grad in (True, False):
            got = self.ops.lora_backward(g, x, xa, *bargs, input_grad)
            want = ref.lora_backward(g, x, xa, *bargs, input_grad)
            for name, a, b in zip(("grad_input", "grad_A", "grad_B"), got, want):
                self.close(f"lora_backward.{name} {tag} input_grad={input_grad}", a, b, ltol)
        margs = (codes, codebooks, scales, bias, *mixed_stacks(x, A, B, lb))
        got = self.ops.lora_mixed_forward(x, *margs)
        self.close(f"lora_mixed_forward {tag}", got, ref.lora_mixed_forward(x, *margs), ltol)


def mixed_stacks(x: Tensor, A: Tensor, B: Tensor, lb: Tensor) -> tuple:
    """lora_mixed_forward's adapter arguments after ``bias``: two adapters made from one (A, B, lora_bias),
    the second with half its rank zero-padded, DoRA-like row scales, and rows cycling over base, 0 and 1."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    half = B.clone()
    half[:, B.shape[1] // 2 :] = 0
    lora_A = torch.stack([A, A.flip(0)])
    lora_B_t = torch.stack([B.T, half.T.flip(0)]).contiguous()
    lora_bias = torch.stack([lb, -lb])
    scalings = torch.tensor([0.5, -1.5], dtype=A.dtype, device=A.device)
    out_f = B.shape[0]
    row_scale = torch.stack([torch.linspace(0.5, 1.5, out_f), torch.ones(out_f)]).to(A.dtype).to(A.device)
    indices = torch.arange(rows, device=x.device) % 3 - 1
    return lora_A, lora_B_t, lora_bias, scalings, row_scale, indices
