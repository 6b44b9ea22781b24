"""``aqlm-lora demo``: the whole job on a tiny model, in a few minutes on a laptop CPU.

1. Build a small Llama (fixed seed, byte vocabulary) and train it dense on Python's own standard
   library sources (read at run time from this interpreter's installation; split by file).
2. Quantize it to AQLM 2x8 (:func:`aqlm_lora.quantize.quantize_model`) and save the checkpoint.
3. LoRA-fine-tune the quantized model through PEFT with our fused layer; save the adapter.
4. Print validation perplexity dense / AQLM / AQLM + LoRA and the time of one training step with
   our layer and with PEFT's stock ``peft.tuners.lora.aqlm.AqlmLoraLinear`` on the same model.

Everything lands in the output directory: ``dense/``, ``aqlm-2x8/`` (both loadable with
``transformers.AutoModelForCausalLM.from_pretrained``), ``adapter/`` (PEFT adapter + optimizer
state, usable with ``aqlm-lora eval``/``finetune --resume``), ``data/`` and ``results.json``.
The phases are :mod:`aqlm_lora.app.demo_phases`, shared with the medium demo (``--size medium``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..lora.fused_base import use_fused_kernels
from ..quantize import parse_scheme
from .demo_phases import (
    Laps,
    PhaseConfig,
    final_paths,
    finetune_lora,
    quantize_to,
    recovered,
    save_adapter,
    save_data,
    say,
    time_training_steps,
    train_dense,
)
from .files import check_output_dir, staged_dir
from .text import ByteTokenizer, perplexity, stdlib_corpus


@dataclass
class DemoConfig(PhaseConfig):
    """The small demo: PhaseConfig's sizes and steps, one scheme, and PEFT's stock layer timed."""

    scheme: str = "2x8"
    quant_rounds: int = 4
    stock_steps: int = 3  # timed steps of PEFT's stock layer (after one warm-up step) ...
    stock_budget_s: float = 30.0  # ... unless these seconds are spent first


def build_model(cfg: DemoConfig, tokenizer: ByteTokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq,
        tie_word_embeddings=False,
        initializer_range=cfg.init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _save_model(model, tokenizer: ByteTokenizer, directory: Path) -> None:
    model.save_pretrained(str(directory))
    tokenizer.save(directory)


def run_demo(
    out: str, *, overwrite: bool = False, seed: int = 0, progress: bool = True, config: DemoConfig | None = None
) -> int:
    """The small demo (see the module docstring); prints the result tables, returns the exit code 0."""
    cfg = config or DemoConfig()
    out_dir = check_output_dir(out, overwrite)
    scheme = parse_scheme(cfg.scheme)
    tokenizer = ByteTokenizer()
    laps = Laps()
    train_text, valid_text, files = stdlib_corpus(cfg.train_bytes, cfg.valid_bytes)
    train_tokens = torch.tensor(tokenizer.encode(train_text), dtype=torch.int64)
    valid_tokens = torch.tensor(tokenizer.encode(valid_text), dtype=torch.int64)
    laps.skip()
    say(
        f"corpus: {len(files)} stdlib files, {train_tokens.numel():,} train / {valid_tokens.numel():,} validation bytes"
    )

    with staged_dir(out_dir) as work:
        save_data(work, train_text, valid_text)

        # 1. Dense model.
        model = build_model(cfg, tokenizer, seed)
        n_params = sum(p.numel() for p in model.parameters())
        say(
            f"dense Llama: {cfg.layers} layers, hidden {cfg.hidden}, {n_params / 1e6:.2f}M parameters; "
            f"training {cfg.dense_steps} steps"
        )
        dense = train_dense(model, train_tokens, cfg, seed, progress)
        laps.lap("dense_training")
        _save_model(model, tokenizer, work / "dense")
        ppl_dense = perplexity(model, valid_tokens, cfg.seq)
        laps.lap("dense_eval")
        say(f"dense: final train loss {dense.losses[-1]:.3f}, validation perplexity {ppl_dense:.3f}")

        # 2. AQLM.
        quantized = quantize_to(model, scheme, seed, progress, rounds=cfg.quant_rounds)
        qdir = work / f"aqlm-{scheme}"
        _save_model(model, tokenizer, qdir)  # before any forward: the saved codes are the canonical ones
        laps.lap("quantization")
        use_fused_kernels(model)
        ppl_quant = perplexity(model, valid_tokens, cfg.seq)
        laps.lap("aqlm_eval")
        say(f"AQLM {scheme}: {quantized.summary()}; validation perplexity {ppl_quant:.3f}")

        # 3. LoRA through our layer.
        teacher = work / "dense" if cfg.distill else None
        peft_model, optimizer, lora_settings, lora = finetune_lora(
            model, qdir, train_tokens, cfg, seed, teacher, "LoRA (aqlm_lora)", progress
        )
        laps.lap("lora_training")
        ppl_lora = perplexity(peft_model, valid_tokens, cfg.seq)
        laps.lap("lora_eval")
        say(f"AQLM {scheme} + LoRA r={cfg.r}: {cfg.lora_steps} steps, validation perplexity {ppl_lora:.3f}")
        final = final_paths(out_dir, qdir, cfg.distill)
        save_adapter(peft_model, optimizer, lora_settings, lora, work, "adapter", final=final)
        del peft_model, model, optimizer

        # 4. PEFT's stock layer on the same AQLM checkpoint.
        laps.lap("save_adapter")
        stock = time_training_steps(
            qdir, "stock", train_tokens, cfg, seed, progress, steps=cfg.stock_steps, budget_s=cfg.stock_budget_s
        )
        laps.lap("peft_stock_timing")

        ours_step = lora.median_step_seconds()
        share = recovered(ppl_dense, ppl_quant, ppl_lora)
        results = {
            "config": asdict(cfg),
            "seed": seed,
            "scheme": str(scheme),
            "files": files,
            "perplexity": {"dense": ppl_dense, "aqlm": ppl_quant, "aqlm_lora": ppl_lora},
            "recovered_fraction_of_log_ppl_gap": share,
            "quant_error_per_round": quantized.per_round,
            "quant_seconds": quantized.seconds,
            "step_seconds": {"aqlm_lora": ours_step, "peft_stock": stock, "dense": dense.median_step_seconds()},
            "phase_seconds": laps.seconds,
            "dense_losses": dense.losses,
            "lora_losses": lora.losses,
        }
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        table = _table(cfg, scheme, ppl_dense, ppl_quant, ppl_lora, share, ours_step, stock, out_dir)
        (work / "results.md").write_text(table + "\n")

    print(table)
    say(laps.summary())
    return 0


def _table(cfg, scheme, ppl_dense, ppl_quant, ppl_lora, recovered, ours_step, stock, out_dir: Path) -> str:
    tokens = cfg.batch * cfg.seq
    if "error" in stock:
        stock_cell = f"failed after {stock['seconds_before_error']:.1f} s: {stock['error']}"
    else:
        note = " (first step, includes numba JIT)" if stock["includes_jit_compile"] else ""
        stock_cell = f"{stock['step_seconds']:.3f} s{note}"
        if ours_step > 0:
            stock_cell += f" ({stock['step_seconds'] / ours_step:.1f}x ours)"
    lines = [
        f"| model ({cfg.layers}x{cfg.hidden} Llama, validation split) | perplexity |",
        "| --- | --- |",
        f"| dense fp32 | {ppl_dense:.3f} |",
        f"| AQLM {scheme} | {ppl_quant:.3f} |",
        f"| AQLM {scheme} + LoRA r={cfg.r} ({cfg.lora_steps} steps{', distilled' if cfg.distill else ''}) "
        f"| {ppl_lora:.3f} "
        f"(recovers {100 * recovered:.0f}% of the log-perplexity lost) |",
        "",
        f"| LoRA training step ({cfg.batch}x{cfg.seq} tokens, fwd+bwd+AdamW) | time |",
        "| --- | --- |",
        f"| aqlm_lora AqlmLoraLinear (fused) | {ours_step:.3f} s ({tokens / ours_step:,.0f} tokens/s) |",
        f"| peft.tuners.lora.aqlm.{stock['layer']} (stock) | {stock_cell} |",
        "",
        f"adapter saved to {out_dir / 'adapter'} (AQLM model: {out_dir / f'aqlm-{scheme}'})",
    ]
    return "\n".join(lines)


__all__ = ["DemoConfig", "build_model", "run_demo"]
