#!/usr/bin/env python3
"""Times the CUDA decode kernels (``ops.aqlm_gemm`` and ``ops.lora_forward`` at N <= 8) under several
grid sizes, to choose the default blocks per SM of csrc/cuda/decode.cu's GEMV launches.

    python scripts/gpu/gemv_grid_sweep.py --values 0,1,4,8,16 --out sweep.md

Each value runs in its own process with AQLM_LORA_CUDA_GEMV_BLOCKS_PER_SM set (0: the build's
defaults: as many blocks per SM as are resident for the shared-memory kernel, 8 for the others);
the library reads it once per process. Times are CUDA-graph replays (benchmarks/bench_cuda.py
``time_graph_us``), fp16, the same random weights as the benchmark. The grid never changes results
(every row is computed by one warp the same way whichever warp takes it), only speed. Prints a
markdown table, the fastest value per row in bold, and writes it to ``--out``. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cuda", ROOT / "benchmarks" / "bench_cuda.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_cuda"] = bench  # its dataclasses look the module up there
    spec.loader.exec_module(bench)
    return bench


def time_weight(bench, ops, weight, lora_A, lora_B, tokens: list[int], budget: float) -> list[tuple]:
    """(N, op, Timed) for the base op and the LoRA op at each N."""
    import torch

    codes, codebooks, scales = weight.args()
    out = []
    for n in tokens:
        x = torch.randn(n, weight.in_features, device=codes.device, dtype=torch.float16)

        def base(x: torch.Tensor = x) -> object:
            return ops.aqlm_gemm(x, codes, codebooks, scales, None)

        def lora(x: torch.Tensor = x) -> object:
            return ops.lora_forward(
                x, codes, codebooks, scales, None, lora_A, lora_B, None, bench.LORA_SCALING, 0.0, 0, 0
            )

        with torch.no_grad():
            out += [(n, "base", bench.time_graph_us(base, budget)), (n, "lora", bench.time_graph_us(lora, budget))]
    return out


def child(shapes: list[str], schemes: list[str], tokens: list[int], budget: float) -> int:
    """Prints one JSON line per (shape, scheme, N, op): microseconds and the timing mark."""
    import torch

    from aqlm_lora import ops
    from aqlm_lora.scheme import parse_scheme

    bench = load_bench()
    device = torch.device("cuda")
    for shape in shapes:
        out_features, in_features = bench.parse_shape(shape)
        for text in schemes:
            weight, lora_A, lora_B = bench.make_weight(out_features, in_features, parse_scheme(text), device)
            for n, op, (t_us, mark) in time_weight(bench, ops, weight, lora_A, lora_B, tokens, budget):
                row = {"shape": shape, "scheme": text, "n": n, "op": op, "us": t_us, "mark": mark}
                print(json.dumps(row), flush=True)
            del weight, lora_A, lora_B
            torch.cuda.empty_cache()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--values", default="0,1,4,8,16", help="blocks per SM to try (0: the build's defaults)")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,8192x28672")
    p.add_argument("--schemes", default="1x16,2x8")
    p.add_argument("--tokens", default="1,4,8")
    p.add_argument("--budget", type=float, default=0.03)
    p.add_argument("--out", default=None, help="markdown file to write")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes, schemes = args.shapes.split(","), args.schemes.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.child:
        return child(shapes, schemes, tokens, args.budget)

    import torch

    if not torch.cuda.is_available():
        print("gemv_grid_sweep: no CUDA device; nothing to do")
        return 0
    values = [int(v) for v in args.values.split(",")]
    times: dict[tuple, dict[int, str]] = {}
    for value in values:
        env = dict(os.environ)
        env.pop("AQLM_LORA_CUDA_GEMV_BLOCKS_PER_SM", None)
        if value > 0:
            env["AQLM_LORA_CUDA_GEMV_BLOCKS_PER_SM"] = str(value)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--shapes",
            args.shapes,
            "--schemes",
            args.schemes,
            "--tokens",
            args.tokens,
            "--budget",
            str(args.budget),
        ]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            print(f"value {value}: exit {run.returncode}\n{run.stderr[-2000:]}", file=sys.stderr)
            continue
        for line in run.stdout.splitlines():
            r = json.loads(line)
            times.setdefault((r["shape"], r["scheme"], r["n"], r["op"]), {})[value] = (r["us"], r["mark"])
    names = ["default" if v == 0 else str(v) for v in values]
    lines = [
        "| shape | scheme | N | op | " + " | ".join(f"{n} us" for n in names) + " |",
        "|" + "---|" * (4 + len(values)),
    ]
    for (shape, scheme, n, op), by_value in times.items():
        best = min(by_value, key=lambda v: by_value[v][0])
        cells = [
            ("**{:.1f}{}**" if v == best else "{:.1f}{}").format(*by_value[v]) if v in by_value else "n/a"
            for v in values
        ]
        lines.append(f"| {shape} | {scheme} | {n} | {op} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text("# GEMV grid sweep (blocks per SM), CUDA-graph microseconds per call\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
