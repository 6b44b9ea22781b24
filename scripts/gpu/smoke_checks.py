"""The GPU smoke test's checks at ordinary sizes: registration, every decode scheme, dtypes, empty /
strided / misaligned inputs, dropout masks, and (CUDA only) a non-default stream and which GEMV
kernel each scheme ran. The checks past 2**31 element indices are in smoke_big_index.py."""

from __future__ import annotations

import math
import time
from types import ModuleType
from typing import Any, Optional, Union

import torch
from op_registry import missing_kernels, registered_ops
from smoke_cases import (
    DECODE_MAX_ROWS,
    DEFAULT_SMEM,
    SMALL_MASKS,
    STREAM_CASES,
    TOL,
    decode_schemes,
    expected_gemv_kernel,
    scheme_tag,
    shared_memory_optin,
    staged_codebook_bytes,
)
from smoke_session import Smoke, Weight, mixed_stacks
from torch import Tensor

from aqlm_lora import reference as ref


def check_registration(s: Smoke) -> bool:
    """Every op the library registers (its schemas, read back from the dispatcher) has a kernel here."""
    key = "CUDA" if s.dev.type == "cuda" else "CPU"
    try:
        missing = missing_kernels(key)
    except RuntimeError as err:
        s.record(f"{key} kernels registered", False, str(err))
        return False
    s.record(f"{key} kernels registered", not missing, f"missing {missing}" if missing else ", ".join(registered_ops()))
    return not missing


def every_op(
    impl: Union[ModuleType, Any], w: Weight, x: Tensor, g: Tensor, A: Tensor, B: Tensor, xa: Optional[Tensor] = None
) -> dict[str, Tensor]:
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
        "lora_mixed_forward": impl.lora_mixed_forward(x, codes, books, scales, None, *mixed_stacks(x, A, B, B[:, 0])),
    }


def check_coverage(s: Smoke) -> None:
    """Every registered op is among those every_op runs (and so compared here): a new op fails this
    until it has a comparison."""
    w = s.weight("2x8", 8, 16, torch.float32)
    x, g = s.randn(2, 16), s.randn(2, 8)
    compared = {key.split(".")[0] for key in every_op(s.ops, w, x, g, s.randn(2, 16), s.randn(8, 2))}
    uncompared = sorted(set(registered_ops()) - compared)
    detail = f"no comparison for {uncompared}" if uncompared else ", ".join(sorted(compared))
    s.record("every registered op is compared", not uncompared, detail)


def check_schemes(s: Smoke, tokens: tuple[int, ...]) -> None:
    optin = shared_memory_optin(s.dev)
    s.log(f"   opt-in shared memory per block: {optin} B (default {DEFAULT_SMEM} B)")
    for scheme, cd, note in decode_schemes(optin):
        t0 = time.perf_counter()
        og, ig = scheme.out_group_size, scheme.in_group_size
        s.log(f"-- {scheme_tag(scheme)} {cd or ''}: {note} (codebooks as float32: {staged_codebook_bytes(scheme)} B)")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            w = s.weight(scheme, 6 * og, 10 * ig, dtype, cd)
            tag = f"{scheme_tag(scheme)} {cd or ''} {str(dtype)[6:]}"
            s.close(f"dequantize {tag}", s.ops.dequantize(*w), ref.dequantize(*w), TOL[dtype])
            for n in tokens:
                s.run_case(f"{tag} N={n}", w, s.randn(n, 10 * ig, dtype=dtype), dtype)
        s.log(f"   ({time.perf_counter() - t0:.1f}s)")


