"""CPU benchmark of one AQLM linear layer: our fused ops vs aqlm, PEFT and dense PyTorch (issue 5).

Run from the repository root with the project's venv::

    .venv/bin/python benchmarks/cpu/bench_linear.py --quick      # ~2-3 min: 4096x4096, N = 1, 16, 256
    .venv/bin/python benchmarks/cpu/bench_linear.py              # full sweep, ~25 min
    .venv/bin/python benchmarks/cpu/bench_linear.py --shapes 4096x4096 --schemes 2x8 --tokens 1,4 --dtypes fp32

What is measured, for shapes (out x in), schemes 1x16 g8 / 2x8 g8, tokens N and dtypes fp32/bf16,
all on the same deterministic weights (``measure.make_weights``, from ``aqlm_lora.scheme.random_weight``):

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

This file parses the arguments and runs the stock subprocesses; its siblings do the rest:
``measure.py`` (weights, references, timing, peak memory, machine info), ``measure_ours.py`` (our
kernels and the dense baselines), ``stock_worker.py`` (aqlm/PEFT, inside the subprocess),
``targets.py`` (the README's targets) and ``report.py`` (markdown, CSV, plot).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import measure as bc
import torch
from measure_ours import measure_inference, measure_training
from report import markdown, plot, write_csv
from stock_worker import ERR_CALLS_THREADED, worker_main
from targets import targets

from aqlm_lora.scheme import Scheme, parse_scheme

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"  # the committed full-run results
ALL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
ALL_TOKENS = [1, 4, 16, 64, 256, 1024]
ALL_SCHEMES = [Scheme(1, 16), Scheme(2, 8)]


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
    p.add_argument("--schemes", help="comma list of schemes CxB[g<in>][o<out>], e.g. 1x16,2x8")
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
    try:
        args.scheme_list = [parse_scheme(s) for s in args.schemes.split(",")] if args.schemes else ALL_SCHEMES
    except ValueError as err:
        p.error(str(err))
    args.dtype_list = args.dtypes.split(",") if args.dtypes else list(bc.DTYPES)
    for name in args.dtype_list:
        if name not in bc.DTYPES:
            p.error(f"unknown dtype {name!r}; use {','.join(bc.DTYPES)}")
    args.tokens_by_dtype = {name: tokens_for(args, name) for name in args.dtype_list}
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
        bc.log(f"stock aqlm/PEFT subprocess, NUMBA_NUM_THREADS={label}")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)], env=env)
        result_path = path.with_suffix(".out.json")
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"stock-aqlm subprocess failed (exit code {proc.returncode}); see its output above")
        return json.loads(result_path.read_text())


def stock_jobs(args: argparse.Namespace, weights: dict) -> tuple[dict, dict]:
    """Jobs for the NUMBA_NUM_THREADS=1 subprocess and the default-threads one."""
    common = {"threads": args.threads, "min_run_time": args.min_run_time, "quick": args.quick}
    single: dict[str, Any] = {**common, "groups": [], "training": [], "err_calls": 1}
    multi: dict[str, Any] = {**common, "groups": [], "training": [], "err_calls": ERR_CALLS_THREADED}
    for (shape, scheme), w in weights.items():
        for dtype_name in args.dtype_list:
            group = {"out": shape[0], "in": shape[1], "scheme": str(scheme), "dtype": dtype_name}
            group.update({"tokens": args.tokens_by_dtype[dtype_name], "fingerprint": w.fingerprint()})
            single["groups"].append({**group, "columns": ["aqlm", "peft"]})
            if scheme.nbits == 8:  # only the 8-bit path runs numba; 1x16 is dequantize + F.linear
                multi["groups"].append({**group, "columns": ["aqlm"]})
        for n in args.train_list:
            single["training"].append({"out": shape[0], "in": shape[1], "scheme": str(scheme), "tokens": n})
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


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        return worker_main(args.worker)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    info = bc.machine_info(torch.get_num_threads())
    bc.log(f"machine: {info}")

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
            bc.log(f"WARNING: {err}")
        else:
            numba_default = multi["numba_threads"] if multi else None
            merge_stock(rows, train_rows, single, multi)

    info["load average (1/5/15 min) at end"] = bc.load_average()
    info["benchmark wall time"] = f"{(time.perf_counter() - bc.START) / 60:.1f} min"
    target_rows = targets(rows, train_rows, args.scheme_list)
    text = markdown(args, info, rows, train_rows, target_rows, numba_default)
    print(text)
    (args.out / "bench_linear.md").write_text(text)
    write_csv(args.out / "bench_linear.csv", rows, train_rows)
    plot(args.out / "bench_linear.png", rows, args.shape_list, args.scheme_list)
    bc.log(f"wrote {args.out / 'bench_linear.md'}, .csv, .png")


if __name__ == "__main__":
    main()
