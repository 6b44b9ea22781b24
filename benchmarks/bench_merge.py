"""Merging an adapter into the demo model: perplexity and time of each deployable form.

Reads the output of ``aqlm-lora demo`` (runs it first into ``--work`` when ``--demo-dir`` is not
given) and measures, on its validation split, in one process:

- AQLM: the quantized checkpoint on our kernels;
- AQLM + LoRA (unmerged): the demo's adapter loaded through PEFT;
- merged dense: ``aqlm_lora.merge_and_unload`` (exact, every adapted layer a dense ``nn.Linear``);
- merged re-quantized: ``aqlm_lora.merge_and_quantize`` (same AQLM scheme, warm-started);
- merged re-quantized + codebook tuning: the same with ``calibration`` windows from the demo's
  training text (codebooks and scales fitted to the adapted model's outputs, codes fixed).

"gain kept" is the share of the adapter's log-perplexity gain that a form keeps:
``(log ppl_AQLM - log ppl_form) / (log ppl_AQLM - log ppl_LoRA)`` (the goal for re-quantizing: at
least 70%). Times are wall seconds of building each merged form from the loaded PEFT model; the
quantization and fine-tuning times of the first two forms come from the demo's ``results.json``.
Prints a markdown table; writes ``bench_merge.csv``, ``bench_merge.md`` and ``bench_merge.png`` to
``--out``.

    python benchmarks/bench_merge.py --demo-dir /tmp/aqlm_lora_demo --out benchmarks/results/merge
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from plotting import pyplot, save_figure, write_csv  # benchmarks/plotting.py (scripts run with benchmarks/ on sys.path)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo-dir", default=None, help="output folder of `aqlm-lora demo` (default: run it into --work)")
    p.add_argument("--work", default=None, help="where to run the demo when --demo-dir is not given")
    p.add_argument("--rounds", type=int, default=2, help="refinement rounds of merge_and_quantize (default 2)")
    p.add_argument("--tune-steps", type=int, default=100, help="codebook-tuning Adam steps (default 100)")
    p.add_argument("--tune-lr", type=float, default=1e-4, help="codebook-tuning learning rate (default 1e-4)")
    p.add_argument("--calibration-windows", type=int, default=64, help="training windows for tuning (default 64)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="benchmarks/results/merge", help="folder for the CSV, markdown and plot")
    return p.parse_args(argv)


def _demo_dir(args: argparse.Namespace) -> Path:
    if args.demo_dir:
        return Path(args.demo_dir)
    from aqlm_lora.app.demo import run_demo

    work = Path(args.work or tempfile.mkdtemp(prefix="aqlm_lora_bench_merge_")) / "demo"
    run_demo(str(work), overwrite=True, progress=False)
    return work


class _Forms:
    """Loads the demo's AQLM model afresh for each form (merging consumes the PEFT model)."""

    def __init__(self, demo: Path) -> None:
        from aqlm_lora.app.data import load_tokenizer, read_data

        self.results = json.loads((demo / "results.json").read_text())
        scheme = self.results["scheme"]
        self.model_dir = demo / f"aqlm-{scheme}"
        self.adapter_dir = demo / "adapter"
        self.seq = self.results["config"]["seq"]
        tokenizer = load_tokenizer(self.model_dir)
        self.valid = read_data(demo / "data" / "valid.txt", tokenizer, "text").tokens
        self.train = read_data(demo / "data" / "train.txt", tokenizer, "text").tokens
        self.scheme = scheme

    def aqlm(self):
        from aqlm_lora.app.models import load_causal_lm
        from aqlm_lora.lora.fused_base import use_fused_kernels

        model = load_causal_lm(self.model_dir, torch.float32)
        use_fused_kernels(model)
        return model

    def adapted(self):
        from aqlm_lora.app.adapters import load_adapter

        return load_adapter(self.aqlm(), self.adapter_dir)

    def calibration(self, count: int) -> torch.Tensor:
        from aqlm_lora.app.text import sample_windows

        return sample_windows(self.train, self.seq, count)

    def perplexity(self, model) -> float:
        from aqlm_lora.app.text import perplexity

        with torch.no_grad():
            return perplexity(model, self.valid, self.seq)


