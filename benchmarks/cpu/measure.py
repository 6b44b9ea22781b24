"""Shared helpers for the CPU benchmarks: deterministic AQLM weights, timing, peak memory, machine info.

Weights are generated from a seed derived from (shape, scheme) only, so a subprocess that rebuilds
them (to import numba with another ``NUMBA_NUM_THREADS``) gets bit-identical tensors; ``fingerprint``
lets the caller check that.
"""

from __future__ import annotations

import datetime
import math
import platform
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LORA_RANK = 16
LORA_ALPHA = 32  # scaling = alpha / r = 2: a scaling != 1 so a missing factor shows in the error columns


@dataclass(frozen=True)
class Scheme:
    """An AQLM scheme with ``in_group = 8``, ``out_group = 1``."""

    num_codebooks: int
    nbits: int
    in_group: int = 8

    @property
    def id(self) -> str:
        return f"{self.num_codebooks}x{self.nbits}"

    @classmethod
    def parse(cls, text: str) -> Scheme:
        num_codebooks, nbits = text.lower().split("x")
        return cls(int(num_codebooks), int(nbits))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Weights:
    """One layer's AQLM tensors (codebooks/scales in float32) plus LoRA factors, and its fp32 dense weight."""

    out_features: int
    in_features: int
    scheme: Scheme
    codes: Tensor  # [out, in/8, C] int8/int16
    codebooks: Tensor  # [C, 2**nbits, 1, 8] fp32
    scales: Tensor  # [out, 1, 1, 1] fp32
    lora_A: Tensor  # [r, in] fp32
    lora_B: Tensor  # [out, r] fp32

    @property
    def scaling(self) -> float:
        return LORA_ALPHA / LORA_RANK

    def codebooks_as(self, dtype: torch.dtype) -> Tensor:
        return self.codebooks.to(dtype)

    def scales_as(self, dtype: torch.dtype) -> Tensor:
        return self.scales.to(dtype)

    def dense(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight computed in fp32 from the ``dtype``-rounded codebooks/scales (aqlm's oracle)."""
        from aqlm.utils import _dequantize_weight, unpack_int_data

        codebooks = self.codebooks_as(dtype).float()
        scales = self.scales_as(dtype).float()
        return _dequantize_weight(unpack_int_data(self.codes, self.scheme.nbits), codebooks, scales)

    def fingerprint(self) -> str:
        codes = self.codes.to(torch.int64)
        parts = [codes.sum(), (codes * codes).sum(), self.codebooks.double().sum(), self.scales.double().sum()]
        parts += [self.lora_A.double().sum(), self.lora_B.double().sum()]
        return ",".join(f"{float(p):.10g}" for p in parts)


def make_weights(out_features: int, in_features: int, scheme: Scheme) -> Weights:
    """Codes uniform over the whole int8/int16 range, codebooks randn/sqrt(8), scales rand+0.5, LoRA randn."""
    seed = zlib.crc32(f"{out_features}x{in_features}-{scheme.id}".encode())
    g = torch.Generator().manual_seed(seed)
    code_dtype = torch.int8 if scheme.nbits <= 8 else torch.int16
    info = torch.iinfo(code_dtype)
    num_in = in_features // scheme.in_group
    codes = torch.randint(info.min, info.max + 1, (out_features, num_in, scheme.num_codebooks), generator=g)
    codebooks = torch.randn(scheme.num_codebooks, 2**scheme.nbits, 1, scheme.in_group, generator=g)
    codebooks /= math.sqrt(scheme.in_group)
    scales = torch.rand(out_features, 1, 1, 1, generator=g) + 0.5
    lora_A = torch.randn(LORA_RANK, in_features, generator=g) / math.sqrt(in_features)
    lora_B = torch.randn(out_features, LORA_RANK, generator=g) * (0.1 / math.sqrt(LORA_RANK))
    return Weights(out_features, in_features, scheme, codes.to(code_dtype), codebooks, scales, lora_A, lora_B)


def make_input(n: int, in_features: int, dtype: torch.dtype, seed: int = 1234) -> Tensor:
    g = torch.Generator().manual_seed(seed + n)
    return torch.randn(n, in_features, generator=g).to(dtype)


def make_aqlm_layer(w: Weights, dtype: torch.dtype):
    """An ``aqlm.QuantizedLinear`` holding its own clone of the codes (aqlm permutes them in place on CPU)."""
    import aqlm

    layer = aqlm.QuantizedLinear(
        w.in_features,
        w.out_features,
        in_group_size=w.scheme.in_group,
        out_group_size=1,
        num_codebooks=w.scheme.num_codebooks,
        nbits_per_codebook=w.scheme.nbits,
        bias=False,
        dtype=dtype,
    )
    with torch.no_grad():
        layer.codes.data = w.codes.clone()
        layer.codebooks.copy_(w.codebooks)
        layer.scales.copy_(w.scales)
    return layer


def set_lora_weights(layer, w: Weights, requires_grad: bool) -> None:
    """Copy ``w``'s LoRA factors into a PEFT LoraLayer's ``default`` adapter (keeping the layer's dtypes)."""
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(w.lora_A)
        layer.lora_B["default"].weight.copy_(w.lora_B)
    layer.lora_A["default"].weight.requires_grad_(requires_grad)
    layer.lora_B["default"].weight.requires_grad_(requires_grad)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0)


def reference(w: Weights, dense_fp32: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(base, base + LoRA) outputs in fp32: ``F.linear`` on the dequantized weight."""
    xf = x.float()
    base = F.linear(xf, dense_fp32)
    return base, base + w.scaling * ((xf @ w.lora_A.T) @ w.lora_B.T)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|, in fp32."""
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16"]
                    return " ".join(flag for flag in wanted if flag in flags)
    except OSError:
        pass
    return ""


def machine_info(threads: int) -> dict[str, str]:
    import os

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


def load_average() -> str:
    """Other processes' load: on a shared machine, read the times with it in mind."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def fmt_err(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1e}"


def fmt_bytes(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"
