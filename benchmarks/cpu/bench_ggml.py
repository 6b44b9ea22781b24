"""llama.cpp's CPU kernels (ggml) as the anchor: ggml matmuls side by side with ours in one run (issue 15).

Run from the repository root with the project's venv (ggml-python: ``.venv/bin/pip install ggml-python``)::

    .venv/bin/python benchmarks/cpu/bench_ggml.py            # full sweep -> benchmarks/results/ggml/
    .venv/bin/python benchmarks/cpu/bench_ggml.py --quick    # 4096x4096, N = 1, 8, no block; ~20 s

Contenders, per shape (out x in) and token count N, all timed interleaved in one process with
``--threads`` threads (torch.set_num_threads and ggml's n_threads):

- ggml ``mul_mat`` of types f16, q4_0, q2_K, iq2_xxs, iq2_xs (those the installed ggml knows) on f32
  activations (ggml quantizes them to q8_0 / q8_K itself); see ``ggml_runner.py`` for the weights;
- ours: ``aqlm_lora.ops.aqlm_gemm`` for 2x8 and 1x16 (in_group 8) with fp32 and bf16 activations
  (``aqlm_lora.scheme.random_weight`` via ``measure.make_weights``);
- torch dense ``F.linear`` in fp32 and bf16 on the dequantized 2x8 weight.

Then one Llama-2-7B block's seven linears (q, k, v, o, gate, up, down) at N=1, ours with a rank-16
LoRA on all seven (``ops.aqlm_lora_linear``), against ggml and dense bf16 without LoRA, as tokens/s.

Times: ``measure.time_interleaved`` (``torch.utils.benchmark`` blocked_autorange): ``--repeats``
rounds (``--prefill-repeats`` for N >= 256), each timing every contender in turn after a warm-up
call; medians over the rounds' samples. Without ggml-python the ggml columns stay empty and the
report says how to install it. Outputs ``bench_ggml.md`` (also printed), ``.csv`` and ``.png``:
in ``benchmarks/results/ggml`` for the full sweep, else in ``$XDG_CACHE_HOME/aqlm_lora/bench/ggml``
unless ``--out`` is given. docs/benchmark_ggml.md explains how to read them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import measure as bc
import torch
import torch.nn.functional as F
from ggml_runner import GGML_TYPES, GgmlGraph, GgmlWeight, bits_per_weight, ggml_info, load_ggml, type_ids
from report import Notes, fmt_ms, md_table
from targets import find

from aqlm_lora.scheme import Scheme

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "ggml"
ALL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (4096, 14336)]
ALL_TOKENS = [1, 2, 4, 8, 16, 64, 512]
SCHEMES = [Scheme(2, 8), Scheme(1, 16)]
PREFILL = 256  # N from here on counts as prefill (fewer rounds; the prefill targets)
ANCHOR = "ggml iq2_xxs"  # the llama.cpp type the decode targets compare with
PARTIAL_FLAGS = ("quick", "shapes", "tokens", "types", "block")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4096x4096, N=1,8, 2 rounds, no block (unless --block)")
    p.add_argument("--shapes", help="comma list of OUTxIN (default: the 7B shapes 4096x4096,11008x4096,...)")
    p.add_argument("--tokens", help="comma list of N (default 1,2,4,8,16,64,512)")
    p.add_argument("--types", help=f"comma list of ggml types (default {','.join(GGML_TYPES)})")
    p.add_argument("--block", help="HIDDENxINTERMEDIATE of the block, or 'none' (default 4096x11008; quick none)")
    p.add_argument("--threads", type=int, default=2, help="torch and ggml threads (default 2)")
    p.add_argument("--repeats", type=int, help="interleaved rounds per cell (default 5; quick 2)")
    p.add_argument("--prefill-repeats", type=int, help=f"rounds at N >= {PREFILL} (default 3; quick 2)")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per contender and cell (default 0.2)")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/ggml for the full sweep)")
    args = p.parse_args(argv)
    args.command = " ".join(["benchmarks/cpu/bench_ggml.py", *(sys.argv[1:] if argv is None else argv)])
    args.shape_list = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else (ALL_SHAPES[:1] if args.quick else ALL_SHAPES)
    )
    args.token_list = (
        sorted({int(t) for t in args.tokens.split(",")}) if args.tokens else ([1, 8] if args.quick else ALL_TOKENS)
    )
    args.type_list = args.types.split(",") if args.types else list(GGML_TYPES)
    block = args.block or ("none" if args.quick else "4096x11008")
    args.block_dims = None if block == "none" else tuple(int(v) for v in block.lower().split("x"))
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.prefill_repeats = args.prefill_repeats or (2 if args.quick else 3)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)
    if args.out is None:
        partial = any(getattr(args, flag) for flag in PARTIAL_FLAGS)
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        args.out = cache / "aqlm_lora" / "bench" / "ggml" if partial else RESULTS
    return args


# ---------------------------------------------------------------------------------------------
# Measuring


def time_cell(
    args: argparse.Namespace,
    where: dict[str, Any],
    fns: dict[str, Callable[[], Any]],
    refs: dict[str, Optional[torch.Tensor]],
) -> list[dict[str, Any]]:
    """Rows {**where, impl, ms, iqr, min, err | status}: a warm-up call each (checked), then interleaved rounds."""
    rows, live = [], {}
    for impl, fn in fns.items():
        row = {**where, "impl": impl}
        try:
            out = fn()
        except Exception as err:  # one broken contender must not cost the others' numbers
            rows.append({**row, "status": f"error: {bc.first_sentence(err)}"})
            continue
        ref = refs.get(impl)
        row["err"] = None if ref is None else bc.rel_err(out, ref)
        rows.append(row)
        live[impl] = row
    rounds = args.prefill_repeats if where["tokens"] >= PREFILL else args.repeats
    with torch.no_grad():
        timings = bc.time_interleaved({k: fns[k] for k in live}, args.min_run_time, args.threads, rounds)
    for impl, (ms, iqr, fastest) in timings.items():
        live[impl].update(ms=ms, iqr=iqr, min=fastest)
    bc.log(" ".join([f"{where['shape']} N={where['tokens']}:"] + [f"{r['impl']} {fmt_ms(r.get('ms'))}" for r in rows]))
    return rows


def ggml_weights(
    ggml: Optional[ModuleType], args: argparse.Namespace, shape: tuple[int, int], why_not: dict[str, str]
) -> dict[str, GgmlWeight]:
    """The ggml weights of ``shape`` that can be built; why not the others, in ``why_not``."""
    weights = {}
    for name in args.type_list:
        if name in why_not:
            continue
        try:
            weights[name] = GgmlWeight(ggml, name, shape[0], shape[1], seed=shape[0] * 7 + shape[1])
        except (ValueError, MemoryError, RuntimeError) as err:
            why_not[name] = f"error: {bc.first_sentence(err)}"
    return weights


def not_measured(where: dict[str, Any], why_not: dict[str, str]) -> list[dict[str, Any]]:
    return [{**where, "impl": f"ggml {name}", "status": status} for name, status in why_not.items()]


def measure_shape(
    args: argparse.Namespace, ggml: Optional[ModuleType], why_not: dict[str, str], shape: tuple[int, int]
) -> list[dict]:
    """Every contender on one ``out x in`` layer at each N of ``--tokens``."""
    from aqlm_lora import ops

    ours = {scheme: bc.make_weights(shape[0], shape[1], scheme) for scheme in SCHEMES}
    dense32 = {scheme: w.dense(torch.float32) for scheme, w in ours.items()}
    dense = {name: dense32[SCHEMES[0]].to(dtype) for name, dtype in bc.DTYPES.items()}
    skipped = dict(why_not)
    weights = ggml_weights(ggml, args, shape, skipped)
    rows = []
    try:
        for n in args.token_list:
            x = bc.make_input(n, shape[1], torch.float32)
            fns: dict[str, Callable[[], Any]] = {}
            refs: dict[str, Optional[torch.Tensor]] = {}
            graphs = {name: GgmlGraph([(w, x)], args.threads) for name, w in weights.items()}
            for name, graph in graphs.items():
                fns[f"ggml {name}"], refs[f"ggml {name}"] = (lambda g=graph: g()[0]), weights[name].reference(x)
            for scheme, w in ours.items():
                ref = F.linear(x, dense32[scheme])
                for dtype_name, dtype in bc.DTYPES.items():
                    impl = f"ours {scheme} {dtype_name}"
                    fns[impl], refs[impl] = partial(ops.aqlm_gemm, x.to(dtype), *w.args_as(dtype), None), ref
            for dtype_name, weight in dense.items():
                fns[f"dense {dtype_name}"] = partial(F.linear, x.to(weight.dtype), weight)
                refs[f"dense {dtype_name}"] = refs[f"ours {SCHEMES[0]} fp32"]  # the same dequantized weight
            where = {"kind": "linear", "shape": bc.shape_id(shape), "tokens": n}
            rows += time_cell(args, where, fns, refs) + not_measured(where, skipped)
            for graph in graphs.values():
                graph.close()
    finally:
        for w in weights.values():
            w.close()
    return rows


def block_layers(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """The seven linears of a Llama block, name: (out, in)."""
    square, up = (hidden, hidden), (intermediate, hidden)
    return {"q": square, "k": square, "v": square, "o": square, "gate": up, "up": up, "down": (hidden, intermediate)}


def measure_block(args: argparse.Namespace, ggml: Optional[ModuleType], why_not: dict[str, str]) -> list[dict]:
    """One decode step (N=1) through the block's seven linears: ours + LoRA r=16, ggml, dense bf16."""
    from aqlm_lora import ops

    layers = block_layers(*args.block_dims)
    x32 = {k: bc.make_input(1, k, torch.float32) for k in set(args.block_dims)}
    ours = {scheme: [bc.make_weights(out_f, in_f, scheme) for out_f, in_f in layers.values()] for scheme in SCHEMES}
    fns: dict[str, Callable[[], Any]] = {}
    for scheme, ws in ours.items():
        for dtype_name, dtype in bc.DTYPES.items():
            calls = [(x32[w.in_features].to(dtype), *w.args_as(dtype), w.lora_A, w.lora_B, w.scaling) for w in ws]

            def step(calls=calls) -> list[torch.Tensor]:
                return [
                    ops.aqlm_lora_linear(x, c, cb, s, None, a, b, k, training=False) for x, c, cb, s, a, b, k in calls
                ]

            fns[f"ours {scheme} + LoRA {dtype_name}"] = step
    skipped = dict(why_not)
    built: dict[str, list[GgmlWeight]] = {}
    graphs: list[GgmlGraph] = []
    try:
        for out_f, in_f in layers.values():
            for name, w in ggml_weights(ggml, args, (out_f, in_f), skipped).items():
                built.setdefault(name, []).append(w)
        for name, ws in built.items():
            if name not in skipped:  # a type that failed on one layer is out of the block
                graphs.append(GgmlGraph([(w, x32[w.in_features]) for w in ws], args.threads))
                fns[f"ggml {name}"] = graphs[-1]
        dense = [
            (x32[w.in_features].to(torch.bfloat16), w.dense(torch.float32).to(torch.bfloat16)) for w in ours[SCHEMES[0]]
        ]
        fns["dense bf16"] = lambda: [F.linear(x, weight) for x, weight in dense]
        where = {"kind": "block", "shape": "x".join(map(str, args.block_dims)), "tokens": 1}
        return time_cell(args, where, fns, {}) + not_measured(where, skipped)
    finally:
        for graph in graphs:
            graph.close()
        for w in (w for ws in built.values() for w in ws):
            w.close()


