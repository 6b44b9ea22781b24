"""The medium demo's result tables (markdown): perplexities, and LoRA step time and memory."""

from __future__ import annotations

import math

# Below this loss of log-perplexity (0.5% of perplexity) there is nothing for LoRA to recover.
MIN_GAP = 0.005

# How each kind of timed LoRA layer is named in the table, after its PEFT class name.
KIND_NAMES = {
    "ours": "aqlm_lora {layer} (fused kernels)",
    "stock": "peft.tuners.lora.aqlm.{layer} (stock, aqlm's kernels)",
    "dense": "PEFT LoRA, peft.tuners.lora.{layer} over nn.Linear",
}


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def perplexity_table(title: str, ppl_dense: float, per_scheme: dict[str, dict], cfg) -> str:
    """Dense, then per scheme AQLM and AQLM + LoRA: perplexity with the share of the lost log-perplexity
    LoRA won back, and the KL divergence from the dense model's next-token distributions with the share
    of it LoRA removed (what distillation lowers, also where perplexity lost nothing)."""
    lines = [
        f"| model ({title}; validation split) | stored bits per weight | perplexity | KL to dense (nats/token) |",
        "| --- | --- | --- | --- |",
        f"| dense fp32 | 32 | {ppl_dense:.3f} | 0 |",
    ]
    lora = f"LoRA r={cfg.r} ({cfg.lora_steps} steps{', distilled' if cfg.distill else ''})"
    for scheme, r in per_scheme.items():
        bits = f"{r['stored_bits_per_weight']:.2f}"
        gap = math.log(r["perplexity"]) - math.log(ppl_dense)
        if gap < MIN_GAP:
            note = f"AQLM {scheme} lost {100 * (math.exp(gap) - 1):+.2f}% perplexity: nothing to recover"
        else:
            note = f"recovers {100 * r['recovered_fraction_of_log_ppl_gap']:.0f}% of the log-perplexity lost"
        kl, kl_lora = r["kl_to_dense"], r["kl_to_dense_lora"]
        removed = f" ({100 * (1 - kl_lora / kl):.0f}% less)" if kl > 0 else ""
        lines.append(f"| AQLM {scheme} | {bits} | {r['perplexity']:.3f} | {kl:.4f} |")
        ppl_lora = f"{r['perplexity_lora']:.3f} ({note})"
        lines.append(f"| AQLM {scheme} + {lora} | {bits} + adapter | {ppl_lora} | {kl_lora:.4f}{removed} |")
    return "\n".join(lines)


def _time_cell(t: dict, ours: dict[str, float], tokens: int) -> str:
    if "error" in t:
        before = t.get("seconds_before_error")
        when = f" after {before:.1f} s" if before is not None else ""
        return f"fails{when}: {t['error']}"
    seconds = t["step_seconds"]
    cell = f"{seconds:.3f} s ({tokens / seconds:,.0f} tokens/s)"
    if t.get("includes_jit_compile"):
        cell += " (first step only, numba JIT included)"
    mine = ours.get(t["base"])
    if t["kind"] != "ours" and mine:
        cell += f", {seconds / mine:.2f}x ours"
    return cell


def step_table(timings: list[dict], cfg) -> str:
    """One row per contender: median step time, the steps' peak memory, the process's peak."""
    tokens = cfg.batch * cfg.seq
    ours = {t["base"]: t["step_seconds"] for t in timings if t["kind"] == "ours" and "step_seconds" in t}
    lines = [
        f"| LoRA r={cfg.r} training step, {cfg.batch}x{cfg.seq} tokens (fwd+bwd+AdamW), fresh process each "
        f"| base | time (median of up to {cfg.timed_steps} after a warm-up step) "
        "| peak memory of the steps (RSS above the loaded model) | process peak RSS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in timings:
        name = KIND_NAMES[t["kind"]].format(layer=t.get("layer", "?"))
        base = "dense fp32" if t["base"] == "dense" else f"AQLM {t['base']}"
        steps_memory = mib(t.get("steps_peak_rss_above_loaded_bytes")) if "error" not in t else "-"
        process = mib(t.get("process_peak_rss_bytes"))
        lines.append(f"| {name} | {base} | {_time_cell(t, ours, tokens)} | {steps_memory} | {process} |")
    return "\n".join(lines)
