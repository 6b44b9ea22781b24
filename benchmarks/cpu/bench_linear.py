"""CPU benchmark of one AQLM linear layer: our fused ops vs aqlm, PEFT and dense PyTorch (issue 5).

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/cpu/bench_linear.py --quick      # ~2-3 min: 4096x4096, N = 1, 16, 256
    .venv/bin/python benchmarks/cpu/bench_linear.py              # full sweep, ~25 min
    .venv/bin/python benchmarks/cpu/bench_linear.py --shapes 4096x4096 --schemes 2x8 --tokens 1,4 --dtypes fp32

What is measured, for shapes (out x in), schemes 1x16 g8 / 2x8 g8, tokens N and dtypes fp32/bf16,
all on the same deterministic weights (``measure.make_weights``):

- ours base: ``aqlm_lora.ops.aqlm_gemm``; ours + LoRA r=16: ``ops.aqlm_lora_linear(..., training=False)``
  under ``torch.no_grad()``;
- PEFT's stock ``peft.tuners.lora.aqlm.AqlmLoraLinear`` and bare ``aqlm.QuantizedLinear``, in a
  subprocess with ``NUMBA_NUM_THREADS=1`` (numba reads it at import); and ``aqlm.QuantizedLinear``
  again in a subprocess with numba's default thread count, where its 2x8 kernel (a ``prange`` over
  input groups that ``+=`` into a shared output vector) races and returns wrong results: its
  error is printed. aqlm's 1x16 CPU path is dequantize + ``F.linear`` (no numba); its 2x8 path
  asserts float32. Each aqlm layer gets its own clone of the codes (aqlm permutes them in place).
- dense ``F.linear`` on the dequantized weight, and PEFT's dense ``lora.Linear`` (r=16) on an
  ``nn.Linear`` holding it, both in the row's dtype.
- training step (fp32, forward + ``backward(grad)`` with x, lora_A, lora_B requiring grad): our
  ``aqlm_lora.AqlmLoraLinear`` layer vs PEFT + aqlm (subprocess, numba 1 thread) vs dense PEFT LoRA.

Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange`` (``torch.set_num_threads``
= ``--threads``). Stock aqlm/PEFT cells are skipped above N = 64 in ``--quick`` mode, and at the N
where one call took more than 2 s (and every larger N); a stock training step, above 4 s. Errors
are ``max|out - ref| / max|ref|`` with ``ref = F.linear`` (+ LoRA) in fp32 on aqlm's own
``_dequantize_weight`` of the same codes.

Peak memory of a training step: ``torch.profiler.profile(profile_memory=True)`` around one step
(gradients cleared beforehand); the allocator's alloc/free events are summed in time order and the
maximum is reported. Tensors alive before the step (weights, x, grad_output) are not counted, and
neither is memory taken outside torch's allocator (C++ ``std::vector`` scratch, numba/numpy arrays).

Outputs: ``bench_linear.md`` (markdown tables, also printed), ``bench_linear.csv`` (one row per
measurement) and ``bench_linear.png`` (time vs tokens) in ``--out``. Without ``--out``, only the
full sweep (no ``--quick``, no filter flag) writes the committed ``benchmarks/results``; a quick
or filtered run writes to ``$XDG_CACHE_HOME/aqlm_lora/bench`` (``~/.cache/aqlm_lora/bench``), so
it never overwrites the committed full-run results. ``--out benchmarks/results`` forces it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import measure as bc
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"  # the committed full-run results
MAX_CALL_S = 2.0  # skip a stock aqlm/PEFT cell (and larger N) once one call takes longer
MAX_STEP_S = 4.0  # the same for one stock PEFT + aqlm training step
QUICK_STOCK_MAX_N = 64
ERR_CALLS_THREADED = 20  # calls whose worst error is reported for aqlm with numba's default threads
ALL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
ALL_TOKENS = [1, 4, 16, 64, 256, 1024]
ALL_SCHEMES = [bc.Scheme(1, 16), bc.Scheme(2, 8)]
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def shape_id(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def first_sentence(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    sentence = re.split(r"(?<=[^.]\.)\s", line, maxsplit=1)[0]  # not at an ellipsis ("out=... arguments")
    return f"{type(err).__name__}: {sentence}"


# ---------------------------------------------------------------------------------------------
# Configuration


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4096x4096, N=1,16,256, bf16 at N=1 only, training N=256")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: benchmarks/results for the full sweep, else ~/.cache/aqlm_lora/bench)",
    )
    p.add_argument("--shapes", help="comma list of OUTxIN, e.g. 4096x4096,11008x4096")
    p.add_argument("--tokens", help="comma list of N, e.g. 1,16,256")
    p.add_argument("--schemes", help="comma list of CxB, e.g. 1x16,2x8")
    p.add_argument("--dtypes", help="comma list from fp32,bf16")
    p.add_argument("--train-tokens", help="comma list of N for the training step (default 256,1024; quick 256)")
    p.add_argument("--min-run-time", type=float, help="seconds per Timer measurement (default 0.3; quick 0.1)")
    p.add_argument("--no-stock", action="store_true", help="skip the aqlm/PEFT subprocesses")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run stock jobs from this file
    args = p.parse_args(argv)
    if args.worker is not None:
        return args

    def ints(text: Optional[str], default: list[int]) -> list[int]:
        return sorted({int(t) for t in text.split(",")}) if text else default

    args.shape_list = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else ([ALL_SHAPES[0]] if args.quick else ALL_SHAPES)
    )
    args.token_list = ints(args.tokens, [1, 16, 256] if args.quick else ALL_TOKENS)
    args.scheme_list = [bc.Scheme.parse(s) for s in args.schemes.split(",")] if args.schemes else ALL_SCHEMES
    args.dtype_list = args.dtypes.split(",") if args.dtypes else list(bc.DTYPES)
    for name in args.dtype_list:
        if name not in bc.DTYPES:
            p.error(f"unknown dtype {name!r}; use {','.join(bc.DTYPES)}")
    args.train_list = ints(args.train_tokens, [256] if args.quick else [256, 1024])
    if args.min_run_time is None:
        args.min_run_time = 0.1 if args.quick else 0.3
    if args.out is None:
        args.out = default_out(args)
    return args


# Flags that make a run partial: its results must not replace the committed full sweep's.
PARTIAL_FLAGS = ("quick", "shapes", "tokens", "schemes", "dtypes", "train_tokens", "no_stock")


def default_out(args: argparse.Namespace) -> Path:
    """``benchmarks/results`` for the full sweep; a per-user cache folder for anything less."""
    if not any(getattr(args, flag) for flag in PARTIAL_FLAGS):
        return RESULTS
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "aqlm_lora" / "bench"


def tokens_for(args: argparse.Namespace, dtype: str) -> list[int]:
    """bf16 runs every N in full mode, only N = 1 in quick mode."""
    if args.quick and dtype != "fp32" and not args.tokens:
        return [n for n in args.token_list if n == 1] or args.token_list[:1]
    return args.token_list


# ---------------------------------------------------------------------------------------------
# Our kernels and the dense baselines (this process)


def dense_peft_layer(dense, w: bc.Weights, requires_grad: bool):
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(w.in_features, w.out_features, bias=False, dtype=dense.dtype)
    with torch.no_grad():
        base.weight.copy_(dense)
    base.weight.requires_grad_(False)
    layer = PeftLinear(base, "default", config=bc.lora_config(), r=bc.LORA_RANK, lora_alpha=bc.LORA_ALPHA)
    bc.set_lora_weights(layer, w, requires_grad)
    return layer


def measure_inference(args: argparse.Namespace, shape, scheme: bc.Scheme, w: bc.Weights) -> list[dict[str, Any]]:
    from aqlm_lora import ops

    rows = []
    for dtype_name in args.dtype_list:
        dtype = bc.DTYPES[dtype_name]
        dense_fp32 = w.dense(dtype)
        dense = dense_fp32.to(dtype)
        codebooks, scales = w.codebooks_as(dtype), w.scales_as(dtype)
        peft_dense = dense_peft_layer(dense, w, requires_grad=False).eval()
        for n in tokens_for(args, dtype_name):
            x = bc.make_input(n, w.in_features, dtype)
            ref_base, ref_lora = bc.reference(w, dense_fp32, x)

            def base(x=x, codebooks=codebooks, scales=scales):
                with torch.no_grad():
                    return ops.aqlm_gemm(x, w.codes, codebooks, scales, None)

            def lora(x=x, codebooks=codebooks, scales=scales):
                with torch.no_grad():
                    return ops.aqlm_lora_linear(
                        x, w.codes, codebooks, scales, None, w.lora_A, w.lora_B, w.scaling, training=False
                    )

            def dense_linear(x=x, dense=dense):
                with torch.no_grad():
                    return F.linear(x, dense)

            def dense_lora(x=x, layer=peft_dense):
                with torch.no_grad():
                    return layer(x)

            row: dict[str, Any] = {"shape": shape_id(shape), "scheme": scheme.id, "dtype": dtype_name, "tokens": n}
            fns = {"ours": base, "ours_lora": lora, "dense": dense_linear, "dense_lora": dense_lora}
            refs = {"ours": ref_base, "ours_lora": ref_lora, "dense": ref_base, "dense_lora": ref_lora}
            slowest = 0.0
            for key, fn in fns.items():
                begin = time.perf_counter()
                out = fn()
                slowest = max(slowest, time.perf_counter() - begin)
                row[f"{key}_err"] = bc.rel_err(out, refs[key])
            rounds = max(1, min(3, int(args.min_run_time / (2 * slowest))))  # 1 round when calls are slow
            timings = bc.time_interleaved(fns, len(fns) * args.min_run_time, args.threads, rounds)
            for key, (ms, iqr, fastest) in timings.items():
                row[f"{key}_ms"], row[f"{key}_iqr"], row[f"{key}_min"] = ms, iqr, fastest
            log(
                f"{row['shape']} {scheme.id} {dtype_name} N={n}: ours {bc.fmt_ms(row['ours_ms'])} ms, "
                f"+LoRA {bc.fmt_ms(row['ours_lora_ms'])}, dense {bc.fmt_ms(row['dense_ms'])}, "
                f"err {bc.fmt_err(row['ours_err'])}"
            )
            rows.append(row)
    return rows


def ref_grads(w: bc.Weights, dense_fp32, x, g) -> tuple:
    """(dx, dA, dB) of ``sum(g * (x W^T + s (x A^T) B^T))`` in fp32."""
    gb = g @ w.lora_B
    return g @ dense_fp32 + w.scaling * gb @ w.lora_A, w.scaling * gb.T @ x, w.scaling * g.T @ (x @ w.lora_A.T)


def training_step(layer, x, g):
    """(step, clear_grads, grads) for a LoRA layer whose default adapter trains."""
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


def measure_train_step(layer, x, g, refs, args) -> dict[str, Any]:
    """Time, peak memory and gradient error of one training step of ``layer``."""
    timed, clear, step, grads = training_step(layer, x, g)
    clear()
    peak = bc.peak_memory_bytes(step)  # the first step, profiled, also gives the gradients to check
    err = max(bc.rel_err(a, b) for a, b in zip(grads(), refs))
    ms, iqr = bc.time_ms(timed, args.min_run_time, args.threads)
    return {"ms": ms, "iqr": iqr, "peak": peak, "err": err}


def measure_training(args: argparse.Namespace, shape, scheme: bc.Scheme, w: bc.Weights) -> list[dict[str, Any]]:
    from aqlm_lora import AqlmLoraLinear

    dense_fp32 = w.dense(torch.float32)
    rows = []
    for n in args.train_list:
        x = bc.make_input(n, w.in_features, torch.float32).requires_grad_(True)
        g = bc.make_input(n, w.out_features, torch.float32, seed=99)
        refs = ref_grads(w, dense_fp32, x.detach(), g)
        row: dict[str, Any] = {"shape": shape_id(shape), "scheme": scheme.id, "tokens": n}
        ours = AqlmLoraLinear(
            bc.make_aqlm_layer(w, torch.float32),
            "default",
            r=bc.LORA_RANK,
            lora_alpha=bc.LORA_ALPHA,
            config=bc.lora_config(),
        )
        bc.set_lora_weights(ours, w, requires_grad=True)
        for key, layer in [("ours", ours), ("dense", dense_peft_layer(dense_fp32, w, requires_grad=True))]:
            try:
                result = measure_train_step(layer, x, g, refs, args)
                row.update({f"{key}_{k}": v for k, v in result.items()})
            except Exception as err:
                row[f"{key}_status"] = f"error: {first_sentence(err)}"
        log(
            f"train {row['shape']} {scheme.id} N={n}: ours {bc.fmt_ms(row.get('ours_ms'))} ms "
            f"{bc.fmt_bytes(row.get('ours_peak'))}, dense PEFT {bc.fmt_ms(row.get('dense_ms'))} ms "
            f"{bc.fmt_bytes(row.get('dense_peak'))}"
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# aqlm and PEFT stock, in subprocesses (numba reads NUMBA_NUM_THREADS at import)


def run_worker(job: dict[str, Any], numba_threads: Optional[int]) -> dict[str, Any]:
    env = dict(os.environ)
    if numba_threads is None:
        env.pop("NUMBA_NUM_THREADS", None)
    else:
        env["NUMBA_NUM_THREADS"] = str(numba_threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps(job))
        label = "default" if numba_threads is None else str(numba_threads)
        log(f"stock aqlm/PEFT subprocess, NUMBA_NUM_THREADS={label}")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)], env=env)
        result_path = path.with_suffix(".out.json")
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"stock-aqlm subprocess failed (exit code {proc.returncode}); see its output above")
        return json.loads(result_path.read_text())


def stock_cell(fn, ref, n: int, state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """Time one stock call, or say why not. ``state`` carries 'slow' across increasing N."""
    if job["quick"] and n > QUICK_STOCK_MAX_N:
        return {"status": f"skipped (quick: N > {QUICK_STOCK_MAX_N})"}
    if state.get("error"):
        return {"status": state["error"]}
    if state.get("slow"):
        return {"status": "skipped (slow)"}
    try:
        begin = time.perf_counter()
        out = fn()
        single = time.perf_counter() - begin
    except Exception as err:
        state["error"] = f"error: {first_sentence(err)}"
        return {"status": state["error"]}
    err = bc.rel_err(out, ref)
    if single > MAX_CALL_S:
        state["slow"] = True
        return {"status": f"skipped (slow: one call {single:.1f} s)", "err": err}
    # A race shows up in some calls only: check the worst of a few (within the time cap).
    for extra in range(1, job["err_calls"]):
        if (extra + 1) * single > MAX_CALL_S:
            break
        err = max(err, bc.rel_err(fn(), ref))
    ms, iqr = bc.time_ms(fn, job["min_run_time"], job["threads"])
    return {"ms": ms, "iqr": iqr, "err": err}


def worker_inference(group: dict[str, Any], job: dict[str, Any]) -> list[dict[str, Any]]:
    from peft.tuners.lora.aqlm import AqlmLoraLinear as PeftAqlmLoraLinear

    scheme = bc.Scheme.parse(group["scheme"])
    w = bc.make_weights(group["out"], group["in"], scheme)
    if w.fingerprint() != group["fingerprint"]:
        raise RuntimeError("the subprocess rebuilt different weights than the main process")
    dtype = bc.DTYPES[group["dtype"]]
    dense_fp32 = w.dense(dtype)
    base = bc.make_aqlm_layer(w, dtype)
    peft = PeftAqlmLoraLinear(base, "default", config=bc.lora_config(), r=bc.LORA_RANK, lora_alpha=bc.LORA_ALPHA)
    bc.set_lora_weights(peft, w, requires_grad=False)
    peft.eval()
    states: dict[str, dict[str, Any]] = {col: {} for col in group["columns"]}
    try:  # first call: numba compiles, aqlm permutes its codes
        with torch.no_grad():
            base(bc.make_input(1, w.in_features, dtype))
    except Exception as err:
        for state in states.values():
            state["error"] = f"error: {first_sentence(err)}"
    rows = []
    for n in group["tokens"]:
        x = bc.make_input(n, w.in_features, dtype)
        ref_base, ref_lora = bc.reference(w, dense_fp32, x)
        row: dict[str, Any] = {"shape": f"{w.out_features}x{w.in_features}", "scheme": scheme.id}
        row.update({"dtype": group["dtype"], "tokens": n})
        for col in group["columns"]:
            module, ref = (base, ref_base) if col == "aqlm" else (peft, ref_lora)

            def fn(module=module, x=x):
                with torch.no_grad():
                    return module(x)

            row[col] = stock_cell(fn, ref, n, states[col], job)
        log(f"  stock {row['shape']} {scheme.id} {group['dtype']} N={n}: {json.dumps({c: row[c] for c in states})}")
        rows.append(row)
    return rows


def worker_training(item: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from peft.tuners.lora.aqlm import AqlmLoraLinear as PeftAqlmLoraLinear

    scheme = bc.Scheme.parse(item["scheme"])
    w = bc.make_weights(item["out"], item["in"], scheme)
    n = item["tokens"]
    row: dict[str, Any] = {"shape": f"{w.out_features}x{w.in_features}", "scheme": scheme.id, "tokens": n}
    dense_fp32 = w.dense(torch.float32)
    base = bc.make_aqlm_layer(w, torch.float32)
    layer = PeftAqlmLoraLinear(base, "default", config=bc.lora_config(), r=bc.LORA_RANK, lora_alpha=bc.LORA_ALPHA)
    bc.set_lora_weights(layer, w, requires_grad=True)
    x = bc.make_input(n, w.in_features, torch.float32).requires_grad_(True)
    g = bc.make_input(n, w.out_features, torch.float32, seed=99)
    refs = ref_grads(w, dense_fp32, x.detach(), g)
    timed, clear, step, grads = training_step(layer, x, g)
    try:
        begin = time.perf_counter()
        row["peak"] = bc.peak_memory_bytes(step)  # first step, profiled: peak memory and gradients
        single = time.perf_counter() - begin
    except Exception as err:
        row["status"] = f"error: {first_sentence(err)}"
        return row
    row["err"] = max(bc.rel_err(a, b) for a, b in zip(grads(), refs))
    if single > MAX_STEP_S:
        row["status"] = f"skipped (slow: one step {single:.1f} s)"
        return row
    row["ms"], row["iqr"] = bc.time_ms(timed, job["min_run_time"], job["threads"])
    return row


def worker_main(path: Path) -> None:
    job = json.loads(path.read_text())
    torch.set_num_threads(job["threads"])
    import numba

    result: dict[str, Any] = {"numba_threads": int(numba.config.NUMBA_NUM_THREADS), "rows": [], "training": []}
    for group in job["groups"]:
        result["rows"] += worker_inference(group, job)
    for item in job["training"]:
        row = worker_training(item, job)
        log(f"  stock train {row['shape']} {row['scheme']} N={row['tokens']}: {row}")
        result["training"].append(row)
    path.with_suffix(".out.json").write_text(json.dumps(result))


def stock_jobs(args: argparse.Namespace, weights: dict) -> tuple[dict, dict]:
    """Jobs for the NUMBA_NUM_THREADS=1 subprocess and the default-threads one."""
    common = {"threads": args.threads, "min_run_time": args.min_run_time, "quick": args.quick}
    single: dict[str, Any] = {**common, "groups": [], "training": [], "err_calls": 1}
    multi: dict[str, Any] = {**common, "groups": [], "training": [], "err_calls": ERR_CALLS_THREADED}
    for (shape, scheme), w in weights.items():
        for dtype_name in args.dtype_list:
            group = {"out": shape[0], "in": shape[1], "scheme": scheme.id, "dtype": dtype_name}
            group.update({"tokens": tokens_for(args, dtype_name), "fingerprint": w.fingerprint()})
            single["groups"].append({**group, "columns": ["aqlm", "peft"]})
            if scheme.nbits == 8:  # only the 8-bit path runs numba; 1x16 is dequantize + F.linear
                multi["groups"].append({**group, "columns": ["aqlm"]})
        for n in args.train_list:
            single["training"].append({"out": shape[0], "in": shape[1], "scheme": scheme.id, "tokens": n})
    return single, multi


def merge_stock(rows: list[dict], train_rows: list[dict], single: dict, multi: Optional[dict]) -> None:
    def key(r):
        return (r["shape"], r["scheme"], r.get("dtype"), r["tokens"])

    by_key = {key(r): r for r in rows}
    for r in single["rows"]:
        target = by_key[key(r)]
        target["aqlm"], target["peft"] = r["aqlm"], r["peft"]
    for r in multi["rows"] if multi else []:
        by_key[key(r)]["aqlm_mt"] = r["aqlm"]
    train_by_key = {key(r): r for r in train_rows}
    for r in single["training"]:
        train_by_key[key(r)]["peft_aqlm"] = {k: v for k, v in r.items() if k not in ("shape", "scheme", "tokens")}


# ---------------------------------------------------------------------------------------------
# Targets


def cell_ms(cell: Any) -> Optional[float]:
    return cell.get("ms") if isinstance(cell, dict) else None


def find(rows, **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def targets(rows: list[dict], train_rows: list[dict], schemes: list[bc.Scheme]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(name: str, limit: str, value: Optional[float], ok: Optional[bool], fmt: str = "{:.3f}x", where: str = ""):
        measured = "not measured" if value is None else fmt.format(value) + (f" ({where})" if where else "")
        result = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "limit": limit, "measured": measured, "result": result})

    def worst(candidates: list[tuple[float, str]], limit: float, name: str, limit_text: str, fmt="{:.3f}x") -> None:
        if not candidates:
            return add(name, limit_text, None, None)
        value, where = max(candidates)
        add(name, limit_text, value, value <= limit, fmt=fmt, where=where)

    ids = [s.id for s in schemes]
    for scheme_id, limit in [("2x8", 0.5), ("1x16", 1.0)]:
        if scheme_id not in ids:
            continue
        r = find(rows, shape="4096x4096", scheme=scheme_id, dtype="fp32", tokens=1)
        value = r[0]["ours_ms"] / r[0]["dense_ms"] if r else None
        add(
            f"decode N=1 4096x4096 {scheme_id}: ours / dense fp32 F.linear",
            f"<= {limit}x",
            value,
            None if value is None else value <= limit,
        )
    for scheme_id in ids:
        r = find(rows, shape="4096x4096", scheme=scheme_id, dtype="fp32", tokens=1)
        stock = cell_ms(r[0].get("aqlm")) if r else None
        value = stock / r[0]["ours_ms"] if stock else None
        add(
            f"decode N=1 4096x4096 {scheme_id}: speed-up over aqlm.QuantizedLinear (numba 1 thread)",
            ">= 10x",
            value,
            None if value is None else value >= 10,
        )
    for scheme_id in ids:
        for n in (256, 1024):
            cands = [
                (r["ours_ms"] / r["dense_ms"], r["shape"]) for r in find(rows, scheme=scheme_id, dtype="fp32", tokens=n)
            ]
            if cands:
                worst(cands, 1.2, f"prefill N={n} {scheme_id}: ours / dense fp32 F.linear (worst shape)", "<= 1.2x")
    for scheme_id in ids:
        for n in (1, 256):
            cands = [
                (r["ours_lora_ms"] / r["ours_ms"], r["shape"])
                for r in find(rows, scheme=scheme_id, dtype="fp32", tokens=n)
            ]
            worst(cands, 1.1, f"LoRA r=16 N={n} {scheme_id}: ours + LoRA / ours base (worst shape)", "<= 1.10x")
    for scheme_id in ids:
        cands = [
            (r["ours_ms"] / r["dense_ms"], r["shape"])
            for r in find(train_rows, scheme=scheme_id, tokens=256)
            if r.get("ours_ms") and r.get("dense_ms")
        ]
        failed = [r["shape"] for r in find(train_rows, scheme=scheme_id, tokens=256) if "ours_status" in r]
        if failed:  # a step that raises fails both training targets
            for what, limit in (("time", "<= 1.3x"), ("peak memory", "<= 1.0x")):
                name = f"training N=256 {scheme_id}: ours / dense PEFT LoRA {what}"
                out.append(
                    {"target": name, "limit": limit, "measured": f"ours raised ({', '.join(failed)})", "result": "FAIL"}
                )
            continue
        worst(cands, 1.3, f"training N=256 {scheme_id}: ours / dense PEFT LoRA time (worst shape)", "<= 1.3x")
        cands = [
            (r["ours_peak"] / r["dense_peak"], r["shape"])
            for r in find(train_rows, scheme=scheme_id, tokens=256)
            if r.get("ours_peak") and r.get("dense_peak")
        ]
        name = f"training N=256 {scheme_id}: ours / dense PEFT LoRA peak memory (worst shape)"
        worst(cands, 1.0, name, "<= 1.0x", fmt="{:.3f}x")
    for scheme_id in ids:
        fp32 = find(rows, shape="4096x4096", scheme=scheme_id, dtype="fp32", tokens=1)
        bf16 = find(rows, shape="4096x4096", scheme=scheme_id, dtype="bf16", tokens=1)
        value = bf16[0]["ours_ms"] / fp32[0]["ours_ms"] if fp32 and bf16 else None
        add(
            f"decode N=1 4096x4096 {scheme_id}: ours bf16 / ours fp32",
            "<= 1.0x",
            value,
            None if value is None else value <= 1.0,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Output


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
        text = bc.fmt_ms(cell["ms"])
        return f"{text} (err {bc.fmt_err(cell.get('err'))})" if with_err else text
    return notes(cell["status"])


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def markdown(args, info, rows, train_rows, target_rows, numba_default: Optional[int]) -> str:
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
        f"LoRA r={bc.LORA_RANK}, alpha={bc.LORA_ALPHA}. *ours* = `aqlm_lora.ops.aqlm_gemm` / `aqlm_lora_linear`"
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
                bc.fmt_ms(r["ours_ms"]),
                bc.fmt_ms(r["ours_lora_ms"]),
                stock_text(r.get("peft"), notes),
                stock_text(r.get("aqlm"), notes),
                stock_text(r.get("aqlm_mt"), notes, with_err=True) if r["scheme"] != "1x16" else "n/a (no numba)",
                bc.fmt_ms(r["dense_ms"]),
                bc.fmt_ms(r["dense_lora_ms"]),
                f"{r['ours_ms'] / r['dense_ms']:.2f}x",
                f"{100 * (r['ours_lora_ms'] / r['ours_ms'] - 1):+.0f}%",
                f"{bc.fmt_err(r['ours_err'])} / {bc.fmt_err(r['ours_lora_err'])}",
                bc.fmt_err(r["dense_err"]),
                bc.fmt_err((r.get("peft") or {}).get("err")),
            ]
        )
    parts += [md_table(header, body), ""]
    parts += [
        f"## Training step (fp32, forward + backward, LoRA r={bc.LORA_RANK}), median ms and peak memory",
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
                notes(r.get("ours_status")) if "ours_status" in r else bc.fmt_ms(r.get("ours_ms")),
                notes(stock.get("status")) if "status" in stock else bc.fmt_ms(stock.get("ms")),
                notes(r.get("dense_status")) if "dense_status" in r else bc.fmt_ms(r.get("dense_ms")),
                ratio,
                bc.fmt_bytes(r.get("ours_peak")),
                bc.fmt_bytes(stock.get("peak")),
                bc.fmt_bytes(r.get("dense_peak")),
                bc.fmt_err(r.get("ours_err")),
                bc.fmt_err(stock.get("err")),
            ]
        )
    parts += [md_table(header, body), ""]
    if notes.items:
        parts += ["Errors:", "", notes.render(), ""]
    return "\n".join(parts)


def write_csv(path: Path, rows: list[dict], train_rows: list[dict]) -> None:
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


def plot(path: Path, rows: list[dict], shapes, schemes) -> None:
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
                sel = find(rows, shape=shape_id(shape), scheme=scheme.id, dtype=dtype)
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
            ax.set_title(f"{shape_id(shape)} (out x in), {scheme.id} g8")
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


# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        return worker_main(args.worker)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    info = bc.machine_info(torch.get_num_threads())
    log(f"machine: {info}")

    weights: dict = {}
    rows: list[dict] = []
    train_rows: list[dict] = []
    for shape in args.shape_list:
        for scheme in args.scheme_list:
            w = bc.make_weights(shape[0], shape[1], scheme)
            weights[(shape, scheme)] = w
            rows += measure_inference(args, shape, scheme, w)
            train_rows += measure_training(args, shape, scheme, w)

    numba_default = None
    if not args.no_stock:
        single_job, multi_job = stock_jobs(args, weights)
        try:
            single = run_worker(single_job, numba_threads=1)
            multi = run_worker(multi_job, numba_threads=None) if multi_job["groups"] else None
        except RuntimeError as err:  # keep our own numbers; the stock columns stay empty
            log(f"WARNING: {err}")
        else:
            numba_default = multi["numba_threads"] if multi else None
            merge_stock(rows, train_rows, single, multi)

    info["load average (1/5/15 min) at end"] = bc.load_average()
    info["benchmark wall time"] = f"{(time.perf_counter() - START) / 60:.1f} min"
    target_rows = targets(rows, train_rows, args.scheme_list)
    text = markdown(args, info, rows, train_rows, target_rows, numba_default)
    print(text)
    (args.out / "bench_linear.md").write_text(text)
    write_csv(args.out / "bench_linear.csv", rows, train_rows)
    plot(args.out / "bench_linear.png", rows, args.shape_list, args.scheme_list)
    log(f"wrote {args.out / 'bench_linear.md'}, .csv, .png")


if __name__ == "__main__":
    main()
