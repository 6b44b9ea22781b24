"""Measuring for the CPU benchmarks: deterministic weights and layers, references, timing, peak memory, machine info.

Weights are drawn from a generator seeded by (shape, scheme) only, so a subprocess that rebuilds
them (to import numba with another ``NUMBA_NUM_THREADS``) gets bit-identical tensors; ``fingerprint``
lets the caller check that.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from aqlm_lora.scheme import AqlmWeight, Scheme, random_weight

LORA_RANK = 16
LORA_ALPHA = 32  # scaling = alpha / r = 2: a scaling != 1 so a missing factor shows in the error columns
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def first_sentence(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    sentence = re.split(r"(?<=[^.]\.)\s", line, maxsplit=1)[0]  # not at an ellipsis ("out=... arguments")
    return f"{type(err).__name__}: {sentence}"


def shape_id(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# ---------------------------------------------------------------------------------------------
# Weights, inputs, layers


@dataclass
class Weights:
    """One layer's AQLM weight (codebooks/scales in float32) and its LoRA factors (float32)."""

    base: AqlmWeight
    lora_A: Tensor  # [r, in]
    lora_B: Tensor  # [out, r]

    @property
    def scheme(self) -> Scheme:
        return self.base.scheme

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def scaling(self) -> float:
        return LORA_ALPHA / LORA_RANK

    def args_as(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, codebooks, scales)`` with codebooks and scales rounded to ``dtype``."""
        return self.base.codes, self.base.codebooks.to(dtype), self.base.scales.to(dtype)

    def dense(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight computed in fp32 from the ``dtype``-rounded codebooks/scales (aqlm's oracle)."""
        from aqlm.utils import _dequantize_weight, unpack_int_data

        codes, codebooks, scales = self.args_as(dtype)
        return _dequantize_weight(unpack_int_data(codes, self.scheme.nbits), codebooks.float(), scales.float())

    def fingerprint(self) -> str:
        codes, codebooks, scales = self.base.codes.to(torch.int64), self.base.codebooks, self.base.scales
        parts = [codes.sum(), (codes * codes).sum(), codebooks.double().sum(), scales.double().sum()]
        parts += [self.lora_A.double().sum(), self.lora_B.double().sum()]
        return ",".join(f"{float(p):.10g}" for p in parts)


def make_weights(out_features: int, in_features: int, scheme: Scheme) -> Weights:
    """``random_weight`` of the scheme, then LoRA factors (A randn/sqrt(in), B small), from one seeded generator."""
    seed = zlib.crc32(f"{out_features}x{in_features}-{scheme}".encode())
    g = torch.Generator().manual_seed(seed)
    base = random_weight(scheme, out_features, in_features, generator=g)
    lora_A = torch.randn(LORA_RANK, in_features, generator=g) / math.sqrt(in_features)
    lora_B = torch.randn(out_features, LORA_RANK, generator=g) * (0.1 / math.sqrt(LORA_RANK))
    return Weights(base, lora_A, lora_B)


def make_input(n: int, in_features: int, dtype: torch.dtype, seed: int = 1234) -> Tensor:
    g = torch.Generator().manual_seed(seed + n)
    return torch.randn(n, in_features, generator=g).to(dtype)


def make_aqlm_layer(weight: AqlmWeight, dtype: torch.dtype):
    """An ``aqlm.QuantizedLinear`` holding its own clone of the codes (aqlm permutes them in place on CPU)."""
    import aqlm

    scheme = weight.scheme
    layer = aqlm.QuantizedLinear(
        weight.in_features,
        weight.out_features,
        **scheme.aqlm_kwargs(),
        bias=False,
        dtype=dtype,
    )
    with torch.no_grad():
        layer.codes.data = weight.codes.clone()
        layer.codebooks.copy_(weight.codebooks)
        layer.scales.copy_(weight.scales)
    return layer


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0)


def set_lora_weights(layer, w: Weights, requires_grad: bool) -> None:
    """Copy ``w``'s LoRA factors into a PEFT LoraLayer's ``default`` adapter (keeping the layer's dtypes)."""
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
    layer.lora_A["default"].weight.requires_grad_(requires_grad)
    layer.lora_B["default"].weight.requires_grad_(requires_grad)


