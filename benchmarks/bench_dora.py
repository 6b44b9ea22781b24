"""DoRA on our AQLM layer vs LoRA on it, and vs PEFT's DoRA on the dense weight: forward and training step.

    .venv/bin/python benchmarks/bench_dora.py [--n 256] [--shape 4096x4096] [--scheme 2x8] [--repeats 15]

One layer, fp32, rank 16. Every variant runs once per repeat, in an order rotated each repeat
(interleaved, so a slow spell of a shared machine hits all of them), and the table shows medians:

- forward (inference): layers kept in ``eval()``, ``no_grad``; our DoRA then reuses its cached row norms;
- forward (training mode): ``train()``, no grad; our DoRA recomputes its norms (one base matmul on r rows);
- training step: forward and backward with gradients for ``x`` and every adapter tensor (A, B, and m for DoRA);
  with ``--dropout p`` DoRA runs the base matmul on ``x`` and on ``dropout(x)`` (PEFT's formula), LoRA once.

Targets (issue 13): our DoRA training step <= 1.25x our LoRA step; our DoRA inference <= 1.05x our LoRA
inference. Prints a markdown table; writes ``bench_dora.md``, ``.csv`` and ``.png`` to ``--out`` (default
``$XDG_CACHE_HOME/aqlm_lora/bench``; the committed results are in ``benchmarks/results/dora/``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from plotting import pyplot, save_figure, write_csv  # benchmarks/plotting.py (scripts run with benchmarks/ on sys.path)
from torch import nn

RANK, ALPHA = 16, 32
CSV_FIELDS = ["layer", "measure", "median_s", "min_s", "max_s", "ratio_to_ours_lora"]


def _parse_shape(text: str) -> tuple[int, int]:
    out_features, _, in_features = text.lower().partition("x")
    return int(out_features), int(in_features)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="tokens (rows of x)")
    p.add_argument("--shape", default="4096x4096", help="OUTxIN")
    p.add_argument("--scheme", default="2x8")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="LoRA dropout while training (DoRA then computes the base matmul twice, on x and on dropout(x), as PEFT)",
    )
    p.add_argument("--skip-peft", action="store_true", help="leave out PEFT's dense DoRA (saves memory and time)")
    p.add_argument("--out", default=None, help="folder for bench_dora.md, .csv and .png")
    return p.parse_args(argv)


def _layers(args: argparse.Namespace) -> dict[str, nn.Module]:
    import aqlm
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    from aqlm_lora import AqlmLoraLinear, ops
    from aqlm_lora.scheme import parse_scheme, random_weight

    scheme = parse_scheme(args.scheme)
    out_features, in_features = _parse_shape(args.shape)
    g = torch.Generator().manual_seed(0)
    weight = random_weight(scheme, out_features, in_features, generator=g)
    lora_A = torch.randn(RANK, in_features, generator=g) / math.sqrt(in_features)
    lora_B = torch.randn(out_features, RANK, generator=g) * (0.1 / math.sqrt(RANK))

    def quantized() -> nn.Module:
        layer = aqlm.QuantizedLinear(in_features, out_features, **scheme.aqlm_kwargs(), bias=False)
        with torch.no_grad():
            layer.codes.data = weight.codes.clone()
            layer.codebooks.copy_(weight.codebooks)
            layer.scales.copy_(weight.scales)
        return layer.requires_grad_(False)

    def adapted(layer: nn.Module) -> nn.Module:
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora_A)
            layer.lora_B["default"].weight.copy_(lora_B)
        return layer

    def config(dora: bool) -> LoraConfig:
        return LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=dora, lora_dropout=args.dropout)

    layers = {
        "ours LoRA": adapted(AqlmLoraLinear(quantized(), "default", config=config(False), r=RANK, lora_alpha=ALPHA)),
        "ours DoRA": adapted(AqlmLoraLinear(quantized(), "default", config=config(True), r=RANK, lora_alpha=ALPHA)),
    }
    if not args.skip_peft:
        dense = nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            dense.weight.copy_(ops.dequantize(*weight.args()))
        layers["PEFT DoRA, dense W"] = adapted(
            PeftLinear(dense.requires_grad_(False), "default", config=config(True), r=RANK, lora_alpha=ALPHA)
        )
    return layers


def _jobs(args: argparse.Namespace, in_features: int) -> dict[tuple[str, str], Callable[[], None]]:
    """Inference runs on its own copies of the layers, kept in eval() (as a served model is); the
    training-mode jobs share the others (train() drops our DoRA's cached norms, as it should)."""
    layers, served = _layers(args), _layers(args)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.n, in_features, generator=g)
    grad = torch.randn(args.n, next(iter(layers.values())).out_features, generator=g)
    jobs = {}
    for name, layer in layers.items():
        params = [p for p in layer.parameters() if p.requires_grad]
        served[name].eval()

        def inference(layer=served[name]):
            with torch.no_grad():
                layer(x)

        def forward_train_mode(layer=layer):
            layer.train()
            with torch.no_grad():
                layer(x)

        def step(layer=layer, params=params):
            layer.train()
            xg = x.detach().requires_grad_(True)
            for p in params:
                p.grad = None
            layer(xg).backward(grad)

        jobs[(name, "forward (inference)")] = inference
        jobs[(name, "forward (training mode)")] = forward_train_mode
        jobs[(name, "training step")] = step
    return jobs


