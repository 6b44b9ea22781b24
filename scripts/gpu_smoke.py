#!/usr/bin/env python3
"""Smoke test of every aqlm_lora op on one device against ``aqlm_lora.reference``.

Run from anywhere after the extension is built (``scripts/gpu_check.sh`` runs it on a GPU box)::

    python scripts/gpu_smoke.py                 # CUDA (the default)
    python scripts/gpu_smoke.py --device cpu    # the same comparisons on the CPU kernels

Needs only torch and the built extension (no aqlm, peft or pytest). What it compares, each op's
output against the reference with a tolerance relative to the output's largest value:

- every decode GEMV variant and the tiled (dequantize + cuBLAS) path: schemes that pick the
  in_group-8 shared-memory kernel (also above the 48 KiB default dynamic shared memory, which
  needs the opt-in attribute, and the largest codebooks that still fit the device's opt-in limit),
  the in_group-8 global-memory kernel (1x16, and 8-bit codebooks too large for the opt-in shared
  memory, which must fall back to it), the generic kernel; float32/16/bf16/64, mixed dtypes,
  N = 0, leading dims, strided input, misaligned codebooks, large decode shapes;
- dropout masks bit for bit, and masks / LoRA dropout over tensors with more elements than
  ``--index-limit`` (2**32 on CUDA: element indices above 2**31 and 2**32), checked against the
  reference's Philox words on windows around those indices;
- CUDA only: all six ops on a non-default stream (same results as on the default stream, and
  ordered after earlier work queued on that stream), and, with the profiler, which GEMV kernel
  ran for each threshold scheme (a mismatch is a warning: the comparisons still ran).

Prints one line per check and ends with ``gpu_smoke: <checks> checks, <failures> failures,
<warnings> warnings in <seconds>s on <device>``; exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aqlm_lora import ops  # noqa: E402  (the ops need only torch and the built _C)
from aqlm_lora import reference as ref  # noqa: E402

OPS = ("dequantize", "aqlm_gemm", "aqlm_gemm_t", "dropout_mask", "lora_forward", "lora_backward")
# Largest error allowed, relative to the largest |reference| value, per output dtype. The kernels
# and the reference both accumulate in float32 (float64); what differs is rounding and summation
# order, which stays within a few units in the last place of the output dtype.
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}
DEFAULT_SMEM = 48 * 1024  # bytes of dynamic shared memory a kernel gets without opting in
BOOK_ROW_BYTES_8BIT = 256 * 8 * 4  # one 8-bit codebook of in_group 8, staged as float32


class Smoke:
    def __init__(self, device: torch.device, log: Callable[[str], None] = print):
        self.dev = device
        self.log = log
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
    def section(self, title: str):
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
        detail = "bit-identical" if same else f"differ ({shapes})"
        self.record(name, same, detail)

    # ---- inputs

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(device=self.dev, dtype=dtype)

    def weight(self, C: int, nbits: int, og: int, ig: int, out_groups: int, in_groups: int, dtype, code_dtype=None):
        """Random (codes, codebooks, scales): codes over the whole signed range of their dtype."""
        code_dtype = code_dtype or (torch.int8 if nbits <= 8 else torch.int16)
        info = torch.iinfo(code_dtype)
        shape = (out_groups, in_groups, C)
        codes = torch.randint(info.min, info.max + 1, shape, generator=self.gen, dtype=torch.int64)
        codebooks = torch.randn(C, 2**nbits, og, ig, generator=self.gen) / math.sqrt(ig * C)
        scales = torch.rand(out_groups, 1, 1, 1, generator=self.gen) + 0.5
        return (
            codes.to(code_dtype).to(self.dev),
            codebooks.to(device=self.dev, dtype=dtype),
            scales.to(device=self.dev, dtype=dtype),
        )

    # ---- one weight, one input: every op against the reference

    def run_case(self, tag, w, x, dtype, lora_dtype=None, r=4, p=0.25, seed=1234, offset=7) -> None:
        codes, codebooks, scales = w
        tol = max(TOL[dtype], TOL[codebooks.dtype])
        out_f, in_f = codes.shape[0] * codebooks.shape[2], codes.shape[1] * codebooks.shape[3]
        lora_dtype = lora_dtype or dtype
        ltol = max(tol, TOL[lora_dtype])
        bias = self.randn(out_f, dtype=dtype)
        self.close(f"aqlm_gemm {tag}", ops.aqlm_gemm(x, *w, bias), ref.aqlm_gemm(x, *w, bias), tol)
        g = self.randn(*x.shape[:-1], out_f, dtype=dtype)
        self.close(f"aqlm_gemm_t {tag}", ops.aqlm_gemm_t(g, *w), ref.aqlm_gemm_t(g, *w), tol)
        A = self.randn(r, in_f, dtype=lora_dtype, scale=1 / math.sqrt(max(in_f, 1)))
        B = self.randn(out_f, r, dtype=lora_dtype)
        lb = self.randn(out_f, dtype=lora_dtype)
        args = (codes, codebooks, scales, bias, A, B, lb, 0.5, p, seed, offset)
        y, xa = ops.lora_forward(x, *args)
        y_ref, xa_ref = ref.lora_forward(x, *args)
        self.close(f"lora_forward.out {tag}", y, y_ref, tol)
        self.close(f"lora_forward.xa {tag}", xa, xa_ref, ltol)
        bargs = (codes, codebooks, scales, A, B, 0.5, p, seed, offset)
        for input_grad in (True, False):
            got = ops.lora_backward(g, x, xa, *bargs, input_grad)
            want = ref.lora_backward(g, x, xa, *bargs, input_grad)
            for name, a, b in zip(("grad_input", "grad_A", "grad_B"), got, want):
                self.close(f"lora_backward.{name} {tag} input_grad={input_grad}", a, b, ltol)


def max_errors(got: Tensor, want: Tensor) -> tuple[float, float]:
    """(max |got - want|, max |want|) in float64 (0 for empty tensors)."""
    if want.numel() == 0:
        return 0.0, 0.0
    g, w = got.double(), want.double()
    return float((g - w).abs().max()), float(w.abs().max())


def ref_keep(indices: Tensor, p: float, seed: int, offset: int) -> Tensor:
    """The reference keep-mask of arbitrary element indices (int64 tensor, CPU): Philox words of
    counter (index // 4, offset), word index % 4, top 24 bits as a float32 uniform, kept if >= p."""
    words = torch.stack(ref.philox4x32_10(indices >> 2, offset, seed), dim=-1)
    word = words.gather(1, (indices & 3).unsqueeze(1)).squeeze(1)
    u = (word >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return u >= torch.tensor(p, dtype=torch.float32)


def windows(numel: int, limit: int, width: int = 4096) -> list[tuple[int, int]]:
    """Index ranges [a, b) to check: around limit / 2, around limit, and the tail of `numel`."""
    spots = [(limit // 2 - width, limit // 2 + width), (limit - width, limit + width), (numel - 2 * width - 3, numel)]
    return [(max(a, 0), min(b, numel)) for a, b in spots if a < numel]


# ---------------------------------------------------------------------------------------------
# Sections


def check_registration(s: Smoke) -> bool:
    key = "CUDA" if s.dev.type == "cuda" else "CPU"
    missing = [o for o in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aqlm_lora::{o}", key)]
    s.record(f"{key} kernels registered", not missing, f"missing {missing}" if missing else ", ".join(OPS))
    return not missing


def decode_schemes(s: Smoke) -> list[tuple]:
    """(C, nbits, og, ig, code dtype, note): every decode kernel variant, including the shared
    memory thresholds of decode.cu's 8-bit path (codebooks staged as float32: C * 256 * og * 8 * 4
    bytes; above 48 KiB the kernel opts in, above the device's opt-in limit it must fall back to
    the global-memory kernel)."""
    optin = shared_memory_optin(s.dev)
    fit = optin // BOOK_ROW_BYTES_8BIT  # largest C * og whose 8-bit codebooks fit
    schemes = [
        (1, 16, 1, 8, None, "ig8 global (L2) kernel, one codebook"),
        (2, 8, 1, 8, None, "ig8 shared-memory kernel, 16 KiB"),
        (1, 8, 2, 8, None, "shared memory, out_group 2"),
        (4, 8, 1, 8, None, "shared memory, 32 KiB"),
        (2, 7, 1, 8, None, "shared memory, 7-bit codes"),
        (2, 16, 1, 8, None, "ig8 global kernel, several codebooks"),
        (2, 8, 1, 8, torch.int16, "8-bit codes stored as int16"),
        (1, 16, 1, 16, None, "generic kernel"),
        (3, 5, 2, 4, None, "generic, odd sizes"),
        (1, 1, 1, 1, torch.int16, "generic, 1-bit, in_group 1"),
        (8, 8, 1, 8, None, "shared memory 64 KiB > 48 KiB default: opt-in attribute"),
        (4, 8, 2, 8, None, "shared memory 64 KiB with out_group 2: opt-in attribute"),
        (4, 8, fit // 4, 8, None, f"largest 8-bit codebooks that fit the opt-in limit ({optin} B)"),
        (2, 8, 16, 8, None, "2x8 out_group 16: 256 KiB > opt-in limit, global-memory fallback"),
        (1, 8, fit + 1, 8, None, "one 8-bit codebook just over the opt-in limit: global fallback"),
    ]
    return schemes


def shared_memory_optin(dev: torch.device) -> int:
    """The device's opt-in shared memory per block (bytes); 227 KiB (H100/H200) off CUDA."""
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        value = getattr(props, "shared_memory_per_block_optin", None)
        if value:
            return int(value)
    return 227 * 1024


def expected_gemv_kernel(C: int, nbits: int, og: int, ig: int, optin: int) -> str:
    if ig != 8:
        return "gemv_generic_kernel"
    if nbits <= 8 and C * (2**nbits) * og * 8 * 4 <= optin:
        return "gemv_ig8_smem_kernel"
    return "gemv_ig8_global_kernel"


def check_schemes(s: Smoke, tokens: tuple[int, ...]) -> None:
    optin = shared_memory_optin(s.dev)
    s.log(f"   opt-in shared memory per block: {optin} B (default {DEFAULT_SMEM} B)")
    for C, nbits, og, ig, cd, note in decode_schemes(s):
        t0 = time.perf_counter()
        smem = C * (2**nbits) * og * 8 * 4
        s.log(f"-- {C}x{nbits} og{og} ig{ig} {cd or ''}: {note} (codebooks as float32: {smem} B)")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            w = s.weight(C, nbits, og, ig, 6, 10, dtype, cd)
            tag = f"{C}x{nbits} og{og} ig{ig} {cd or ''} {str(dtype)[6:]}"
            s.close(f"dequantize {tag}", ops.dequantize(*w), ref.dequantize(*w), TOL[dtype])
            for n in tokens:
                s.run_case(f"{tag} N={n}", w, s.randn(n, 10 * ig, dtype=dtype), dtype)
        s.log(f"   ({time.perf_counter() - t0:.1f}s)")


def check_extras(s: Smoke, large: bool) -> None:
    w64 = s.weight(2, 8, 1, 8, 24, 10, torch.float64)
    for n in (1, 3, 40):
        s.run_case(f"fp64 N={n}", w64, s.randn(n, 80, dtype=torch.float64), torch.float64)
    w32 = s.weight(2, 8, 1, 8, 24, 10, torch.float32)
    for n in (3, 40):
        x = s.randn(n, 80, dtype=torch.float16)
        s.run_case(f"fp16 input, fp32 codebooks+lora N={n}", w32, x, torch.float16, torch.float32)
    w16 = s.weight(1, 16, 1, 8, 24, 10, torch.float16)
    mixed = (w16[0], w16[1], w16[2].double())  # float64 scales with float16 codebooks
    for n in (2, 20):
        s.run_case(f"fp16, fp64 scales N={n}", mixed, s.randn(n, 80, dtype=torch.float16), torch.float16)
    s.run_case("N=0", w16, s.randn(0, 80, dtype=torch.float16), torch.float16)
    s.run_case("leading dims N=0", w16, s.randn(2, 0, 80, dtype=torch.float16), torch.float16)
    for n in (2, 30):
        x = s.randn(n, 3, 160, dtype=torch.float16)[..., ::2]  # [n, 3, 80], non-contiguous
        s.run_case(f"strided [n,3,80] n={n}", w16, x, torch.float16)
    # Codebooks starting 2 bytes into their storage (not 16-byte aligned) and codes that are a
    # strided view: the ops must realign / copy them, not read them as if aligned and dense.
    codes, books, scales = s.weight(2, 8, 1, 8, 24, 10, torch.float16)
    flat = torch.cat([books.new_zeros(1), books.reshape(-1)])
    odd_books = flat[1:].view(books.shape)
    wide = torch.stack([codes, torch.zeros_like(codes)], dim=-1).flatten(-2)  # [O, I, 2C]
    odd = (wide[..., ::2], odd_books, scales)
    for n in (3, 40):
        x = s.randn(n, 80, dtype=torch.float16)
        s.run_case(f"misaligned codebooks, strided codes N={n}", odd, x, torch.float16)
    if large:
        big = s.weight(1, 16, 1, 8, 4096, 512, torch.float16)
        s.run_case("4096x4096 1x16 N=1", big, s.randn(1, 4096, dtype=torch.float16), torch.float16, r=16)
        big = s.weight(2, 8, 1, 8, 4096, 512, torch.float16)
        s.run_case("4096x4096 2x8 N=4", big, s.randn(4, 4096, dtype=torch.float16), torch.float16, r=16)
        s.run_case("4096x4096 2x8 N=300", big, s.randn(300, 4096, dtype=torch.float16), torch.float16, r=16)


def check_small_masks(s: Smoke) -> None:
    cases = [((7, 129), 0, 0, 0.5), ((3, 5, 11), 2**40 + 17, 3, 0.1), ((1000,), 2**62 - 1, 2**33 + 5, 0.9)]
    for shape, seed, offset, p in cases:
        x = torch.empty(shape, device=s.dev)
        got, want = ops.dropout_mask(x, p, seed, offset), ref.dropout_mask(x, p, seed, offset)
        s.equal(f"dropout_mask {shape} seed={seed} p={p}", got, want)


def check_big_mask(s: Smoke, limit: int) -> None:
    """dropout_mask over more than `limit` elements (input is a stride-0 view: no memory)."""
    p, seed, offset = 0.3, 2**40 + 3, 5
    cols = 4099  # odd row length: the last Philox quadruple is partial
    rows = limit // cols + 2
    numel = rows * cols
    s.log(f"   mask of {rows} x {cols} = {numel} elements (> {limit})")
    x = torch.zeros((), device=s.dev).expand(rows, cols)
    mask = ops.dropout_mask(x, p, seed, offset).reshape(-1)
    for a, b in windows(numel, limit) + [(limit // 4 - 4096, limit // 4 + 4096)]:
        want = ref_keep(torch.arange(a, b, dtype=torch.int64), p, seed, offset)
        s.equal(f"dropout_mask elements [{a}, {b}) of {numel}", mask[a:b].cpu(), want)
    kept = float(mask.sum(dtype=torch.int64)) / numel
    slack = 6 * math.sqrt(p * (1 - p) / numel) + 1e-6  # six standard deviations
    s.record(
        f"dropout_mask keep fraction over {numel} elements",
        abs(kept - (1 - p)) <= slack,
        f"{kept:.6f}, want {1 - p} +- {slack:.1e}",
    )


def check_big_tiled_lora(s: Smoke, limit: int, chunk_rows: int) -> None:
    """lora_forward / lora_backward on the tiled path with an input of more than `limit`
    elements: the dropout of x (forward, grad_A) and of the input gradient uses element indices
    above `limit`. Compared in row chunks against float32 torch math with the op's own mask,
    which is itself checked against the reference on windows above `limit`."""
    p, seed, offset, scaling, r = 0.3, 2**40 + 3, 5, 0.5, 4
    in_f = 64
    n = limit // in_f + 37
    dtype = torch.float16
    codes, books, scales = s.weight(2, 8, 1, 8, 16, in_f // 8, dtype)
    out_f = 16
    s.log(f"   x [{n}, {in_f}] = {n * in_f} elements (> {limit})")
    # Magnitudes keep the sums over ~2**25 rows (grad_A, grad_B) far inside float16's range: with
    # unit-scale g and B, grad_A's largest entries would pass 65504.
    x = torch.randn(n, in_f, device=s.dev, dtype=dtype)
    A = s.randn(r, in_f, dtype=dtype, scale=1 / 8)
    B = s.randn(out_f, r, dtype=dtype, scale=1 / 2)
    bias, lb = s.randn(out_f, dtype=dtype), s.randn(out_f, dtype=dtype)
    mask = ops.dropout_mask(x, p, seed, offset)
    for a, b in windows(n * in_f, limit):
        want = ref_keep(torch.arange(a, b, dtype=torch.int64), p, seed, offset)
        s.equal(f"dropout_mask of x, elements [{a}, {b})", mask.reshape(-1)[a:b].cpu(), want)
    y, xa = ops.lora_forward(x, codes, books, scales, bias, A, B, lb, scaling, p, seed, offset)
    g = torch.randn(n, out_f, device=s.dev, dtype=dtype) / 100
    gx, gA, gB = ops.lora_backward(g, x, xa, codes, books, scales, A, B, scaling, p, seed, offset, True)

    Af, Bf = A.float(), B.float()
    err = {k: [0.0, 0.0, True] for k in ("out", "xa", "grad_input")}
    gA_want = torch.zeros(r, in_f, device=s.dev)
    gB_want = torch.zeros(out_f, r, device=s.dev)

    def acc(key: str, got: Tensor, want: Tensor) -> None:
        e, m = max_errors(got, want)
        err[key][0] = max(err[key][0], e)
        err[key][1] = max(err[key][1], m)
        err[key][2] = err[key][2] and bool(torch.isfinite(got).all())

    for r0 in range(0, n, chunk_rows):
        sl = slice(r0, min(n, r0 + chunk_rows))
        xd = x[sl].float() * mask[sl] / (1 - p)
        xa_w = xd @ Af.T
        y_w = ref.aqlm_gemm(x[sl].float(), codes, books, scales, bias.float()) + scaling * (xa_w @ Bf.T + lb.float())
        acc("out", y[sl], y_w.to(dtype))
        acc("xa", xa[sl], xa_w.to(dtype))
        gf = g[sl].float()
        gb = gf @ Bf
        gx_w = ref.aqlm_gemm_t(gf, codes, books, scales) + scaling * (gb @ Af) * mask[sl] / (1 - p)
        acc("grad_input", gx[sl], gx_w.to(dtype))
        gA_want += scaling * (gb.T @ xd)
        gB_want += scaling * (gf.T @ xa[sl].float())
    for key, (e, m, finite) in err.items():
        name = "lora_forward." + key if key != "grad_input" else "lora_backward.grad_input"
        s.close_errors(f"{name} over {n * in_f} elements", e, m, finite, TOL[dtype])
    s.close(f"lora_backward.grad_A over {n * in_f} elements", gA, gA_want.to(dtype), TOL[dtype])
    s.close(f"lora_backward.grad_B over {n * in_f} elements", gB, gB_want.to(dtype), TOL[dtype])


def check_big_decode_lora(s: Smoke, limit: int, chunk_cols: int) -> None:
    """lora_forward on the decode path (8 tokens: GEMV + the fused LoRA shrink, which draws the
    dropout mask itself) with in_features so large that the last token's element indices pass
    `limit`; compared in column chunks against float32 torch math with dropout_mask's mask."""
    p, seed, offset, scaling, r, tokens = 0.3, 2**40 + 3, 5, 0.5, 2, 8
    in_f = (limit // (tokens - 1) // 8 + 16) * 8  # token 7 starts past `limit`
    dtype = torch.float16
    codes, books, scales = s.weight(2, 8, 1, 8, 4, in_f // 8, dtype)
    out_f = 4
    s.log(f"   x [{tokens}, {in_f}] = {tokens * in_f} elements (token {tokens - 1} starts at {(tokens - 1) * in_f})")
    x = torch.randn(tokens, in_f, device=s.dev, dtype=dtype) / 16  # |y| ~ 400: sums over 3e8 columns
    A = torch.randn(r, in_f, device=s.dev, dtype=dtype) / math.sqrt(in_f)
    B = s.randn(out_f, r, dtype=dtype)
    bias = s.randn(out_f, dtype=dtype)
    y, xa = ops.lora_forward(x, codes, books, scales, bias, A, B, None, scaling, p, seed, offset)
    mask = ops.dropout_mask(x, p, seed, offset)
    a = (tokens - 1) * in_f
    want = ref_keep(torch.arange(a, a + 8192, dtype=torch.int64), p, seed, offset)
    s.equal(f"dropout_mask of x, elements [{a}, {a + 8192})", mask.reshape(-1)[a : a + 8192].cpu(), want)
    y_w = torch.zeros(tokens, out_f, device=s.dev)
    xa_w = torch.zeros(tokens, r, device=s.dev)
    groups = chunk_cols // 8
    for g0 in range(0, in_f // 8, groups):
        g1 = min(in_f // 8, g0 + groups)
        cols = slice(g0 * 8, g1 * 8)
        xf = x[:, cols].float()
        y_w += ref.aqlm_gemm(xf, codes[:, g0:g1].contiguous(), books, scales, None)
        xa_w += (xf * mask[:, cols] / (1 - p)) @ A[:, cols].float().T
    y_w += bias.float() + scaling * (xa_w @ B.float().T)
    s.close(f"lora_forward.xa decode, {tokens * in_f} elements", xa, xa_w.to(dtype), TOL[dtype])
    s.close(f"lora_forward.out decode, {tokens * in_f} elements", y, y_w.to(dtype), TOL[dtype])


def every_op(impl, w, x: Tensor, g: Tensor, A: Tensor, B: Tensor, xa: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Every op of ``impl`` (``aqlm_lora.ops`` or ``aqlm_lora.reference``) once, dropout on; outputs
    by name. The backward takes ``xa`` when given (the reference is fed the kernels' xa), else the
    forward's own."""
    codes, books, scales = w
    p, seed, offset = 0.25, 99, 3
    y, xa_fwd = impl.lora_forward(x, codes, books, scales, None, A, B, None, 0.5, p, seed, offset)
    xa_bwd = xa_fwd if xa is None else xa
    gx, gA, gB = impl.lora_backward(g, x, xa_bwd, codes, books, scales, A, B, 0.5, p, seed, offset, True)
    return {
        "dequantize": impl.dequantize(*w),
        "aqlm_gemm": impl.aqlm_gemm(x, *w, None),
        "aqlm_gemm_t": impl.aqlm_gemm_t(g, *w),
        "dropout_mask": impl.dropout_mask(x, p, seed, offset),
        "lora_forward.out": y,
        "lora_forward.xa": xa_fwd,
        "lora_backward.grad_input": gx,
        "lora_backward.grad_A": gA,
        "lora_backward.grad_B": gB,
    }


def check_streams(s: Smoke) -> None:
    """All six ops on a non-default stream, queued behind a ~50 ms spin and the copy of their
    input on that stream: a kernel launched on the default stream instead would run before the
    copy and read zeros. Results must match the reference and the default-stream results (bit for
    bit for our own kernels; cuBLAS may pick other algorithms per stream, so within tolerance)."""
    side = torch.cuda.Stream(s.dev)
    own = {"dequantize", "dropout_mask"}
    for (C, nbits, og, ig), n in [((2, 8, 1, 8), 3), ((1, 16, 1, 8), 5), ((3, 5, 2, 4), 2), ((2, 8, 1, 8), 40)]:
        dtype = torch.float16
        w = s.weight(C, nbits, og, ig, 48, 16, dtype)
        out_f, in_f = 48 * og, 16 * ig
        x_src = s.randn(n, in_f, dtype=dtype)
        g_src = s.randn(n, out_f, dtype=dtype)
        A = s.randn(4, in_f, dtype=dtype, scale=1 / math.sqrt(in_f))
        B = s.randn(out_f, 4, dtype=dtype)
        decode = n <= 8
        base = every_op(ops, w, x_src, g_src, A, B)
        torch.cuda.synchronize(s.dev)
        with torch.cuda.stream(side):
            x = torch.zeros_like(x_src)
            g = torch.zeros_like(g_src)
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time queued ahead on this stream
            x.copy_(x_src)
            g.copy_(g_src)
            got = every_op(ops, w, x, g, A, B)
        side.synchronize()
        want = every_op(ref, w, x_src, g_src, A, B, got["lora_forward.xa"])
        tag = f"{C}x{nbits} og{og} ig{ig} N={n}"
        for key, t in got.items():
            if t.dtype == torch.bool:
                s.equal(f"side stream {key} {tag} vs reference", t, want[key])
            else:
                s.close(f"side stream {key} {tag} vs reference", t, want[key], TOL[dtype])
            exact = key in own or (decode and key in ("aqlm_gemm", "lora_forward.out", "lora_forward.xa"))
            if exact:
                s.equal(f"side stream {key} {tag} vs default stream", t, base[key])
            else:
                s.close(f"side stream {key} {tag} vs default stream", t, base[key], TOL[dtype])
        del x, g, got


def check_branches(s: Smoke) -> None:
    """Which GEMV kernel ran for each threshold scheme (profiler kernel names; warnings only)."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except Exception as err:  # noqa: BLE001
        s.warn(f"kernel names not checked: torch.profiler unavailable ({err})")
        return
    optin = shared_memory_optin(s.dev)
    for C, nbits, og, ig, cd, note in decode_schemes(s):
        w = s.weight(C, nbits, og, ig, 6, 10, torch.float16, cd)
        x = s.randn(1, 10 * ig, dtype=torch.float16)
        ops.aqlm_gemm(x, *w, None)  # warm-up outside the profiler
        torch.cuda.synchronize(s.dev)
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                ops.aqlm_gemm(x, *w, None)
                torch.cuda.synchronize(s.dev)
            names = {e.name for e in prof.events() if "gemv_" in e.name}
        except Exception as err:  # noqa: BLE001
            s.warn(f"kernel names not checked: profiler failed ({type(err).__name__}: {err})")
            return
        want = expected_gemv_kernel(C, nbits, og, ig, optin)
        short = sorted({n.split("<")[0].split("::")[-1] for n in names})
        if not names:
            s.warn(f"{C}x{nbits} og{og} ig{ig}: the profiler saw no gemv kernel (expected {want})")
        elif any(want in n for n in names):
            s.log(f"ok   {C}x{nbits} og{og} ig{ig} ran {want} ({note})")
        else:
            s.warn(f"{C}x{nbits} og{og} ig{ig} ran {short}, expected {want} ({note})")


def free_memory(dev: torch.device) -> Optional[int]:
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Smoke:
    dev = torch.device(args.device)
    s = Smoke(dev, log)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    log(
        f"gpu_smoke: torch {torch.__version__}, device {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    )
    if dev.type == "cuda" and not torch.cuda.is_available():
        s.record("torch.cuda.is_available()", False, "False: no usable GPU")
        return s
    if not check_registration(s):
        return s
    tokens = tuple(int(t) for t in args.tokens.split(","))
    limit = args.index_limit or (2**32 if dev.type == "cuda" else 2**16)
    with s.section("schemes: every decode kernel variant and the tiled path"):
        check_schemes(s, tokens)
    with s.section("dtypes, N = 0, strides, alignment, large shapes"):
        check_extras(s, large=not args.quick)
    with s.section("dropout masks"):
        check_small_masks(s)
    if dev.type == "cuda":
        with s.section("non-default CUDA stream"):
            check_streams(s)
        with s.section("which GEMV kernel each threshold scheme ran (profiler)"):
            check_branches(s)
    free = free_memory(dev)
    # The three large-index sections need about 4.3, 25 and 40 GB of GPU memory at limit 2**32
    # (2**31 for the two LoRA ones); they are skipped with a warning where less is free.
    lora_limit = min(limit, 2**31)
    for title, need, fn in [
        (f"dropout_mask over > {limit} elements", limit * 1.1, lambda: check_big_mask(s, limit)),
        (
            f"tiled LoRA dropout over > {lora_limit} elements",
            lora_limit * 12,
            lambda: check_big_tiled_lora(s, lora_limit, chunk_rows=2**22),
        ),
        (
            f"decode LoRA shrink with indices > {lora_limit}",
            lora_limit * 19,
            lambda: check_big_decode_lora(s, lora_limit, chunk_cols=2**24),
        ),
    ]:
        if args.no_big:
            s.warn(f"skipped (--no-big): {title}")
            continue
        if free is not None and free < need:
            s.warn(f"skipped: {title} needs ~{need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free")
            continue
        with s.section(title):
            fn()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if s.failures:
        more = " ..." if len(s.failures) > 20 else ""
        s.log(f"gpu_smoke: failed checks: {'; '.join(s.failures[:20])}{more}")
    s.log(
        f"gpu_smoke: {s.checks} checks, {len(s.failures)} failures, {len(s.warnings)} warnings "
        f"in {time.perf_counter() - t0:.1f}s on {dev}"
    )
    return s


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="device to test (default cuda; cpu runs the same comparisons)")
    p.add_argument("--tokens", default="1,5,8,9,40", help="token counts N per scheme (decode is N <= 8)")
    p.add_argument(
        "--index-limit",
        type=int,
        default=0,
        help="large-index checks go past this many elements (default 2**32 on CUDA, 2**16 on CPU)",
    )
    p.add_argument("--no-big", action="store_true", help="skip the large-index checks")
    p.add_argument("--quick", action="store_true", help="skip the 4096x4096 shapes")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    s = run(parse_args(argv))
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