def check_extras(s: Smoke, large: bool) -> None:
    w64 = s.weight("2x8", 24, 80, torch.float64)
    for n in (1, 3, 40):
        s.run_case(f"fp64 N={n}", w64, s.randn(n, 80, dtype=torch.float64), torch.float64)
    w32 = s.weight("2x8", 24, 80, torch.float32)
    for n in (2, 40):  # decode (N <= DECODE_MAX_ROWS) and tiled
        x = s.randn(n, 80, dtype=torch.float16)
        s.run_case(f"fp16 input, fp32 codebooks+lora N={n}", w32, x, torch.float16, torch.float32)
    w16 = s.weight("1x16", 24, 80, torch.float16)
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
    codes, books, scales = s.weight("2x8", 24, 80, torch.float16)
    flat = torch.cat([books.new_zeros(1), books.reshape(-1)])
    odd_books = flat[1:].view(books.shape)
    wide = torch.stack([codes, torch.zeros_like(codes)], dim=-1).flatten(-2)  # [O, I, 2C]
    odd = (wide[..., ::2], odd_books, scales)
    for n in (2, 40):
        x = s.randn(n, 80, dtype=torch.float16)
        s.run_case(f"misaligned codebooks, strided codes N={n}", odd, x, torch.float16)
    if large:
        big = s.weight("1x16", 4096, 4096, torch.float16)
        s.run_case("4096x4096 1x16 N=1", big, s.randn(1, 4096, dtype=torch.float16), torch.float16, r=16)
        big = s.weight("2x8", 4096, 4096, torch.float16)
        s.run_case("4096x4096 2x8 N=2", big, s.randn(2, 4096, dtype=torch.float16), torch.float16, r=16)
        s.run_case("4096x4096 2x8 N=4", big, s.randn(4, 4096, dtype=torch.float16), torch.float16, r=16)
        s.run_case("4096x4096 2x8 N=300", big, s.randn(300, 4096, dtype=torch.float16), torch.float16, r=16)


def check_small_masks(s: Smoke) -> None:
    for shape, seed, offset, p in SMALL_MASKS:
        x = torch.empty(shape, device=s.dev)
        got, want = s.ops.dropout_mask(x, p, seed, offset), ref.dropout_mask(x, p, seed, offset)
        s.equal(f"dropout_mask {shape} seed={seed} p={p}", got, want)


def check_streams(s: Smoke) -> None:
    """All ops on a non-default stream, queued behind a ~50 ms spin and the copy of their input on
    that stream: a kernel launched on the default stream instead would run before the copy and read
    zeros. Results must match the reference and the default-stream results (bit for bit for our own
    kernels; cuBLAS may pick other algorithms per stream, so within tolerance)."""
    side = torch.cuda.Stream(s.dev)
    own = {"dequantize", "dropout_mask"}
    dtype = torch.float16
    for scheme, n in STREAM_CASES:
        og, ig = scheme.out_group_size, scheme.in_group_size
        w = s.weight(scheme, 48 * og, 16 * ig, dtype)
        out_f, in_f = 48 * og, 16 * ig
        x_src = s.randn(n, in_f, dtype=dtype)
        g_src = s.randn(n, out_f, dtype=dtype)
        A = s.randn(4, in_f, dtype=dtype, scale=1 / math.sqrt(in_f))
        B = s.randn(out_f, 4, dtype=dtype)
        decode = n <= DECODE_MAX_ROWS
        base = every_op(s.ops, w, x_src, g_src, A, B)
        torch.cuda.synchronize(s.dev)
        with torch.cuda.stream(side):
            x = torch.zeros_like(x_src)
            g = torch.zeros_like(g_src)
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time queued ahead on this stream
            x.copy_(x_src)
            g.copy_(g_src)
            got = every_op(s.ops, w, x, g, A, B)
        side.synchronize()
        want = every_op(ref, w, x_src, g_src, A, B, got["lora_forward.xa"])
        tag = f"{scheme_tag(scheme)} N={n}"
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
    for scheme, cd, note in decode_schemes(optin):
        w = s.weight(scheme, 6 * scheme.out_group_size, 10 * scheme.in_group_size, torch.float16, cd)
        x = s.randn(1, 10 * scheme.in_group_size, dtype=torch.float16)
        s.ops.aqlm_gemm(x, *w, None)  # warm-up outside the profiler
        torch.cuda.synchronize(s.dev)
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                s.ops.aqlm_gemm(x, *w, None)
                torch.cuda.synchronize(s.dev)
            names = {e.name for e in prof.events() if "gemv_" in e.name}
        except Exception as err:  # noqa: BLE001
            s.warn(f"kernel names not checked: profiler failed ({type(err).__name__}: {err})")
            return
        want = expected_gemv_kernel(scheme, optin)
        short = sorted({n.split("<")[0].split("::")[-1] for n in names})
        tag = scheme_tag(scheme)
        if not names:
            s.warn(f"{tag}: the profiler saw no gemv kernel (expected {want})")
        elif any(want in n for n in names):
            s.log(f"ok   {tag} ran {want} ({note})")
        else:
            s.warn(f"{tag} ran {short}, expected {want} ({note})")
