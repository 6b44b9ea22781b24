"""The benchmark's outputs: the markdown report (also printed), the CSV (one row per measurement) and the plot.

Rows come from ``measure_ours`` (our kernels, dense baselines) with the stock aqlm/PEFT cells of
``stock_worker`` merged in; targets from ``targets.targets``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Optional

from measure import LORA_ALPHA, LORA_RANK, shape_id
from stock_worker import ERR_CALLS_THREADED
from targets import cell_ms, find

from aqlm_lora.scheme import Scheme, parse_scheme


def fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def fmt_err(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1e}"


def fmt_bytes(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def uses_numba(row: dict) -> bool:
    """aqlm's CPU forward runs numba for 8-bit codes only (others: dequantize + ``F.linear``)."""
    return parse_scheme(row["scheme"]).nbits == 8


def scheme_title(scheme: Scheme) -> str:
    """``2x8 g8``, ``2x8 g8 o2``: the groups spelled out, for titles."""
    text = f"{scheme.num_codebooks}x{scheme.nbits} g{scheme.in_group_size}"
    return text + (f" o{scheme.out_group_size}" if scheme.out_group_size != 1 else "")


class Notes:
    """Error messages as numbered footnotes, so table cells stay short."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def __call__(self, text: Optional[str]) -> str:
        if not text or not text.startswith("error"):
            return text or "-"
        message = text.removeprefix("error: ")
        if message not in self.items:
            self.items.append(message)
        return f"error [{self.items.index(message) + 1}]"

    def render(self) -> str:
        return "\n".join(f"[{i}] {m.replace('`', '')}  " for i, m in enumerate(self.items, 1))


def stock_text(cell: Any, notes: Notes, with_err: bool = False) -> str:
    if cell is None:
        return "-"
    if "ms" in cell:
        text = fmt_ms(cell["ms"])
        return f"{text} (err {fmt_err(cell.get('err'))})" if with_err else text
    return notes(cell["status"])


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def markdown(
    args: argparse.Namespace,
    info: dict[str, str],
    rows: list[dict],
    train_rows: list[dict],
    target_rows: list[dict[str, str]],
    numba_default: Optional[int],
) -> str:
    """The whole report: machine, targets, the inference table and the training table, errors as footnotes."""
    mode = "quick" if args.quick else "full"
    notes = Notes()
    parts = [
        "# aqlm_lora CPU benchmark: one AQLM linear layer (`benchmarks/cpu/bench_linear.py`)",
        "",
        f"Mode: **{mode}**; command: `{' '.join(['benchmarks/cpu/bench_linear.py', *sys.argv[1:]])}`; "
        f"Timer min_run_time {args.min_run_time} s; times are medians in ms"
        " (the CSV also has IQR and, for our/dense columns, the fastest run). On a machine shared with other"
        " jobs (see the load average) the times are noisy; compare columns of one row, measured interleaved.",
        "",
        md_table(["machine", ""], [[k, v] for k, v in info.items()]),
        "",
        '## Targets (the performance targets the README lists under "Benchmarks")',
        "",
        md_table(
            ["target", "limit", "measured", "result"],
            [[t["target"], t["limit"], t["measured"], t["result"]] for t in target_rows],
        ),
        "",
        "## Inference, median ms",
        "",
        f"LoRA r={LORA_RANK}, alpha={LORA_ALPHA}. *ours* = `aqlm_lora.ops.aqlm_gemm` / `aqlm_lora_linear`"
        " (no_grad). *PEFT stock* = `peft.tuners.lora.aqlm.AqlmLoraLinear`, *aqlm* = `aqlm.QuantizedLinear`,"
        " both with `NUMBA_NUM_THREADS=1`. *aqlm numba default threads* "
        f"(= {numba_default if numba_default is not None else '?'} threads): **WRONG RESULTS** (numba `prange` race"
        " in aqlm's 2x8 LUT kernel, it shows in some calls only; 1x16 does not use numba); worst error of up to"
        f" {ERR_CALLS_THREADED} calls in brackets. *dense* = `F.linear` and PEFT"
        " `lora.Linear` on the dequantized weight in the row's dtype. err = max|out - ref| / max|ref| against"
        " fp32 `F.linear` on aqlm's `_dequantize_weight` (+ LoRA).",
        "",
    ]
    header = [
        "shape",
        "scheme",
        "dtype",
        "N",
        "ours base",
        "ours + LoRA",
        "PEFT stock",
        "aqlm",
        "aqlm numba default thr (WRONG)",
        "dense F.linear",
        "dense PEFT LoRA",
        "ours / dense",
        "LoRA overhead",
        "err ours base / +LoRA",
        "err dense",
        "err PEFT stock",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r["shape"],
                r["scheme"],
                r["dtype"],
                str(r["tokens"]),
                fmt_ms(r["ours_ms"]),
                fmt_ms(r["ours_lora_ms"]),
                stock_text(r.get("peft"), notes),
                stock_text(r.get("aqlm"), notes),
                stock_text(r.get("aqlm_mt"), notes, with_err=True) if uses_numba(r) else "n/a (no numba)",
                fmt_ms(r["dense_ms"]),
                fmt_ms(r["dense_lora_ms"]),
                f"{r['ours_ms'] / r['dense_ms']:.2f}x",
                f"{100 * (r['ours_lora_ms'] / r['ours_ms'] - 1):+.0f}%",
                f"{fmt_err(r['ours_err'])} / {fmt_err(r['ours_lora_err'])}",
                fmt_err(r["dense_err"]),
                fmt_err((r.get("peft") or {}).get("err")),
            ]
        )
    parts += [md_table(header, body), ""]
    parts += [
        f"## Training step (fp32, forward + backward, LoRA r={LORA_RANK}), median ms and peak memory",
        "",
        "*ours* = `aqlm_lora.AqlmLoraLinear` on an `aqlm.QuantizedLinear`; *PEFT + aqlm* = PEFT's stock"
        " `AqlmLoraLinear` (numba 1 thread); *dense PEFT* = `lora.Linear` on an `nn.Linear`. x, lora_A, lora_B"
        " require grad. Peak = allocator bytes held above the pre-step baseline (torch.profiler memory"
        " events; scratch outside torch's allocator is not seen). grad err = worst of dx, dA, dB vs fp32 formulas.",
        "",
    ]
    header = [
        "shape",
        "scheme",
        "N",
        "ours",
        "PEFT + aqlm",
        "dense PEFT LoRA",
        "ours / dense",
        "peak ours",
        "peak PEFT + aqlm",
        "peak dense",
        "grad err ours",
        "grad err PEFT + aqlm",
    ]
    body = []
    for r in train_rows:
        stock = r.get("peft_aqlm") or {}
        ratio = f"{r['ours_ms'] / r['dense_ms']:.2f}x" if r.get("ours_ms") and r.get("dense_ms") else "-"
        body.append(
            [
                r["shape"],
                r["scheme"],
                str(r["tokens"]),
                notes(r.get("ours_status")) if "ours_status" in r else fmt_ms(r.get("ours_ms")),
                notes(stock.get("status")) if "status" in stock else fmt_ms(stock.get("ms")),
                notes(r.get("dense_status")) if "dense_status" in r else fmt_ms(r.get("dense_ms")),
                ratio,
                fmt_bytes(r.get("ours_peak")),
                fmt_bytes(stock.get("peak")),
                fmt_bytes(r.get("dense_peak")),
                fmt_err(r.get("ours_err")),
                fmt_err(stock.get("err")),
            ]
        )
    parts += [md_table(header, body), ""]
    if notes.items:
        parts += ["Errors:", "", notes.render(), ""]
    return "\n".join(parts)


def write_csv(path: Path, rows: list[dict], train_rows: list[dict]) -> None:
    """One CSV row per (row, implementation), inference and training alike."""
    fields = [
        "kind",
        "shape",
        "scheme",
        "dtype",
        "tokens",
        "impl",
        "median_ms",
        "iqr_ms",
        "min_ms",
        "rel_err",
        "peak_bytes",
        "status",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            base = {
                "kind": "inference",
                "shape": r["shape"],
                "scheme": r["scheme"],
                "dtype": r["dtype"],
                "tokens": r["tokens"],
            }
            for impl in ("ours", "ours_lora", "dense", "dense_lora"):
                writer.writerow(
                    {
                        **base,
                        "impl": impl,
                        "median_ms": f"{r[f'{impl}_ms']:.6g}",
                        "iqr_ms": f"{r[f'{impl}_iqr']:.3g}",
                        "min_ms": f"{r[f'{impl}_min']:.6g}",
                        "rel_err": f"{r[f'{impl}_err']:.3g}",
                        "status": "ok",
                    }
                )
            for impl, key in (("peft_stock", "peft"), ("aqlm_stock", "aqlm"), ("aqlm_stock_numba_default", "aqlm_mt")):
                cell = r.get(key)
                if cell is None:
                    continue
                writer.writerow(_csv_cell(base, impl, cell, "ok" if key != "aqlm_mt" else "wrong results"))
        for r in train_rows:
            base = {
                "kind": "training",
                "shape": r["shape"],
                "scheme": r["scheme"],
                "dtype": "fp32",
                "tokens": r["tokens"],
            }
            stock = r.get("peft_aqlm") or {}
            cells = [
                ("ours", {k[5:]: v for k, v in r.items() if k.startswith("ours_")}),
                ("dense_peft_lora", {k[6:]: v for k, v in r.items() if k.startswith("dense_")}),
                ("peft_stock", stock),
            ]
            for impl, cell in cells:
                if not cell:
                    continue
                writer.writerow({**_csv_cell(base, impl, cell, "ok"), "peak_bytes": cell.get("peak", "")})


def _csv_cell(base: dict, impl: str, cell: dict, default_status: str) -> dict:
    """One CSV row from a measured cell ({ms, iqr, err, status}, any of them missing)."""
    return {
        **base,
        "impl": impl,
        "median_ms": f"{cell['ms']:.6g}" if "ms" in cell else "",
        "iqr_ms": f"{cell['iqr']:.3g}" if "iqr" in cell else "",
        "rel_err": f"{cell['err']:.3g}" if "err" in cell else "",
        "status": cell.get("status", default_status),
    }


def plot(path: Path, rows: list[dict], shapes: list[tuple[int, int]], schemes: list[Scheme]) -> None:
    """Median time vs tokens, one panel per (shape, scheme); bf16 only for our kernels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        ("ours base", lambda r: r["ours_ms"], "C0", "-"),
        ("ours + LoRA", lambda r: r["ours_lora_ms"], "C1", "-"),
        ("PEFT stock (numba 1 thr)", lambda r: cell_ms(r.get("peft")), "C2", "-"),
        ("aqlm (numba 1 thr)", lambda r: cell_ms(r.get("aqlm")), "C3", "-"),
        ("aqlm numba default thr (WRONG)", lambda r: cell_ms(r.get("aqlm_mt")), "C3", ":"),
        ("dense F.linear", lambda r: r["dense_ms"], "k", "--"),
        ("dense PEFT LoRA", lambda r: r["dense_lora_ms"], "C7", "--"),
    ]
    fig, axes = plt.subplots(len(shapes), len(schemes), figsize=(5.5 * len(schemes), 4 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, scheme in enumerate(schemes):
            ax = axes[i][j]
            for dtype, marker in (("fp32", "o"), ("bf16", "x")):
                sel = find(rows, shape=shape_id(shape), scheme=str(scheme), dtype=dtype)
                sel.sort(key=lambda r: r["tokens"])
                for label, get, color, style in series:
                    if dtype == "bf16" and not label.startswith("ours"):
                        continue
                    pts = [(r["tokens"], get(r)) for r in sel if get(r)]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(
                            xs,
                            ys,
                            marker=marker,
                            color=color,
                            linestyle=style if dtype == "fp32" else "-.",
                            label=f"{label} ({dtype})",
                            alpha=1.0 if dtype == "fp32" else 0.6,
                        )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape_id(shape)} (out x in), {scheme_title(scheme)}")
            ax.set_xlabel("tokens N")
            ax.set_ylabel("median ms")
            ax.grid(True, which="both", alpha=0.3)
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if len(shapes) == 1 else 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
