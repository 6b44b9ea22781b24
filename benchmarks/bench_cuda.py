"""CUDA benchmark of one AQLM linear layer in fp16: our kernels vs dense cuBLAS and aqlm's kernels.

Run on a machine with a GPU, from the repository root, after building the extension with CUDA::

    python benchmarks/bench_cuda.py --out benchmarks/results/bench_cuda.md
    python benchmarks/bench_cuda.py --shapes 4096x4096 --schemes 2x8 --tokens 1,16 --no-aqlm

Rows: shapes (out x in) 4096x4096, 11008x4096, 4096x11008 and 8192x28672, schemes 1x16 g8 and 2x8
g8, tokens N = 1, 2 (the decode kernels: N <= DECODE_MAX_ROWS), 3, 4, 6, 8, 12, 16, 32, 64 (past
it: where a cliff would show), 256, 1024, 4096; everything fp16 (codebooks, scales, activations,
LoRA factors). Random codes over the whole int16/int8 range, randn codebooks, so the numbers are
about speed, not model quality.

Columns (times in microseconds per call):
- dense: ``F.linear(x, W)`` with W = our dequantized weight in fp16 (cuBLAS);
- ours: ``aqlm_lora.ops.aqlm_gemm`` and its ratio to dense; err: ``max|y - ref| / max|ref|`` of
  ours and of dense, against ``F.linear`` in float64 on the same weight;
- dq+mm: ``ops.dequantize`` of the whole weight then ``F.linear``, the simplest alternative at any N,
  and ours over it (the decode/prefill threshold is where the decode kernels stop beating it);
- +LoRA: ``aqlm_lora.ops.lora_forward`` with r = 16 and the overhead over ours;
- aqlm: ``aqlm.QuantizedLinear`` on CUDA (its CUDA kernels for N <= 6, dequantize + matmul above;
  its kernels are JIT-compiled on first use), when ``import aqlm`` works and ``--no-aqlm`` is not given;
- train: one forward + backward of ``aqlm_lora.ops.aqlm_lora_linear`` (LoRA r = 16, no dropout;
  gradients for x, lora_A, lora_B) vs the same step on the dense weight
  (``F.linear(x, W) + s * (x A^T) B^T``), and their ratio.

Then a training table at ``--train-tokens`` (2048) tokens in bf16: our ``AqlmLoraLinear`` (PEFT's
constructor, on an ``aqlm.QuantizedLinear``; the functional op when aqlm or peft is missing) vs PEFT's
own ``lora.Linear`` on a dense bf16 ``nn.Linear`` holding the same weight, time and peak memory. Peak
memory: ``torch.cuda.max_memory_allocated`` over building the layer and one step, minus what was
allocated before (the input and the output gradient), so it counts the weights, the adapter, the
saved activations, the gradients and all scratch.

Last, the issue's targets as PASS/FAIL lines with their ratios, and the measured decode/prefill
threshold (smallest N at which dq+mm beats the decode kernels).

Timing (``--timing graph``, the default): each call is captured ``k`` times into a CUDA graph
(``k`` sized to ~1 ms of GPU work) and the graph replayed between CUDA events; the median over
replays divided by ``k``. That is GPU time without the Python launch cost that dominates single
small calls (a decode step of a served model runs as a graph too). A cell whose capture fails is
timed eagerly and marked ``e``. The train columns are always eager (autograd). ``--timing eager``:
CUDA events around blocks of back-to-back calls; a time marked ``*`` is host-bound: issuing the
calls took the CPU at least 80% of the GPU time, so the kernels may be faster than shown. Each cell
gets about ``--budget`` seconds. The markdown table is rewritten after every row (so a run cut
short still leaves its rows in ``--out``) and printed at the end, with a CSV (same name, ``.csv``)
and a plot (``.png``, when matplotlib is installed) beside it.

Without a CUDA device it prints "no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import inspect
import math
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

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
    out_features: int, in_features: int, scheme: Scheme, device: torch.device, dtype: torch.dtype = torch.float16
) -> tuple[AqlmWeight, Tensor, Tensor]:
    """A random AQLM weight (``aqlm_lora.scheme.random_weight``) and LoRA factors of rank 16, in ``dtype``.

    One generator, seeded from (shape, scheme), draws the weight and then the factors."""
    from aqlm_lora.scheme import random_weight

    g = torch.Generator().manual_seed(zlib.crc32(f"{out_features}x{in_features}-{scheme}".encode()))
    weight = random_weight(scheme, out_features, in_features, dtype, device, generator=g)
    lora_A = torch.randn(LORA_RANK, in_features, generator=g) / math.sqrt(in_features)
    lora_B = torch.randn(out_features, LORA_RANK, generator=g) * (0.1 / math.sqrt(LORA_RANK))
    return weight, lora_A.to(device=device, dtype=dtype), lora_B.to(device=device, dtype=dtype)


def scheme_title(scheme: Scheme) -> str:
    """``2x8 g8``, ``2x8 g8 o2``: the groups spelled out, as the table shows them."""
    text = f"{scheme.num_codebooks}x{scheme.nbits} g{scheme.in_group_size}"
    return text + (f" o{scheme.out_group_size}" if scheme.out_group_size != 1 else "")


Timed = tuple[float, str]  # (microseconds per call, mark: "" | "*" host-bound | "e" eager fallback)


def elapsed_ms(start: torch.cuda.Event, end: torch.cuda.Event, body: Callable[[], object]) -> float:
    """Milliseconds of GPU time between CUDA events recorded around ``body()`` (waits for the end)."""
    start.record()
    body()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_eager_us(fn: Callable[[], object], budget_s: float) -> Timed:
    """Median time of one ``fn()`` call in microseconds (CUDA events around blocks of calls), marked
    ``*`` when host-bound (issuing a block took the CPU >= 80% of its GPU time)."""
    fn()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    one_ms = max(elapsed_ms(start, end, fn), 1e-3)
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
    return gpu_ms * 1e3, "*" if statistics.median(host) >= 0.8 * gpu_ms else ""


def time_graph_us(fn: Callable[[], object], budget_s: float) -> Timed:
    """Median GPU time of one ``fn()`` in microseconds: ``k`` calls captured in a CUDA graph, the
    graph replayed between CUDA events. Falls back to eager timing (mark ``e``) if capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    eager_ms = max(elapsed_ms(start, end, fn), 1e-3)  # an upper bound on one call's GPU time
    k = max(1, min(100, int(1.0 / eager_ms)))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(k):
                fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - any capture failure: time it eagerly instead
        log(f"graph capture failed ({first_line(err)}); timing eagerly")
        del graph
        torch.cuda.synchronize()
        return time_eager_us(fn, budget_s)[0], "e"
    replay_ms = max(elapsed_ms(start, end, graph.replay), 1e-3)
    replays = max(5, min(50, int(budget_s * 1e3 / replay_ms)))
    times = [elapsed_ms(start, end, graph.replay) / k for _ in range(replays)]
    del graph
    return statistics.median(times) * 1e3, ""