def _timed(build: Callable[[object], object], start_from: object) -> tuple[object, float]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merge_and_unload's size warning: the table reports sizes
        result = build(start_from)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    from aqlm_lora.lora.merge import merge_and_unload, tensor_bytes
    from aqlm_lora.lora.requantize import merge_and_quantize

    forms = _Forms(_demo_dir(args))
    calibration = forms.calibration(args.calibration_windows)
    # (form, what its time measures, how to build it from a freshly loaded PEFT model)
    builds: list[tuple[str, str, Callable[[object], object]]] = [
        ("AQLM", "load", lambda _: forms.aqlm()),
        ("AQLM + LoRA (unmerged)", "load + adapter", lambda _: forms.adapted()),
        ("merged dense (merge_and_unload)", "merge", merge_and_unload),
        (
            f"merged re-quantized ({args.rounds} rounds)",
            "merge + re-quantize",
            lambda peft_model: merge_and_quantize(peft_model, rounds=args.rounds),
        ),
        (
            f"merged re-quantized + codebook tuning ({args.tune_steps} steps, {len(calibration)} windows)",
            "merge + re-quantize + tune",
            lambda peft_model: merge_and_quantize(
                peft_model,
                rounds=args.rounds,
                calibration=calibration,
                tune_steps=args.tune_steps,
                tune_lr=args.tune_lr,
            ),
        ),
    ]
    rows = []
    for name, timed_part, build in builds:
        print(f"building: {name}", file=sys.stderr, flush=True)
        start_from = forms.adapted() if timed_part.startswith("merge") else None
        model, seconds = _timed(build, start_from)
        ppl = forms.perplexity(model)
        row = {"form": name, "perplexity": ppl, "timed": timed_part, "seconds": seconds}
        row["weight_mib"] = tensor_bytes(model) / 2**20
        rows.append(row)
        print(f"  perplexity {ppl:.4f}, {timed_part} {seconds:.1f} s", file=sys.stderr, flush=True)
        del model, start_from
    base, lora = math.log(rows[0]["perplexity"]), math.log(rows[1]["perplexity"])
    for row in rows:
        row["gain_kept"] = (base - math.log(row["perplexity"])) / (base - lora) if base != lora else float("nan")
    table = _table(forms, rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_merge.md").write_text(table + "\n")
    write_csv(out / "bench_merge.csv", rows)
    _plot(rows, out / "bench_merge.png")
    print(f"wrote {out / 'bench_merge.md'}, .csv, .png", file=sys.stderr)
    return 0


def _table(forms: _Forms, rows: list[dict]) -> str:
    quant_s = forms.results.get("quant_seconds")
    lines = [
        f"| demo model ({forms.scheme}, validation split) | perplexity | gain kept | time to make it | weights |",
        "| --- | --- | --- | --- | --- |",
    ]
    phases = forms.results.get("phase_seconds", {})
    # The first two forms were made by the demo: their time is the demo's quantization and fine-tuning.
    made_by_demo = [
        f"quantization (in the demo): {quant_s:.1f} s" if quant_s else "-",
        f"LoRA fine-tuning (in the demo): {phases['lora_training']:.1f} s" if "lora_training" in phases else "-",
    ]
    for i, row in enumerate(rows):
        kept = "-" if i == 0 else f"{100 * row['gain_kept']:.0f}%"
        made = made_by_demo[i] if i < 2 else f"{row['timed']}: {row['seconds']:.1f} s"
        lines.append(f"| {row['form']} | {row['perplexity']:.4f} | {kept} | {made} | {row['weight_mib']:.1f} MiB |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [row["form"].split(" (")[0] for row in rows]
    ax.barh(names[::-1], [row["perplexity"] for row in rows][::-1], color="tab:blue")
    ax.set_xlabel("validation perplexity (lower is better)")
    low = min(row["perplexity"] for row in rows)
    ax.set_xlim(low * 0.98, max(row["perplexity"] for row in rows) * 1.01)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
