"""Our kernels and the dense baselines, measured in the benchmark's main process.

Inference: ``aqlm_lora.ops.aqlm_gemm`` / ``aqlm_lora_linear`` vs ``F.linear`` and PEFT's dense
``lora.Linear``, timed interleaved. Training: one forward + backward of ``aqlm_lora.AqlmLoraLinear``
vs PEFT's dense LoRA, with peak memory and gradient error.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import measure as bc
import torch
import torch.nn.functional as F
from report import fmt_bytes, fmt_err, fmt_ms

from aqlm_lora.scheme import Scheme


def measure_inference(args: argparse.Namespace, shape, scheme: Scheme, w: bc.Weights) -> list[dict[str, Any]]:
    from aqlm_lora import ops

    rows = []
    for dtype_name in args.dtype_list:
        dtype = bc.DTYPES[dtype_name]
        dense_fp32 = w.dense(dtype)
        dense = dense_fp32.to(dtype)
        codes, codebooks, scales = w.args_as(dtype)
        peft_dense = bc.dense_peft_layer(dense, w, requires_grad=False).eval()
        for n in args.tokens_by_dtype[dtype_name]:
            x = bc.make_input(n, w.in_features, dtype)
            ref_base, ref_lora = bc.reference(w, dense_fp32, x)

            def base(x=x, codes=codes, codebooks=codebooks, scales=scales):
                with torch.no_grad():
                    return ops.aqlm_gemm(x, codes, codebooks, scales, None)

            def lora(x=x, codes=codes, codebooks=codebooks, scales=scales):
                with torch.no_grad():
                    return ops.aqlm_lora_linear(
                        x, codes, codebooks, scales, None, w.lora_A, w.lora_B, w.scaling, training=False
                    )

            def dense_linear(x=x, dense=dense):
                with torch.no_grad():
                    return F.linear(x, dense)

            def dense_lora(x=x, layer=peft_dense):
                with torch.no_grad():
                    return layer(x)

            row: dict[str, Any] = {"shape": bc.shape_id(shape), "scheme": str(scheme), "dtype": dtype_name, "tokens": n}
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
            bc.log(
                f"{row['shape']} {scheme} {dtype_name} N={n}: ours {fmt_ms(row['ours_ms'])} ms, "
                f"+LoRA {fmt_ms(row['ours_lora_ms'])}, dense {fmt_ms(row['dense_ms'])}, "
                f"err {fmt_err(row['ours_err'])}"
            )
            rows.append(row)
    return rows


def measure_train_step(layer, x, g, refs, args: argparse.Namespace) -> dict[str, Any]:
    """Time, peak memory and gradient error of one training step of ``layer``."""
    timed, clear, step, grads = bc.training_step(layer, x, g)
    clear()
    peak = bc.peak_memory_bytes(step)  # the first step, profiled, also gives the gradients to check
    err = max(bc.rel_err(a, b) for a, b in zip(grads(), refs))
    ms, iqr = bc.time_ms(timed, args.min_run_time, args.threads)
    return {"ms": ms, "iqr": iqr, "peak": peak, "err": err}


def measure_training(args: argparse.Namespace, shape, scheme: Scheme, w: bc.Weights) -> list[dict[str, Any]]:
    from aqlm_lora import AqlmLoraLinear

    dense_fp32 = w.dense(torch.float32)
    rows = []
    for n in args.train_list:
        x = bc.make_input(n, w.in_features, torch.float32).requires_grad_(True)
        g = bc.make_input(n, w.out_features, torch.float32, seed=99)
        refs = bc.ref_grads(w, dense_fp32, x.detach(), g)
        row: dict[str, Any] = {"shape": bc.shape_id(shape), "scheme": str(scheme), "tokens": n}
        ours = bc.lora_layer(AqlmLoraLinear, bc.make_aqlm_layer(w.base, torch.float32), w, requires_grad=True)
        for key, layer in [("ours", ours), ("dense", bc.dense_peft_layer(dense_fp32, w, requires_grad=True))]:
            try:
                result = measure_train_step(layer, x, g, refs, args)
                row.update({f"{key}_{k}": v for k, v in result.items()})
            except Exception as err:
                row[f"{key}_status"] = f"error: {bc.first_sentence(err)}"
        bc.log(
            f"train {row['shape']} {scheme} N={n}: ours {fmt_ms(row.get('ours_ms'))} ms "
            f"{fmt_bytes(row.get('ours_peak'))}, dense PEFT {fmt_ms(row.get('dense_ms'))} ms "
            f"{fmt_bytes(row.get('dense_peak'))}"
        )
        rows.append(row)
    return rows