TIMERS = {"graph": time_graph_us, "eager": time_eager_us}


def fmt_time(timed: Optional[Timed]) -> str:
    return "n/a" if timed is None else fmt_us(timed[0]) + timed[1]


def us(timed: Optional[Timed]) -> Optional[float]:
    return None if timed is None else timed[0]


def make_aqlm_layer(weight: AqlmWeight):
    """A frozen ``aqlm.QuantizedLinear`` (the weight's dtype) holding its own clone of ``weight``'s codes."""
    import aqlm

    scheme = weight.scheme
    layer = aqlm.QuantizedLinear(
        weight.in_features,
        weight.out_features,
        **scheme.aqlm_kwargs(),
        bias=False,
        device=weight.codes.device,
        dtype=weight.codebooks.dtype,
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
    "dq+mm us",
    "ours/dq+mm",
    "err ours / dense",
    "+LoRA us",
    "LoRA overhead",
    "aqlm us",
    "ours/aqlm",
    "train ours us",
    "train dense us",
    "train ours/dense",
]


@dataclass
class Row:
    """One shape, scheme and token count: every contender's time (None where not run)."""

    shape: str
    scheme: str
    n: int
    dense: Optional[Timed]
    ours: Optional[Timed]
    dq_mm: Optional[Timed]
    err_ours: float
    err_dense: float
    lora: Optional[Timed]
    aqlm: Optional[Timed]
    train: Optional[Timed]
    train_dense: Optional[Timed]

    def cells(self) -> list[str]:
        return [
            self.shape,
            self.scheme,
            str(self.n),
            fmt_time(self.dense),
            fmt_time(self.ours),
            fmt_ratio(us(self.ours), us(self.dense)),
            fmt_time(self.dq_mm),
            fmt_ratio(us(self.ours), us(self.dq_mm)),
            f"{self.err_ours:.1e} / {self.err_dense:.1e}",
            fmt_time(self.lora),
            fmt_overhead(us(self.lora), us(self.ours)),
            fmt_time(self.aqlm),
            fmt_ratio(us(self.ours), us(self.aqlm)),
            fmt_time(self.train),
            fmt_time(self.train_dense),
            fmt_ratio(us(self.train), us(self.train_dense)),
        ]