# ---------------------------------------------------------------------------------------------
# Targets and outputs


def ms_of(rows: list[dict], **match) -> Optional[float]:
    found = [r["ms"] for r in find(rows, **match) if r.get("ms")]
    return found[0] if found else None


TARGETS = [  # (name, numerator, denominator, N range, limit)
    ("decode N=1: ours 2x8 fp32 / ggml iq2_xxs", "ours 2x8 fp32", ANCHOR, (1, 1), 1.0),
    ("decode N=1 (stretch): ours 2x8 fp32 / ggml q2_K", "ours 2x8 fp32", "ggml q2_K", (1, 1), 1.0),
    ("decode N=1: ours 1x16 fp32 / ggml iq2_xxs", "ours 1x16 fp32", ANCHOR, (1, 1), 1.5),
    ("N=8: ours 2x8 fp32 / ggml iq2_xxs", "ours 2x8 fp32", ANCHOR, (8, 8), 1.0),
    ("N=8: ours 1x16 fp32 / ggml iq2_xxs", "ours 1x16 fp32", ANCHOR, (8, 8), 1.0),
    (f"prefill N>={PREFILL}: ours 2x8 bf16 / dense bf16", "ours 2x8 bf16", "dense bf16", (PREFILL, math.inf), 1.15),
    (f"prefill N>={PREFILL}: ours 1x16 bf16 / dense bf16", "ours 1x16 bf16", "dense bf16", (PREFILL, math.inf), 1.15),
    (f"prefill N>={PREFILL}: ours 2x8 fp32 / dense fp32", "ours 2x8 fp32", "dense fp32", (PREFILL, math.inf), 1.0),
    (f"prefill N>={PREFILL}: ours 1x16 fp32 / dense fp32", "ours 1x16 fp32", "dense fp32", (PREFILL, math.inf), 1.0),
]


