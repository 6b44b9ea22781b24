"""aqlm's and PEFT's stock layers, measured in a subprocess of the benchmark.

numba reads ``NUMBA_NUM_THREADS`` once, at import, so each thread count needs its own process:
``bench_linear.py --worker JOB`` runs ``worker_main(JOB)``, which rebuilds the main process's
weights from the same seeds (checked by fingerprint), measures the job's cells and writes
``JOB.out.json`` next to the job file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import measure as bc
import torch

from aqlm_lora.scheme import parse_scheme

MAX_CALL_S = 2.0  # skip a stock aqlm/PEFT cell (and larger N) once one call takes longer
MAX_STEP_S = 4.0  # the same for one stock PEFT + aqlm training step
QUICK_STOCK_MAX_N = 64
ERR_CALLS_THREADED = 20  # calls whose worst error is reported for aqlm with numba's default threads


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
        state["error"] = f"error: {bc.first_sentence(err)}"
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

    scheme = parse_scheme(group["scheme"])
    w = bc.make_weights(group["out"], group["in"], scheme)
    if w.fingerprint() != group["fingerprint"]:
        raise RuntimeError("the subprocess rebuilt different weights than the main process")
    dtype = bc.DTYPES[group["dtype"]]
    dense_fp32 = w.dense(dtype)
    base = bc.make_aqlm_layer(w.base, dtype)
    peft = bc.lora_layer(PeftAqlmLoraLinear, base, w, requires_grad=False).eval()
    states: dict[str, dict[str, Any]] = {col: {} for col in group["columns"]}
    try:  # first call: numba compiles, aqlm permutes its codes
        with torch.no_grad():
            base(bc.make_input(1, w.in_features, dtype))
    except Exception as err:
        for state in states.values():
            state["error"] = f"error: {bc.first_sentence(err)}"
    rows = []
    for n in group["tokens"]:
        x = bc.make_input(n, w.in_features, dtype)
        ref_base, ref_lora = bc.reference(w, dense_fp32, x)
        row: dict[str, Any] = {"shape": f"{w.out_features}x{w.in_features}", "scheme": str(scheme)}
        row.update({"dtype": group["dtype"], "tokens": n})
        for col in group["columns"]:
            module, ref = (base, ref_base) if col == "aqlm" else (peft, ref_lora)

            def fn(module=module, x=x):
                with torch.no_grad():
                    return module(x)

            row[col] = stock_cell(fn, ref, n, states[col], job)
        bc.log(f"  stock {row['shape']} {scheme} {group['dtype']} N={n}: {json.dumps({c: row[c] for c in states})}")
        rows.append(row)
    return rows


def worker_training(item: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from peft.tuners.lora.aqlm import AqlmLoraLinear as PeftAqlmLoraLinear

    scheme = parse_scheme(item["scheme"])
    w = bc.make_weights(item["out"], item["in"], scheme)
    n = item["tokens"]
    row: dict[str, Any] = {"shape": f"{w.out_features}x{w.in_features}", "scheme": str(scheme), "tokens": n}
    dense_fp32 = w.dense(torch.float32)
    layer = bc.lora_layer(PeftAqlmLoraLinear, bc.make_aqlm_layer(w.base, torch.float32), w, requires_grad=True)
    x = bc.make_input(n, w.in_features, torch.float32).requires_grad_(True)
    g = bc.make_input(n, w.out_features, torch.float32, seed=99)
    refs = bc.ref_grads(w, dense_fp32, x.detach(), g)
    timed, clear, step, grads = bc.training_step(layer, x, g)
    try:
        begin = time.perf_counter()
        row["peak"] = bc.peak_memory_bytes(step)  # first step, profiled: peak memory and gradients
        single = time.perf_counter() - begin
    except Exception as err:
        row["status"] = f"error: {bc.first_sentence(err)}"
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
        bc.log(f"  stock train {row['shape']} {row['scheme']} N={row['tokens']}: {row}")
        result["training"].append(row)
    path.with_suffix(".out.json").write_text(json.dumps(result))
