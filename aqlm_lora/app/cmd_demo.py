"""``aqlm-lora demo [--size small|medium]``: the end-to-end runs of :mod:`aqlm_lora.app.demo` and
:mod:`aqlm_lora.app.demo_medium`."""

from __future__ import annotations

from .demo import run_demo
from .demo_medium import run_medium_demo

DEMO_SIZES = ("small", "medium")
# Default output folder of each size (two folders, so one run never asks to overwrite the other).
DEMO_OUT = {"small": "aqlm_lora_demo", "medium": "aqlm_lora_demo_medium"}


def run(args) -> int:
    demo = run_medium_demo if args.size == "medium" else run_demo
    out = args.out if args.out is not None else DEMO_OUT[args.size]
    return demo(out, overwrite=args.overwrite, seed=args.seed, progress=not args.no_progress)