def targets(rows: list[dict]) -> list[dict[str, str]]:
    """Each target's worst ratio over the measured shapes and N, PASS / FAIL, or n/a when not measured."""
    out = []
    cells = sorted({(r["shape"], r["tokens"]) for r in rows if r["kind"] == "linear"})
    for name, num, den, (lo, hi), limit in TARGETS:
        ratios = []
        for shape, n in cells:
            a, b = (ms_of(rows, kind="linear", shape=shape, tokens=n, impl=impl) for impl in (num, den))
            if lo <= n <= hi and a and b:
                ratios.append((a / b, f"{shape} N={n}"))
        value, where = max(ratios) if ratios else (None, "")
        out.append(
            {
                "target": f"{name} (worst of {len(ratios)})" if ratios else name,
                "limit": f"<= {limit}x",
                "measured": "not measured" if value is None else f"{value:.3f}x ({where})",
                "result": "n/a" if value is None else ("PASS" if value <= limit else "FAIL"),
            }
        )
    return out


def ratio_text(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(args: argparse.Namespace, info: dict[str, str], rows: list[dict], note: str, missing: list[str]) -> str:
    notes = Notes()
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["kind"] == "linear"))
    parts = [
        "# llama.cpp (ggml) CPU matmuls vs aqlm_lora (`benchmarks/cpu/bench_ggml.py`)",
        "",
        f"Mode: **{'quick' if args.quick else 'full'}**; command: `{args.command}`. "
        f"Median ms over {args.repeats} interleaved rounds ({args.prefill_repeats} at N >= {PREFILL}) of "
        f"`torch.utils.benchmark` blocked_autorange, {args.min_run_time} s per contender and cell. ggml takes f32"
        " activations (quantized inside to q8_0/q8_K); *ours* = `aqlm_lora.ops.aqlm_gemm`, *dense* = `F.linear`."
        " Compare columns of one row: they were timed together. How to read: docs/benchmark_ggml.md.",
        "",
    ]
    if note:
        parts += [f"**No ggml columns:** {note}.", ""]
    if missing:
        parts += [f"ggml types this ggml does not know: {', '.join(missing)}.", ""]
    parts += [md_table(["machine", ""], [[k, v] for k, v in info.items()]), "", "## Targets", ""]
    parts += [md_table(["target", "limit", "measured", "result"], [list(t.values()) for t in targets(rows)]), ""]
    parts += ["## One linear layer, median ms", ""]
    ratios = [("ours 2x8 fp32", ANCHOR), ("ours 1x16 fp32", ANCHOR), ("ours 2x8 bf16", "dense bf16")]
    header = ["shape", "N", *impls, *[f"{a} / {b}" for a, b in ratios]]
    body = []
    for shape, n in dict.fromkeys((r["shape"], r["tokens"]) for r in rows if r["kind"] == "linear"):
        sel = {r["impl"]: r for r in find(rows, kind="linear", shape=shape, tokens=n)}
        cells = [fmt_ms(sel[i]["ms"]) if "ms" in sel.get(i, {}) else notes(sel.get(i, {}).get("status")) for i in impls]
        ms = {i: sel.get(i, {}).get("ms") for i in sel}
        body.append([shape, str(n), *cells, *[ratio_text(ms.get(a), ms.get(b)) for a, b in ratios]])
    parts += [md_table(header, body), ""]
    worst = {
        i: max((r["err"] for r in rows if r["impl"] == i and r.get("err") is not None), default=None) for i in impls
    }
    parts += [
        "Largest error max|y - ref| / max|ref| against fp32 `F.linear` (ggml: on the unquantized template rows,"
        " so it is the type's quantization error): "
        + ", ".join(f"{i} {v:.1e}" for i, v in worst.items() if v is not None),
        "",
    ]
    block = [r for r in rows if r["kind"] == "block"]
    if block:
        anchor, dense = (ms_of(block, impl=i) for i in (ANCHOR, "dense bf16"))
        parts += [
            f"## Llama-2-7B-shaped block ({block[0]['shape']}: q, k, v, o, gate, up, down) at N=1",
            "",
            "ours with a rank-16 LoRA on all seven layers (`ops.aqlm_lora_linear`, fused); ggml, dense: no LoRA.",
            "",
        ]
        body = [
            [
                r["impl"],
                fmt_ms(r["ms"]),
                f"{1e3 / r['ms']:.1f}",
                ratio_text(r["ms"], anchor),
                ratio_text(r["ms"], dense),
            ]
            if "ms" in r
            else [r["impl"], notes(r["status"]), "-", "-", "-"]
            for r in block
        ]
        parts += [md_table(["contender", "ms per token", "tokens/s", "time / ggml iq2_xxs", "time / dense bf16"], body)]
        parts += [""]
    if notes.items:
        parts += ["Errors and skips:", "", notes.render(), ""]
    return "\n".join(parts)