def _measure(jobs: dict, repeats: int, warmup: int) -> dict[tuple[str, str], list[float]]:
    keys = list(jobs)
    for key in keys:
        for _ in range(warmup):
            jobs[key]()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
    for rep in range(repeats):
        order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
        for key in order:
            start = time.perf_counter()
            jobs[key]()
            times[key].append(time.perf_counter() - start)
    return times


def _out_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "aqlm_lora" / "bench"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    out_features, in_features = _parse_shape(args.shape)
    jobs = _jobs(args, in_features)
    layers = list(dict.fromkeys(name for name, _ in jobs))
    times = _measure(jobs, args.repeats, args.warmup)
    medians = {key: statistics.median(values) for key, values in times.items()}
    what = list(dict.fromkeys(kind for _, kind in medians))
    title = f"{args.shape} AQLM {args.scheme}, fp32, N={args.n}, r={RANK}, dropout {args.dropout:g}"
    title += f", {args.threads} threads"
    lines = [
        f"| {title} | " + " | ".join(what) + " |",
        "| --- |" + " --- |" * len(what),
    ]
    rows = []
    for name in layers:
        cells = []
        for kind in what:
            median, lora = medians[(name, kind)], medians[("ours LoRA", kind)]
            cells.append(f"{median * 1e3:.1f} ms ({median / lora:.2f}x ours LoRA)")
            spread = times[(name, kind)]
            seconds = [f"{t:.6f}" for t in (median, min(spread), max(spread))]
            rows.append(dict(zip(CSV_FIELDS, [name, kind, *seconds, f"{median / lora:.4f}"])))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    step = medians[("ours DoRA", "training step")] / medians[("ours LoRA", "training step")]
    infer = medians[("ours DoRA", "forward (inference)")] / medians[("ours LoRA", "forward (inference)")]
    summary = (
        f"ours DoRA / ours LoRA: training step {step:.3f}x (target <= 1.25x: {'PASS' if step <= 1.25 else 'FAIL'}), "
        f"inference {infer:.3f}x (target <= 1.05x: {'PASS' if infer <= 1.05 else 'FAIL'}); "
        f"medians of {args.repeats} interleaved repeats"
    )
    print("\n" + summary)
    out = _out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_dora.md").write_text(table + "\n\n" + summary + "\n")
    _plot(layers, what, medians, title, out / "bench_dora.png")
    write_csv(out / "bench_dora.csv", rows)
    print(f"CSV: {out / 'bench_dora.csv'}", file=sys.stderr)
    return 0


def _plot(layers: list[str], what: list[str], medians: dict, title: str, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(layers)
    for i, name in enumerate(layers):
        xs = [j + i * width for j in range(len(what))]
        ax.bar(xs, [medians[(name, kind)] * 1e3 for kind in what], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(what))], what)
    ax.set_ylabel("ms (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