def lora_layer(layer_class, base, w: Weights, requires_grad: bool):
    """A PEFT-style LoRA layer of ``layer_class`` on ``base`` with ``w``'s factors in its default adapter."""
    layer = layer_class(base, "default", config=lora_config(), r=LORA_RANK, lora_alpha=LORA_ALPHA)
    set_lora_weights(layer, w, requires_grad)
    return layer


def dense_peft_layer(dense: Tensor, w: Weights, requires_grad: bool):
    """PEFT's dense ``lora.Linear`` on an ``nn.Linear`` holding ``dense`` (frozen)."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(w.in_features, w.out_features, bias=False, dtype=dense.dtype)
    with torch.no_grad():
        base.weight.copy_(dense)
    base.weight.requires_grad_(False)
    return lora_layer(PeftLinear, base, w, requires_grad)


# ---------------------------------------------------------------------------------------------
# References and training steps


def reference(w: Weights, dense_fp32: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(base, base + LoRA) outputs in fp32: ``F.linear`` on the dequantized weight."""
    xf = x.float()
    base = F.linear(xf, dense_fp32)
    return base, base + w.scaling * ((xf @ w.lora_A.T) @ w.lora_B.T)


def ref_grads(w: Weights, dense_fp32: Tensor, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) of ``sum(g * (x W^T + s (x A^T) B^T))`` in fp32."""
    gb = g @ w.lora_B
    return g @ dense_fp32 + w.scaling * gb @ w.lora_A, w.scaling * gb.T @ x, w.scaling * g.T @ (x @ w.lora_A.T)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|, in fp32."""
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def training_step(layer, x: Tensor, g: Tensor):
    """(timed, clear_grads, step, grads) for a LoRA layer whose default adapter trains."""
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    def clear():
        for t in params:
            t.grad = None

    def step():
        y = layer(x)
        y.backward(g)

    def timed():
        clear()
        step()

    return timed, clear, step, lambda: [t.grad for t in params]


# ---------------------------------------------------------------------------------------------
# Timing and memory


def time_ms(fn: Callable[[], object], min_run_time: float, threads: int) -> tuple[float, float]:
    """(median, IQR) in ms of ``fn()`` over ``torch.utils.benchmark`` blocked_autorange."""
    from torch.utils.benchmark import Timer

    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3


def time_interleaved(
    fns: dict[str, Callable[[], object]], min_run_time: float, threads: int, rounds: int = 3
) -> dict[str, tuple[float, float, float]]:
    """{name: (median, IQR, min) in ms}: ``rounds`` rounds that each time every fn in turn, times pooled.

    Interleaving spreads a burst of load from other processes over all columns instead of
    one, so the ratios between columns are steadier on a shared machine.
    """
    from torch.utils.benchmark import Timer

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
                min_run_time=min_run_time / rounds
            )
            times[name] += m.times
    out = {}
    for name, values in times.items():
        t = torch.tensor(values, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)) * 1e3
        out[name] = (float(q[1]), float(q[2] - q[0]), float(t.min()) * 1e3)
    return out


def peak_memory_bytes(step: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator during one ``step()``.

    Read from ``torch.profiler`` memory events (``profile_memory=True``): every allocation and free
    in time order, running sum, maximum. Tensors alive before the step are the baseline (not
    counted); memory that kernels take outside torch's allocator (``std::vector`` scratch in C++,
    numpy arrays inside numba) is not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


# ---------------------------------------------------------------------------------------------
# Machine


def _cpuinfo_line(prefix: str) -> str:
    """The value of the first ``/proc/cpuinfo`` line starting with ``prefix`` ("" when there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo_line("model name") or platform.processor() or "unknown"


def cpu_flags() -> str:
    flags = set(_cpuinfo_line("flags").split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16"]
    return " ".join(flag for flag in wanted if flag in flags)


def load_average() -> str:
    """Other processes' load: on a shared machine, read the times with it in mind."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def machine_info(threads: int) -> dict[str, str]:
    return {
        "cpu": cpu_model(),
        "cpu flags": cpu_flags(),
        "logical CPUs": str(os.cpu_count()),
        "torch threads": str(threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load average (1/5/15 min) at start": load_average(),
    }