@dataclass
class TrainRow:
    """One bf16 training step (forward + backward) of ours and of dense PEFT LoRA."""

    shape: str
    scheme: str
    n: int
    impl: str  # what ran as "ours"
    ours: Timed
    dense: Timed
    ours_peak: int  # bytes
    dense_peak: int


TRAIN_HEADER = [
    "shape",
    "scheme",
    "N",
    "ours",
    "ours us",
    "PEFT dense us",
    "time ours/dense",
    "ours peak MiB",
    "PEFT dense peak MiB",
    "peak ours/dense",
]


def train_cells(t: TrainRow) -> list[str]:
    mib = 2.0**20
    return [
        t.shape,
        t.scheme,
        str(t.n),
        t.impl,
        fmt_time(t.ours),
        fmt_time(t.dense),
        fmt_ratio(t.ours[0], t.dense[0]),
        f"{t.ours_peak / mib:,.1f}",
        f"{t.dense_peak / mib:,.1f}",
        fmt_ratio(t.ours_peak, t.dense_peak),
    ]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def render(
    rows: list[Row], meta: list[str], notes: list[str], train: Sequence[TrainRow] = (), verdicts: Sequence[str] = ()
) -> str:
    lines = ["# aqlm_lora CUDA benchmark (fp16)", ""]
    lines += [f"- {m}" for m in meta]
    lines += [""] + table(HEADER, [r.cells() for r in rows])
    if train:
        lines += ["", f"## Training step, bf16, N = {train[0].n}, LoRA r = {LORA_RANK}", ""]
        lines += table(TRAIN_HEADER, [train_cells(t) for t in train])
    if verdicts:
        lines += ["", "## Targets", ""] + [f"- {v}" for v in verdicts]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
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
    timer: Callable[[Callable[[], object], float], Timed] = time_graph_us,
) -> Row:
    """Every contender for N tokens on one weight (the train columns always eager)."""
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

        t_dense = timer(lambda: F.linear(x, dense_w), budget)
        t_ours = timer(lambda: ops.aqlm_gemm(x, codes, codebooks, scales, None), budget)
        t_dq_mm = timer(lambda: F.linear(x, ops.dequantize(codes, codebooks, scales)), budget)
        t_lora = timer(
            lambda: ops.lora_forward(x, codes, codebooks, scales, None, lora_A, lora_B, None, LORA_SCALING, 0.0, 0, 0),
            budget,
        )
        t_aqlm = None
        if aqlm_layer is not None:
            try:
                t_aqlm = timer(lambda: aqlm_layer(x), budget)
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

    return Row(
        f"{out_features}x{in_features}",
        scheme_title(weight.scheme),
        n,
        t_dense,
        t_ours,
        t_dq_mm,
        err_ours,
        err_dense,
        t_lora,
        t_aqlm,
        time_eager_us(step_ours, budget),
        time_eager_us(step_dense, budget),
    )