def plotting() -> ModuleType:
    """benchmarks/plotting.py, the benchmarks' shared figure and CSV output (one folder up)."""
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    import plotting as shared

    return shared


def csv_rows(rows: list[dict]) -> list[dict[str, Any]]:
    """One CSV row per measurement: numbers to 6 digits, empty where not measured, status "ok" or why not."""
    out = []
    for r in rows:
        values = {"median_ms": r.get("ms"), "iqr_ms": r.get("iqr"), "min_ms": r.get("min"), "rel_err": r.get("err")}
        out.append(
            {k: r[k] for k in ("kind", "shape", "tokens", "impl")}
            | {k: "" if v is None else f"{v:.6g}" for k, v in values.items()}
            | {"status": r.get("status", "ok")}
        )
    return out


def plot(path: Path, rows: list[dict]) -> None:
    """Median ms vs N, one panel per shape: ggml dashed, ours solid, dense dotted."""
    plt = plotting().pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["kind"] == "linear"))
    if plt is None or not shapes:
        return
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["kind"] == "linear"))
    colors = plt.get_cmap("tab20").colors  # one colour per contender, the same in every panel
    cols = min(2, len(shapes))
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.8 * nrows), squeeze=False)
    for ax in axes.flat[len(shapes) :]:
        ax.set_visible(False)
    for ax, shape in zip(axes.flat, shapes):
        sel = [r for r in find(rows, kind="linear", shape=shape) if r.get("ms")]
        for i, impl in enumerate(impls):
            pts = sorted((r["tokens"], r["ms"]) for r in sel if r["impl"] == impl)
            style = "--" if impl.startswith("ggml") else (":" if impl.startswith("dense") else "-")
            marker = "x" if impl.endswith("bf16") else "o"
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, color=colors[i % len(colors)], label=impl)
        ax.set(xscale="log", yscale="log", title=f"{shape} (out x in)", xlabel="tokens N", ylabel="median ms")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    plotting().save_figure(fig, path, dpi=110)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ggml, note = load_ggml()
    info = bc.machine_info(torch.get_num_threads())
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    why_not: dict[str, str] = {}
    missing: list[str] = []
    if ggml is None:
        bc.log(f"NOTE: {note}")
        why_not = {name: "no ggml-python (see the note above)" for name in args.type_list}
    else:
        info.update(ggml_info(ggml))
        missing = type_ids(ggml, tuple(args.type_list))[1]
        why_not = {name: f"not in ggml-python {info['ggml-python']}" for name in missing}
        info["ggml bits per weight"] = ", ".join(
            f"{n} {bits_per_weight(ggml, t):.4g}" for n, t in type_ids(ggml, tuple(args.type_list))[0].items()
        )
    bc.log(f"machine: {info}")
    rows: list[dict] = []
    for shape in args.shape_list:
        rows += measure_shape(args, ggml, why_not, shape)
    if args.block_dims:
        rows += measure_block(args, ggml, why_not)
    info["load average (1/5/15 min) at end"] = bc.load_average()
    info["benchmark wall time"] = f"{(time.perf_counter() - bc.START) / 60:.1f} min"
    text = markdown(args, info, rows, note, missing)
    print(text)
    (args.out / "bench_ggml.md").write_text(text)
    plotting().write_csv(args.out / "bench_ggml.csv", csv_rows(rows))
    plot(args.out / "bench_ggml.png", rows)
    bc.log(f"wrote {args.out / 'bench_ggml.md'}, .csv, .png")


if __name__ == "__main__":
    main()
