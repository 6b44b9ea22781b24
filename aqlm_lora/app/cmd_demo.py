"""``aqlm-lora demo``: the end-to-end run of :mod:`aqlm_lora.app.demo`."""

from __future__ import annotations

from .demo import run_demo


def run(args) -> int:
    return run_demo(args.out, overwrite=args.overwrite, seed=args.seed, progress=not args.no_progress)
