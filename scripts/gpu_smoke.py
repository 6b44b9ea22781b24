#!/usr/bin/env python3
"""Smoke test of every aqlm_lora op on one device against ``aqlm_lora.reference``.

Run from anywhere after the extension is built (``scripts/gpu_check.sh`` runs it on a GPU box)::

    python scripts/gpu_smoke.py                 # CUDA (the default)
    python scripts/gpu_smoke.py --device cpu    # the same comparisons on the CPU kernels

Needs only torch and the built extension (no aqlm, peft or pytest). What it compares, each op's
output against the reference with a tolerance relative to the output's largest value
(scripts/gpu/smoke_cases.py holds the tolerances and the schemes):

- that every op the library registers has a kernel for the device and a comparison here;
- every decode GEMV variant and the tiled (dequantize + cuBLAS) path: schemes that pick the
  in_group-8 shared-memory kernel (also above the 48 KiB default dynamic shared memory, which
  needs the opt-in attribute, and the largest codebooks that still fit the device's opt-in limit),
  the in_group-8 global-memory kernel (1x16, and 8-bit codebooks too large for the opt-in shared
  memory, which must fall back to it), the generic kernel; float32/16/bf16/64, mixed dtypes,
  N = 0, leading dims, strided input, misaligned codebooks, large decode shapes
  (scripts/gpu/smoke_checks.py);
- dropout masks bit for bit, and masks / LoRA dropout over tensors with more elements than
  ``--index-limit`` (2**32 on CUDA: element indices above 2**31 and 2**32), checked against the
  reference's Philox words on windows around those indices (scripts/gpu/smoke_big_index.py);
- CUDA only: every op on a non-default stream (same results as on the default stream, and
  ordered after earlier work queued on that stream), and, with the profiler, which GEMV kernel
  ran for each threshold scheme (a mismatch is a warning: the comparisons still ran).

Prints one line per check and ends with ``gpu_smoke: <checks> checks, <failures> failures,
<warnings> warnings in <seconds>s on <device>``; exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
# The source tree's aqlm_lora (the ops need only torch and the built _C), and this script's modules.
for _path in (HERE.parent, HERE / "gpu"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import smoke_big_index as big_index  # noqa: E402
import smoke_checks as checks  # noqa: E402
from smoke_session import Smoke  # noqa: E402


def free_memory(dev: torch.device) -> Optional[int]:
    if dev.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Smoke:
    dev = torch.device(args.device)
    s = Smoke(dev, log)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    log(
        f"gpu_smoke: torch {torch.__version__}, device {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    )
    if dev.type == "cuda" and not torch.cuda.is_available():
        s.record("torch.cuda.is_available()", False, "False: no usable GPU")
        return s
    if not checks.check_registration(s):
        return s
    tokens = tuple(int(t) for t in args.tokens.split(","))
    limit = args.index_limit or (2**32 if dev.type == "cuda" else 2**16)
    with s.section("schemes: every decode kernel variant and the tiled path"):
        checks.check_schemes(s, tokens)
    with s.section("dtypes, N = 0, strides, alignment, large shapes"):
        checks.check_extras(s, large=not args.quick)
    with s.section("dropout masks"):
        checks.check_small_masks(s)
    if dev.type == "cuda":
        with s.section("non-default CUDA stream"):
            checks.check_streams(s)
        with s.section("which GEMV kernel each threshold scheme ran (profiler)"):
            checks.check_branches(s)
    free = free_memory(dev)
    # Skipped with a warning where less device memory is free than a section needs.
    for title, need, fn in big_index.big_sections(s, limit):
        if args.no_big:
            s.warn(f"skipped (--no-big): {title}")
            continue
        if free is not None and free < need:
            s.warn(f"skipped: {title} needs ~{need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free")
            continue
        with s.section(title):
            fn()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # Last, so the sections above draw the same random inputs whatever this one needs.
    with s.section("every registered op has a comparison"):
        checks.check_coverage(s)
    if s.failures:
        more = " ..." if len(s.failures) > 20 else ""
        s.log(f"gpu_smoke: failed checks: {'; '.join(s.failures[:20])}{more}")
    s.log(
        f"gpu_smoke: {s.checks} checks, {len(s.failures)} failures, {len(s.warnings)} warnings "
        f"in {time.perf_counter() - t0:.1f}s on {dev}"
    )
    return s


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="device to test (default cuda; cpu runs the same comparisons)")
    p.add_argument("--tokens", default="1,2,5,8,40", help="token counts N per scheme (decode is N <= 2)")
    p.add_argument(
        "--index-limit",
        type=int,
        default=0,
        help="large-index checks go past this many elements (default 2**32 on CUDA, 2**16 on CPU)",
    )
    p.add_argument("--no-big", action="store_true", help="skip the large-index checks")
    p.add_argument("--quick", action="store_true", help="skip the 4096x4096 shapes")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    s = run(parse_args(argv))
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
