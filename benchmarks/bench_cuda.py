"""CUDA benchmark of one AQLM linear layer in fp16: our kernels vs dense cuBLAS and aqlm's kernels.

Run on a machine with a GPU, from the repository root, after building the extension with CUDA::

    python benchmarks/bench_cuda.py --out benchmarks/results/bench_cuda.md
    python benchmarks/bench_cuda.py --shapes 4096x4096 --schemes 2x8 --tokens 1,16 --no-aqlm

Rows: shapes (out x in) 4096x4096, 11008x4096, 4096x11008 and 8192x28672, schemes 1x16 g8 and 2x8
g8, tokens N = 1, 2, 4, 8 (the decode kernels: N <= 8), 12, 16, 64 (just past it: where a cliff
would show), 256, 1024, 4096; everything fp16 (codebooks, scales, activations, LoRA factors). Random codes over the
whole int16/int8 range, randn codebooks, so the numbers are about speed, not model quality.

Columns (times in microseconds per call):
- dense: ``F.linear(x, W)`` with W = our dequantized weight in fp16 (cuBLAS);
- ours: ``aqlm_lora.ops.aqlm_gemm`` and its ratio to dense; err: ``max|y - ref| / max|ref|`` of
  ours and of dense, against ``F.linear`` in float64 on the same weight;
- +LoRA: ``aqlm_lora.ops.lora_forward`` with r = 16 and the overhead over ours;
- aqlm: ``aqlm.QuantizedLinear`` on CUDA (its CUDA kernels for N <= 6, dequantize + matmul above;
  its kernels are JIT-compiled on first use), when ``import aqlm`` works and ``--no-aqlm`` is not given;
- train: one forward + backward of ``aqlm_lora.ops.aqlm_lora_linear`` (LoRA r = 16, no dropout;
  gradients for x, lora_A, lora_B) vs the same step on the dense weight
  (``F.linear(x, W) + s * (x A^T) B^T``), and their ratio.

Timing: CUDA events around blocks of back-to-back calls (each block ~1 ms or one call), the median
over blocks; each cell gets about ``--budget`` seconds. A time marked ``*`` is host-bound: issuing
the calls took the CPU at least 80% of the GPU time, so the kernels may be faster than shown. The
markdown table is rewritten after every row (so a run cut short still leaves its rows in ``--out``)
and printed at the end.

Without a CUDA device it prints "no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # imported in main: `--help` and the no-GPU exit need neither the extension nor the package
    from aqlm_lora.scheme import AqlmWeight, Scheme

LORA_RANK = 16
LORA_SCALING = 2.0
HERE = Path(__file__).resolve().parent
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def parse_shape(text: str) -> tuple[int, int]:
    out_features, in_features = text.lower().split("x")
    return int(out_features), int(in_features)


def make_weight(
    out_features: int, in_features: int, scheme: Scheme, device: torch.device
) -> tuple[AqlmWeight, Tensor, Tensor]:
    """A random fp16 AQLM weight (``aqlm_lora.scheme.random_weight``) and fp16 LoRA factors of rank 16.

    One generator, seeded from (shape, scheme), draws the weight and then the factors."""
    from aqlm_lora.scheme import random_weight

    g = torch.Generator().manual_seed(zlib.crc32(f"{out_features}x{in_features}-{scheme}".encode()))
    weight = random_weight(scheme, out_features, in_features, torch.float16, device, generator=g)
    lora_A = torch.randn(LORA_RANK, in_features, generator=g) / math.sqrt(in_features)
    lora_B = torch.randn(out_features, LORA_RANK, generator=g) * (0.1 / math.sqrt(LORA_RANK))
    half = dict(device=device, dtype=torch.float16)
    return weight, lora_A.to(**half), lora_B.to(**half)


def scheme_title(scheme: Scheme) -> str:
    """``2x8 g8``, ``2x8 g8 o2``: the groups spelled out, as the table shows them."""
    text = f"{scheme.num_codebooks}x{scheme.nbits} g{scheme.in_group_size}"
    return text + (f" o{scheme.out_group_size}" if scheme.out_group_size != 1 else "")


def time_us(fn: Callable[[], object], budget_s: float) -> tuple[float, bool]:
    """Median time of one ``fn()`` call in microseconds (CUDA events around blocks of calls), and
    whether it was host-bound (issuing a block took the CPU >= 80% of its GPU time)."""
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one_ms = max(start.elapsed_time(end), 1e-3)
    per_block = max(1, min(200, int(1.0 / one_ms)))
    blocks = max(3, min(30, int(budget_s * 1e3 / (per_block * one_ms))))
    times, host = [], []
    for _ in range(blocks):
        t0 = time.perf_counter()
        start.record()
        for _ in range(per_block):
            fn()
        end.record()
        host.append((time.perf_counter() - t0) * 1e3 / per_block)  # ms of CPU time to issue one call
        end.synchronize()
        times.append(start.elapsed_time(end) / per_block)
    gpu_ms = statistics.median(times)
    return gpu_ms * 1e3, statistics.median(host) >= 0.8 * gpu_ms


def fmt_time(timed: Optional[tuple[float, bool]]) -> str:
    return "n/a" if timed is None else fmt_us(timed[0]) + ("*" if timed[1] else "")


def us(timed: Optional[tuple[float, bool]]) -> Optional[float]:
    return None if timed is None else timed[0]


def make_aqlm_layer(weight: AqlmWeight):
    """A frozen fp16 ``aqlm.QuantizedLinear`` holding its own clone of ``weight``'s codes."""
    import aqlm

    scheme = weight.scheme
    layer = aqlm.QuantizedLinear(
        weight.in_features,
        weight.out_features,
        **scheme.aqlm_kwargs(),
        bias=False,
        device=weight.codes.device,
        dtype=torch.float16,
    )
    with torch.no_grad():
        layer.codes.data = weight.codes.clone()
        layer.codebooks.copy_(weight.codebooks)
        layer.scales.copy_(weight.scales)
    layer.requires_grad_(False)
    return layer


