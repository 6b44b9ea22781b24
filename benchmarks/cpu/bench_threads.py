"""Training-step times with 1 vs 2 threads while another process keeps a core busy (README: Performance tips).

Run from the repository root with the project's venv (about 10 minutes on a busy 2-core machine,
most of it the stalled 2-thread steps)::

    .venv/bin/python benchmarks/cpu/bench_threads.py
    .venv/bin/python benchmarks/cpu/bench_threads.py --steps 10 --max-seconds 5   # shorter

Each setting runs in its own process (OpenMP reads its environment once, at start-up): the small
demo's Llama (``aqlm_lora.app.demo.build_model``: 4 layers, hidden 128, MLP 384, byte vocabulary)
as AQLM 2x8 with our LoRA (``target_modules="all-linear"``) and as a dense model with PEFT's LoRA,
LoRA r=16, AdamW steps on a batch of 4 x 128 tokens. Settings: torch/OpenMP threads 1 and 2, and 2 threads with
``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep at once instead of spinning) or with
``GOMP_SPINCOUNT=10000`` (libgomp spins 30x less than its default 300000, then sleeps); each on its
own and next to one busy-looping process (``--load``, default 1). A model's timed steps stop after
``--steps`` steps or ``--max-seconds`` of steps (at least 5 steps), whichever comes first.
Printed: median, 90th percentile and worst step, and how many steps took over 5x the median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import measure

MIN_STEPS = 5  # timed steps per model even past --max-seconds
SETTINGS = [
    ("1 thread", 1, {}),
    ("2 threads", 2, {}),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("2 threads, GOMP_SPINCOUNT=10000", 2, {"GOMP_SPINCOUNT": "10000"}),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per model and setting (default 20)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="stop a model's steps after this (default 10)")
    p.add_argument("--load", type=int, default=1, help="busy-looping processes in the loaded runs (default 1)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: threads, as a string
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Worker: one setting, both models


def _models():
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import aqlm_lora
    from aqlm_lora.app.demo import DemoConfig, build_model
    from aqlm_lora.app.text import ByteTokenizer
    from aqlm_lora.scheme import Scheme

    dense = build_model(DemoConfig(), ByteTokenizer(), seed=0)  # the small demo's model, as it builds it
    quantized = copy.deepcopy(dense)
    for name, module in list(quantized.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":  # random codes: the time is what counts
            weights = measure.make_weights(module.out_features, module.in_features, Scheme(2, 8))
            quantized.set_submodule(name, measure.make_aqlm_layer(weights.base, torch.float32))
    lora = dict(r=measure.LORA_RANK, lora_alpha=measure.LORA_ALPHA, lora_dropout=0.05, target_modules="all-linear")
    return {
        "aqlm_lora": get_peft_model(quantized, aqlm_lora.register(LoraConfig(**lora))),
        "dense PEFT": get_peft_model(dense, LoraConfig(**lora)),
    }


def worker(threads: int, steps: int, max_seconds: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(1))
    result = {}
    for name, model in _models().items():
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times: list[float] = []
        for step in range(steps + 1):
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
            if len(times) >= MIN_STEPS and sum(times) > max_seconds:
                break
        result[name] = times
    return result


# ---------------------------------------------------------------------------------------------
# Driver


def _summary(times: list[float]) -> str:
    if not times:
        return "no steps"
    ordered = sorted(times)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    stalls = sum(t > 5 * median for t in ordered)
    return (
        f"median {median * 1e3:7.1f} ms, p90 {p90 * 1e3:7.1f} ms, worst {ordered[-1] * 1e3:7.1f} ms, "
        f"{stalls:2d}/{len(ordered)} steps > 5x median"
    )


def _run_setting(args, threads: int, extra_env: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra_env)
    env.setdefault("NUMBA_NUM_THREADS", "1")
    command = [sys.executable, __file__, "--worker", str(threads), "--steps", str(args.steps)]
    command += ["--max-seconds", str(args.max_seconds)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(json.dumps(worker(int(args.worker), args.steps, args.max_seconds)))
        return
    print(f"{os.cpu_count()} logical CPUs; load average (1/5/15 min) at start {measure.load_average()}", flush=True)
    for load in (0, args.load):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            for label, threads, extra_env in SETTINGS:
                result = _run_setting(args, threads, extra_env)
                for model, times in result.items():
                    print(f"busy processes {load} | {label:36s} | {model:10s} | {_summary(times)}", flush=True)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()


if __name__ == "__main__":
    main()