def peak_bytes(build: Callable[[], Callable[[], None]], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` over ``build()`` and one call of the step it returns,
    above what was allocated before."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step = build()
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del step
    gc.collect()
    return peak


def measure_training(
    ops,
    out_features: int,
    in_features: int,
    scheme: Scheme,
    n: int,
    budget: float,
    notes: list[str],
    device: Optional[torch.device] = None,
) -> TrainRow:
    """bf16 forward + backward (grads for x, lora_A, lora_B): our layer vs PEFT's dense LoRA layer."""
    device = device or torch.device("cuda")
    bf16 = dict(device=device, dtype=torch.bfloat16)
    weight, lora_A, lora_B = make_weight(out_features, in_features, scheme, device, torch.bfloat16)
    with torch.no_grad():
        dense_w = ops.dequantize(*weight.args())
    x = torch.randn(n, in_features, **bf16).requires_grad_(True)
    gy = torch.randn(n, out_features, **bf16)
    alpha = LORA_SCALING * LORA_RANK

    try:
        import aqlm  # noqa: F401
        import peft  # noqa: F401

        from aqlm_lora import AqlmLoraLinear

        impl = "AqlmLoraLinear"
    except Exception as err:  # noqa: BLE001 - fall back to the functional op
        impl = "ops.aqlm_lora_linear"
        notes.append(f"training: our layer unavailable ({first_line(err)}); timed the functional op")

    def build_ours() -> Callable[[], None]:
        if impl == "AqlmLoraLinear":
            layer = AqlmLoraLinear(make_aqlm_layer(weight), "default", r=LORA_RANK, lora_alpha=alpha)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(lora_A)
                layer.lora_B["default"].weight.copy_(lora_B)
            layer.to(device=device, dtype=torch.bfloat16)

            def step() -> None:
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(gy)

            return step
        codes = weight.codes.clone()
        a, b = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)

        def step() -> None:
            x.grad = a.grad = b.grad = None
            ops.aqlm_lora_linear(x, codes, weight.codebooks, weight.scales, None, a, b, LORA_SCALING).backward(gy)

        return step

    def build_dense() -> Callable[[], None]:
        base = torch.nn.Linear(in_features, out_features, bias=False, **bf16)
        with torch.no_grad():
            base.weight.copy_(dense_w)
        base.requires_grad_(False)
        try:
            from peft import LoraConfig
            from peft.tuners.lora import Linear as PeftLoraLinear

            kwargs = dict(r=LORA_RANK, lora_alpha=alpha)
            if "config" in inspect.signature(PeftLoraLinear.__init__).parameters:  # PEFT >= 0.19 wants one
                kwargs["config"] = LoraConfig(**kwargs)
            layer = PeftLoraLinear(base, "default", **kwargs)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(lora_A)
                layer.lora_B["default"].weight.copy_(lora_B)
            layer.to(device=device, dtype=torch.bfloat16)
        except ImportError:
            a, b = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)

            def layer(inp: Tensor) -> Tensor:
                return base(inp) + LORA_SCALING * ((inp @ a.t()) @ b.t())

        def step() -> None:
            x.grad = None
            if isinstance(layer, torch.nn.Module):
                layer.zero_grad(set_to_none=True)
            layer(x).backward(gy)

        return step

    x.grad = None  # neither measurement may start with (and then free) the other's gradient
    ours_peak = peak_bytes(build_ours, device)
    x.grad = None
    dense_peak = peak_bytes(build_dense, device)
    t_ours = time_eager_us(build_ours(), budget)
    t_dense = time_eager_us(build_dense(), budget)
    return TrainRow(
        f"{out_features}x{in_features}", scheme_title(scheme), n, impl, t_ours, t_dense, ours_peak, dense_peak
    )


DECODE_MAX_ROWS = 2  # csrc/cuda/kernels.cuh kDecodeMaxRows: "ours" runs the decode kernels up to this N


def verdict(name: str, checks: list[tuple[str, Optional[float]]], limit: float, unit: str = "x") -> str:
    """One target as ``PASS|FAIL|n/a name: k/m pass; worst <case> <value>``; ``checks`` are (case, value)
    pairs, a value passing when <= limit."""
    measured = [(case, v) for case, v in checks if v is not None]
    if not measured:
        return f"n/a {name}: not measured"
    passed = sum(v <= limit for _, v in measured)
    case, worst = max(measured, key=lambda cv: cv[1])
    shown = f"{worst:.2f}x" if unit == "x" else f"{100 * (worst - 1):+.1f}%"
    status = "PASS" if passed == len(measured) else "FAIL"
    return f"{status} {name}: {passed}/{len(measured)} pass; worst {case}: {shown}"


def ratio(num: Optional[Timed], den: Optional[Timed]) -> Optional[float]:
    return None if num is None or den is None or den[0] <= 0 else num[0] / den[0]


def verdicts(rows: list[Row], train: Sequence[TrainRow]) -> list[str]:
    def case(r: Row) -> str:
        return f"{r.shape} {r.scheme} N={r.n}"

    one = [r for r in rows if r.n == 1]
    lines = [
        verdict("decode N=1, ours <= 0.8x aqlm's CUDA kernel", [(case(r), ratio(r.ours, r.aqlm)) for r in one], 0.8),
        verdict(
            "decode N=1, 2x8 ours <= 1.0x fp16 cuBLAS",
            [(case(r), ratio(r.ours, r.dense)) for r in one if r.scheme.startswith("2x8")],
            1.0,
        ),
        verdict(
            "N <= 64, no cliff: ours <= 1.1x min(dequantize + cuBLAS, ours)",
            [(case(r), ratio(r.ours, r.dq_mm)) for r in rows if r.n <= 64],
            1.1,
        ),
        verdict(
            "prefill N >= 1024, ours <= 1.1x fp16 cuBLAS",
            [(case(r), ratio(r.ours, r.dense)) for r in rows if r.n >= 1024],
            1.1,
        ),
        verdict("LoRA r=16 overhead at N=1 <= +10%", [(case(r), ratio(r.lora, r.ours)) for r in one], 1.10, unit="%"),
        verdict(
            "LoRA r=16 overhead at N >= 256 <= +5%",
            [(case(r), ratio(r.lora, r.ours)) for r in rows if r.n >= 256],
            1.05,
            unit="%",
        ),
    ]
    if train:
        tcase = [f"{t.shape} {t.scheme}" for t in train]
        lines.append(
            verdict(
                f"training step N={train[0].n} bf16, time <= 1.3x dense PEFT LoRA",
                [(c, t.ours[0] / t.dense[0]) for c, t in zip(tcase, train)],
                1.3,
            )
        )
        lines.append(
            verdict(
                f"training step N={train[0].n} bf16, peak memory <= 0.5x dense PEFT LoRA",
                [(c, t.ours_peak / max(t.dense_peak, 1)) for c, t in zip(tcase, train)],
                0.5,
            )
        )
    return lines


def thresholds(rows: list[Row]) -> list[str]:
    """Per shape and scheme: the largest N the decode kernels beat dequantize + cuBLAS at, and the
    smallest N where they lose (rows up to DECODE_MAX_ROWS, where "ours" is the decode kernels)."""
    out = []
    keys = dict.fromkeys((r.shape, r.scheme) for r in rows)
    for shape, scheme in keys:
        decode = [r for r in rows if (r.shape, r.scheme) == (shape, scheme) and r.n <= DECODE_MAX_ROWS]
        wins = [r.n for r in decode if r.ours and r.dq_mm and r.ours[0] <= r.dq_mm[0]]
        losses = [r.n for r in decode if r.ours and r.dq_mm and r.ours[0] > r.dq_mm[0]]
        out.append(
            f"decode/prefill threshold {shape} {scheme}: decode kernels faster at N in {wins or 'none'}, "
            f"dequantize + cuBLAS faster at N in {losses or 'none'}"
        )
    return out


CSV_FIELDS = [
    "shape",
    "scheme",
    "n",
    "dense_us",
    "ours_us",
    "dq_mm_us",
    "err_ours",
    "err_dense",
    "lora_us",
    "aqlm_us",
    "train_ours_us",
    "train_dense_us",
    "marks",
]


def write_csv(path: Path, rows: list[Row], train: Sequence[TrainRow]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in rows:
            timed = (r.dense, r.ours, r.dq_mm)
            rest = (r.lora, r.aqlm, r.train, r.train_dense)
            marks = "".join(t[1] or "." if t else "-" for t in timed + rest)
            w.writerow(
                [
                    r.shape,
                    r.scheme,
                    r.n,
                    *(us(t) for t in timed),
                    r.err_ours,
                    r.err_dense,
                    *(us(t) for t in rest),
                    marks,
                ]
            )
        if train:
            w.writerow([])
            w.writerow(
                ["train_shape", "scheme", "n", "impl", "ours_us", "dense_us", "ours_peak_bytes", "dense_peak_bytes"]
            )
            for t in train:
                w.writerow([t.shape, t.scheme, t.n, t.impl, t.ours[0], t.dense[0], t.ours_peak, t.dense_peak])


def write_plot(path: Path, rows: list[Row]) -> Optional[str]:
    """ours / dense and ours / dq+mm against N, one line per shape and scheme; the reason if not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"no plot: {first_line(err)}"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for shape, scheme in dict.fromkeys((r.shape, r.scheme) for r in rows):
        sel = [r for r in rows if (r.shape, r.scheme) == (shape, scheme)]
        ns = [r.n for r in sel]
        axes[0].plot(ns, [ratio(r.ours, r.dense) for r in sel], marker="o", label=f"{shape} {scheme}")
        axes[1].plot(ns, [ratio(r.ours, r.dq_mm) for r in sel], marker="o", label=f"{shape} {scheme}")
    for ax, title in zip(axes, ("ours / dense fp16 cuBLAS", "ours / (dequantize + cuBLAS)")):
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("tokens N")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results" / "bench_cuda.md"), help="markdown file to write")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,8192x28672", help="comma-separated OUTxIN")
    p.add_argument("--schemes", default="1x16,2x8", help="comma-separated schemes CxB[g<in>][o<out>]")
    p.add_argument("--tokens", default="1,2,3,4,6,8,12,16,32,64,256,1024,4096", help="comma-separated token counts N")
    p.add_argument("--budget", type=float, default=0.3, help="seconds of timing per cell")
    p.add_argument("--timing", choices=sorted(TIMERS), default="graph", help="CUDA-graph replays or eager calls")
    p.add_argument("--no-aqlm", action="store_true", help="skip the aqlm.QuantizedLinear column")
    p.add_argument("--train-tokens", type=int, default=2048, help="N of the bf16 training table (0: skip it)")
    p.add_argument("--train-shapes", default=None, help="shapes of the training table (default: --shapes)")
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
        f"times: median microseconds per call, {args.timing} timing (see the script's docstring), ~{args.budget:g} s "
        f"per cell; LoRA r = {LORA_RANK}; e = graph capture failed, timed eagerly; * = host-bound eager time "
        "(issuing the calls took >= 80% of the GPU time); the train columns are eager",
        f"ours: the decode kernels for N <= {DECODE_MAX_ROWS}, dequantized tiles + cuBLAS above "
        "(csrc/cuda/decode.cu choose_kernel)",
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

    timer = TIMERS[args.timing]
    rows: list[Row] = []
    train: list[TrainRow] = []
    csv_path, png_path = out_path.with_suffix(".csv"), out_path.with_suffix(".png")
    for out_features, in_features in shapes:
        for scheme in schemes:
            weight, lora_A, lora_B = make_weight(out_features, in_features, scheme, device)
            with torch.no_grad():
                dense_w = ops.dequantize(*weight.args())  # [out, in] fp16
            aqlm_layer = make_aqlm_layer(weight) if aqlm_reason is None else None
            for n in tokens:
                label = f"{out_features}x{in_features} {scheme} N={n}"
                log(label)
                try:
                    rows.append(
                        measure_row(
                            ops, weight, (lora_A, lora_B), dense_w, aqlm_layer, n, args.budget, label, notes, timer
                        )
                    )
                except Exception as err:  # noqa: BLE001 - one failed row must not lose the table
                    notes.append(f"{label} failed: {first_line(err)}")
                    log(notes[-1])
                out_path.write_text(render(rows, meta, notes))
                write_csv(csv_path, rows, train)  # a run stopped at a time cap keeps its rows
            del weight, dense_w, aqlm_layer
            torch.cuda.empty_cache()

    if args.train_tokens > 0:
        train_shapes = [parse_shape(s) for s in args.train_shapes.split(",")] if args.train_shapes else shapes
        for out_features, in_features in train_shapes:
            for scheme in schemes:
                log(f"train {out_features}x{in_features} {scheme} N={args.train_tokens} bf16")
                try:
                    train.append(
                        measure_training(ops, out_features, in_features, scheme, args.train_tokens, args.budget, notes)
                    )
                except Exception as err:  # noqa: BLE001 - one failed training row must not lose the table
                    notes.append(f"training {out_features}x{in_features} {scheme} failed: {first_line(err)}")
                torch.cuda.empty_cache()
                out_path.write_text(render(rows, meta, notes, train))
                write_csv(csv_path, rows, train)

    checks = verdicts(rows, train) + thresholds(rows)
    write_csv(csv_path, rows, train)
    plot_note = write_plot(png_path, rows)
    if plot_note:
        notes.append(plot_note)
    text = render(rows, meta, notes, train, checks)
    out_path.write_text(text)
    print(text)
    log(f"wrote {out_path}, {csv_path}" + ("" if plot_note else f", {png_path}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