def fmt_us(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    return "n/a" if num is None or den is None or den <= 0 else f"{num / den:.2f}x"


def fmt_overhead(num: Optional[float], den: Optional[float]) -> str:
    return "n/a" if num is None or den is None or den <= 0 else f"{100.0 * (num / den - 1.0):+.1f}%"


HEADER = [
    "shape",
    "scheme",
    "N",
    "dense us",
    "ours us",
    "ours/dense",
    "err ours / dense",
    "+LoRA us",
    "LoRA overhead",
    "aqlm us",
    "ours/aqlm",
    "train ours us",
    "train dense us",
    "train ours/dense",
]


def render(rows: list[list[str]], meta: list[str], notes: list[str]) -> str:
    lines = ["# aqlm_lora CUDA benchmark (fp16)", ""]
    lines += [f"- {m}" for m in meta]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def measure_row(
    ops,
    weight: AqlmWeight,
    lora: tuple[Tensor, Tensor],
    dense_w: Tensor,
    aqlm_layer,
    n: int,
    budget: float,
    label: str,
    notes: list[str],
) -> list[str]:
    """One table row: every column for N tokens on one weight."""
    codes, codebooks, scales = weight.args()
    lora_A, lora_B = lora
    out_features, in_features = dense_w.shape
    device = dense_w.device
    x = torch.randn(n, in_features, device=device, dtype=torch.float16)
    with torch.no_grad():
        ref = F.linear(x.double(), dense_w.double())
        scale = float(ref.abs().max()) or 1.0
        err_ours = float((ops.aqlm_gemm(x, codes, codebooks, scales, None).double() - ref).abs().max()) / scale
        err_dense = float((F.linear(x, dense_w).double() - ref).abs().max()) / scale

        t_dense = time_us(lambda: F.linear(x, dense_w), budget)
        t_ours = time_us(lambda: ops.aqlm_gemm(x, codes, codebooks, scales, None), budget)
        t_lora = time_us(
            lambda: ops.lora_forward(x, codes, codebooks, scales, None, lora_A, lora_B, None, LORA_SCALING, 0.0, 0, 0),
            budget,
        )
        t_aqlm = None
        if aqlm_layer is not None:
            try:
                t_aqlm = time_us(lambda: aqlm_layer(x), budget)
            except Exception as e:  # noqa: BLE001
                notes.append(f"aqlm failed at {label}: {first_line(e)}")

    # Training step: forward + backward, gradients for x and the LoRA factors.
    xg = x.clone().requires_grad_(True)
    a = lora_A.clone().requires_grad_(True)
    b = lora_B.clone().requires_grad_(True)
    gy = torch.randn(n, out_features, device=device, dtype=torch.float16)

    def step_ours():
        xg.grad = a.grad = b.grad = None
        y = ops.aqlm_lora_linear(xg, codes, codebooks, scales, None, a, b, LORA_SCALING, dropout_p=0.0)
        y.backward(gy)

    def step_dense():
        xg.grad = a.grad = b.grad = None
        y = F.linear(xg, dense_w) + LORA_SCALING * ((xg @ a.t()) @ b.t())
        y.backward(gy)

    t_train = time_us(step_ours, budget)
    t_train_dense = time_us(step_dense, budget)
    return [
        f"{out_features}x{in_features}",
        scheme_title(weight.scheme),
        str(n),
        fmt_time(t_dense),
        fmt_time(t_ours),
        fmt_ratio(us(t_ours), us(t_dense)),
        f"{err_ours:.1e} / {err_dense:.1e}",
        fmt_time(t_lora),
        fmt_overhead(us(t_lora), us(t_ours)),
        fmt_time(t_aqlm),
        fmt_ratio(us(t_ours), us(t_aqlm)),
        fmt_time(t_train),
        fmt_time(t_train_dense),
        fmt_ratio(us(t_train), us(t_train_dense)),
    ]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "bench_cuda.md"), help="markdown file to write")
    p.add_argument(
        "--shapes", default="4096x4096,11008x4096,4096x11008,8192x28672", help="comma-separated OUTxIN"
    )
    p.add_argument("--schemes", default="1x16,2x8", help="comma-separated schemes CxB[g<in>][o<out>]")
    p.add_argument(
        "--tokens", default="1,2,4,8,12,16,64,256,1024,4096", help="comma-separated token counts N"
    )
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timing per cell")
    p.add_argument("--no-aqlm", action="store_true", help="skip the aqlm.QuantizedLinear column")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            f"bench_cuda: no CUDA device (torch {torch.__version__}, CUDA build: {torch.version.cuda}); nothing to do"
        )
        return 0

    from aqlm_lora import ops  # torch and the built extension only (no aqlm, no peft)
    from aqlm_lora.scheme import parse_scheme

    for op in ("aqlm_gemm", "lora_forward", "lora_backward", "aqlm_gemm_t"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aqlm_lora::{op}", "CUDA"):
            print(f"bench_cuda: aqlm_lora::{op} has no CUDA kernel: build the extension with CUDA first")
            return 2

    device = torch.device("cuda")
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    try:
        schemes = [parse_scheme(s) for s in args.schemes.split(",")]
    except ValueError as err:
        p.error(str(err))
    tokens = [int(t) for t in args.tokens.split(",")]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    props = torch.cuda.get_device_properties(device)
    meta = [
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"device: {props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}",
        f"times: median microseconds per call, CUDA events, ~{args.budget:g} s per cell; LoRA r = {LORA_RANK}; "
        "* = host-bound (issuing the calls took >= 80% of the GPU time)",
        "ours: the decode kernels for N <= 8, dequantized tiles + cuBLAS above (csrc/cuda/decode.cu choose_kernel)",
    ]
    notes: list[str] = []

    aqlm_reason = None
    if args.no_aqlm:
        aqlm_reason = "skipped (--no-aqlm)"
    else:
        try:
            import aqlm  # noqa: F401
        except Exception as err:  # noqa: BLE001 - any import failure just drops the column
            aqlm_reason = f"import aqlm failed: {first_line(err)}"
    if aqlm_reason is None:
        # Compile aqlm's CUDA kernels (JIT, on first use) up front so the build time is not timed.
        t0 = time.perf_counter()
        try:
            for scheme in schemes:
                weight, _, _ = make_weight(256, 256, scheme, device)
                with torch.no_grad():
                    make_aqlm_layer(weight)(torch.randn(1, 256, device=device, dtype=torch.float16))
            torch.cuda.synchronize()
            log(f"aqlm kernels ready in {time.perf_counter() - t0:.1f}s")
        except Exception as err:  # noqa: BLE001
            aqlm_reason = f"aqlm.QuantizedLinear failed on CUDA: {first_line(err)}"
    if aqlm_reason is not None:
        notes.append(f"aqlm column: {aqlm_reason}")
        log(notes[-1])

    rows: list[list[str]] = []
    for out_features, in_features in shapes:
        for scheme in schemes:
            weight, lora_A, lora_B = make_weight(out_features, in_features, scheme, device)
            with torch.no_grad():
                dense_w = ops.dequantize(*weight.args())  # [out, in] fp16
            aqlm_layer = make_aqlm_layer(weight) if aqlm_reason is None else None
            for n in tokens:
                label = f"{out_features}x{in_features} {scheme} N={n}"
                log(label)
                row = measure_row(ops, weight, (lora_A, lora_B), dense_w, aqlm_layer, n, args.budget, label, notes)
                rows.append(row)
                out_path.write_text(render(rows, meta, notes))
            del weight, dense_w, aqlm_layer
            torch.cuda.empty_cache()

    text = render(rows, meta, notes)
    out_path.write_text(text)
    print(text)
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
