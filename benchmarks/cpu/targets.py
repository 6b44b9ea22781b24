"""The performance targets the README lists under "Benchmarks", checked against one run's rows.

Each target names its limit, the measured value (the worst shape where several are measured) and
PASS / FAIL, or "n/a" when the run did not measure it (a quick or filtered run).
"""

from __future__ import annotations

from typing import Any, Optional

from aqlm_lora.scheme import Scheme


def cell_ms(cell: Any) -> Optional[float]:
    return cell.get("ms") if isinstance(cell, dict) else None


def find(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def targets(rows: list[dict], train_rows: list[dict], schemes: list[Scheme]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(name: str, limit: str, value: Optional[float], ok: Optional[bool], fmt: str = "{:.3f}x", where: str = ""):
        measured = "not measured" if value is None else fmt.format(value) + (f" ({where})" if where else "")
        result = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "limit": limit, "measured": measured, "result": result})

    def worst(candidates: list[tuple[float, str]], limit: float, name: str, limit_text: str, fmt="{:.3f}x") -> None:
        if not candidates:
            return add(name, limit_text, None, None)
        value, where = max(candidates)
        add(name, limit_text, value, value <= limit, fmt=fmt, where=where)

    ids = [str(s) for s in schemes]
    for scheme_id, limit in [("2x8", 0.5), ("1x16", 1.0)]:
        if scheme_id not in ids:
            continue
        r = find(rows, shape="4096x4096", scheme=scheme_id, dtype="fp32", tokens=1)
        value = r[0]["ours_ms"] / r[0]["dense_ms"] if r else None
        add(
            f"decode N=1 4096x4096 {scheme_id}: ours / dense fp32 F.linear",
            f"<= {limit}x",
            value,
            None if value is None else value <= limit,
        )
    for scheme_id in ids:
        r = find(rows, shape="4096x4096", scheme=scheme_id, dtype="fp32", tokens=1)
        stock = cell_ms(r[0].get("aqlm")) if r else None
        value = stock / r[0]["ours_ms"] if stock else None
        add(
            f"decode N=1 4096x4096 {scheme_id}: speed-up over aqlm.QuantizedLinear (numba 1 thread)",
            ">= 10x",
            value,
            None if value is None else value >= 10,
        )
    for scheme_id in ids:
        for n in (256, 1024):
            cands = [
                (r["ours_ms"] / r["dense_ms"], r["shape"]) for r in find(rows, scheme=scheme_id, dtype="fp32", tokens=n)
            ]
            if cands:
                worst(cands, 1.2, f"prefill N={n} {scheme_id}: ours / dense fp32 F.linear (worst shape)", "<= 1.2x")
    for scheme_id in ids:
        for n in (1, 256):
            cands = [
                (r["ours_lora_ms"] / r["ours_ms"], r["shape"])
                for r in find(rows, scheme=scheme_id, dtype="fp32", tokens=n)
            ]
            worst(cands, 1.1, f"LoRA r=16 N={n} {scheme_id}: ours + LoRA / ours base (worst shape)", "<= 1.10x")
    for scheme_id in ids:
        cands = [
            (r["ours_ms"] / r["dense_ms"], r["shape"])
            for r in find(train_rows, scheme=scheme_id, tokens=256)
            if r.get("ours_ms") and r.get("dense_ms")
        ]
        failed = [r["shape"] for r in find(train_rows, scheme=scheme_id, tokens=256) if "ours_status" in r]
        if failed:  # a step that raises fails both training targets
            for what, limit in (("time", "<= 1.3x"), ("peak memory", "<= 1.0x")):
                name = f"training N=256 {scheme_id}: ours / dense PEFT LoRA {what}"
                out.append(
                    {"target": name, "limit": limit, "measured": f"ours raised ({', '.join(failed)})", "result": "FAIL"}
                )
            continue
        worst(cands, 1.3, f"training N=256 {scheme_id}: ours / dense PEFT LoRA time (worst shape)", "<= 1.3x")
        cands = [
            (r["ours_peak"] / r["dense_peak"], r["shape"])
            for r in find(train_rows, scheme=scheme_id, tokens=256)
            if r.get("ours_peak") and r.get("dense_peak")
        ]
        name = f"training N=256 {scheme_id}: ours / dense PEFT LoRA peak memory (worst shape)"
        worst(cands, 1.0, name, "<= 1.0x", fmt="{:.3f}x")
    for scheme_id in ids:
        fp32 = find(rows, shape="4096x4096", scheme=scheme_id, dtype="fp32", tokens=1)
        bf16 = find(rows, shape="4096x4096", scheme=scheme_id, dtype="bf16", tokens=1)
        value = bf16[0]["ours_ms"] / fp32[0]["ours_ms"] if fp32 and bf16 else None
        add(
            f"decode N=1 4096x4096 {scheme_id}: ours bf16 / ours fp32",
            "<= 1.0x",
            value,
            None if value is None else value <= 1.0,
        )
    return out
