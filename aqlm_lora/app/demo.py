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
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..lora.fused_base import use_fused_kernels
from ..quantize import mean_errors, parse_scheme, quantize_model
from .adapters import new_adapter
from .files import check_output_dir, staged_dir
from .models import load_causal_lm
from .text import ByteTokenizer, perplexity, stdlib_corpus
from .train import TrainSettings, cosine_schedule, make_optimizer, settings_dict, train_steps
from .train_state import save_training


@dataclass
class DemoConfig:
    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    seq: int = 128
    batch: int = 16
    dense_steps: int = 800
    dense_lr: float = 3e-3
    dense_weight_decay: float = 0.01
    init_std: float = 0.02
    scheme: str = "2x8"
    quant_rounds: int = 4
    lora_steps: int = 80
    distill: bool = True  # LoRA loss: KL to the dense model (AQLM's recipe); False: next-token loss
    lora_lr: float = 2e-3
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    stock_steps: int = 3  # timed steps of PEFT's stock layer (after one warm-up step) ...
    stock_budget_s: float = 30.0  # ... unless these seconds are spent first
    train_bytes: int = 1 << 20
    valid_bytes: int = 1 << 16


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


def _time_stock_steps(model_dir: Path, tokens, cfg: DemoConfig, seed: int, progress: bool) -> dict:
    """Time training steps of PEFT's stock AQLM LoRA layer (aqlm's own kernels) on the AQLM model."""
    model = load_causal_lm(model_dir)  # fresh copy: aqlm's CPU forward permutes codes in place
    peft_model = new_adapter(model, cfg.r, cfg.alpha, cfg.dropout, ours=False)
    layer_type = type(peft_model.base_model.model.model.layers[0].self_attn.q_proj)
    settings = TrainSettings(steps=1, lr=cfg.lora_lr, batch=cfg.batch, seq=cfg.seq, seed=seed)
    optimizer = make_optimizer(peft_model, settings)
    times: list[float] = []
    start = time.perf_counter()
    try:
        for step in range(1 + cfg.stock_steps):
            result = train_steps(
                peft_model,
                tokens,
                settings,
                optimizer,
                start_step=step,
                progress=progress,
                desc="PEFT stock AQLM layer",
            )
            times.append(result.step_seconds[0])
            if time.perf_counter() - start > cfg.stock_budget_s:
                break
    except Exception as exc:  # noqa: BLE001 - the point is to report whatever aqlm's path raises
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        first = first.split(". ")[0][:160]  # the first sentence says what went wrong
        return {
            "layer": layer_type.__name__,
            "error": f"{type(exc).__name__}: {first}",
            "seconds_before_error": time.perf_counter() - start,
        }
    timed = times[1:] or times
    return {
        "layer": layer_type.__name__,
        "step_seconds": sorted(timed)[len(timed) // 2],
        "includes_jit_compile": len(times) == 1,
    }


def run_demo(
    out: str, *, overwrite: bool = False, seed: int = 0, progress: bool = True, config: DemoConfig | None = None
) -> int:
    cfg = config or DemoConfig()
    out_dir = check_output_dir(out, overwrite)
    scheme = parse_scheme(cfg.scheme)
    tokenizer = ByteTokenizer()
    t_start = time.perf_counter()
    train_text, valid_text, files = stdlib_corpus(cfg.train_bytes, cfg.valid_bytes)
    train_tokens = torch.tensor(tokenizer.encode(train_text), dtype=torch.int64)
    valid_tokens = torch.tensor(tokenizer.encode(valid_text), dtype=torch.int64)
    say = _printer()
    phases: dict[str, float] = {}
    mark = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 2)
        mark[0] = now

    say(
        f"corpus: {len(files)} stdlib files, {train_tokens.numel():,} train / {valid_tokens.numel():,} validation bytes"
    )

    with staged_dir(out_dir) as work:
        (work / "data").mkdir()
        (work / "data" / "train.txt").write_text(train_text)
        (work / "data" / "valid.txt").write_text(valid_text)

        # 1. Dense model.
        model = build_model(cfg, tokenizer, seed)
        n_params = sum(p.numel() for p in model.parameters())
        say(
            f"dense Llama: {cfg.layers} layers, hidden {cfg.hidden}, {n_params / 1e6:.2f}M parameters; "
            f"training {cfg.dense_steps} steps"
        )
        dense_settings = TrainSettings(
            steps=cfg.dense_steps,
            lr=cfg.dense_lr,
            batch=cfg.batch,
            seq=cfg.seq,
            seed=seed,
            weight_decay=cfg.dense_weight_decay,
        )
        optimizer = make_optimizer(model, dense_settings)
        dense = train_steps(
            model,
            train_tokens,
            dense_settings,
            optimizer,
            progress=progress,
            desc="dense",
            lr_schedule=cosine_schedule(cfg.dense_lr, cfg.dense_steps, warmup=20),
        )
        del optimizer
        model.eval()
        lap("dense_training")
        _save_model(model, tokenizer, work / "dense")
        ppl_dense = perplexity(model, valid_tokens, cfg.seq)
        lap("dense_eval")
        say(f"dense: final train loss {dense.losses[-1]:.3f}, validation perplexity {ppl_dense:.3f}")

        # 2. AQLM.
        t0 = time.perf_counter()
        errors = quantize_model(model, scheme, progress=progress, rounds=cfg.quant_rounds, seed=seed)
        quant_s = time.perf_counter() - t0
        per_round = mean_errors(errors)
        qdir = work / f"aqlm-{scheme}"
        _save_model(model, tokenizer, qdir)  # before any forward: the saved codes are the canonical ones
        lap("quantization")
        use_fused_kernels(model)
        ppl_quant = perplexity(model, valid_tokens, cfg.seq)
        lap("aqlm_eval")
        say(
            f"AQLM {scheme}: {len(errors)} layers in {quant_s:.1f} s; relative weight error per round "
            + " -> ".join(f"{e:.4f}" for e in per_round)
            + f"; validation perplexity {ppl_quant:.3f}"
        )

        # 3. LoRA through our layer.
        torch.manual_seed(seed)
        model.name_or_path = str(qdir)  # PEFT reads the base config from here when saving
        peft_model = new_adapter(model, cfg.r, cfg.alpha, cfg.dropout)
        lora_settings = TrainSettings(
            steps=cfg.lora_steps, lr=cfg.lora_lr, batch=cfg.batch, seq=cfg.seq, seed=seed, warmup=10
        )
        optimizer = make_optimizer(peft_model, lora_settings)
        teacher = load_causal_lm(work / "dense").eval() if cfg.distill else None
        lora = train_steps(
            peft_model,
            train_tokens,
            lora_settings,
            optimizer,
            progress=progress,
            desc="LoRA (aqlm_lora)",
            teacher=teacher,
        )
        del teacher
        lap("lora_training")
        ppl_lora = perplexity(peft_model, valid_tokens, cfg.seq)
        lap("lora_eval")
        say(f"AQLM {scheme} + LoRA r={cfg.r}: {cfg.lora_steps} steps, validation perplexity {ppl_lora:.3f}")
        state = {
            "global_step": lora.global_step,
            "model_dir": str(out_dir / qdir.name),
            "data": str(out_dir / "data" / "train.txt"),
            "settings": settings_dict(lora_settings),
            "losses": lora.losses,
            "teacher": str(out_dir / "dense") if cfg.distill else None,
        }
        save_training(peft_model, optimizer, state, work / "adapter")
        adapter_config = work / "adapter" / "adapter_config.json"  # record the final, not the staging, path
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = str(out_dir / qdir.name)
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        del peft_model, model, optimizer

        # 4. PEFT's stock layer on the same AQLM checkpoint.
        lap("save_adapter")
        stock = _time_stock_steps(qdir, train_tokens, cfg, seed, progress)
        lap("peft_stock_timing")

        ours_step = lora.median_step_seconds()
        recovered = _recovered(ppl_dense, ppl_quant, ppl_lora)
        results = {
            "config": asdict(cfg),
            "seed": seed,
            "scheme": str(scheme),
            "files": files,
            "perplexity": {"dense": ppl_dense, "aqlm": ppl_quant, "aqlm_lora": ppl_lora},
            "recovered_fraction_of_log_ppl_gap": recovered,
            "quant_error_per_round": per_round,
            "quant_seconds": quant_s,
            "step_seconds": {"aqlm_lora": ours_step, "peft_stock": stock, "dense": dense.median_step_seconds()},
            "phase_seconds": phases,
            "dense_losses": dense.losses,
            "lora_losses": lora.losses,
        }
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        table = _table(cfg, scheme, ppl_dense, ppl_quant, ppl_lora, recovered, ours_step, stock, out_dir)
        (work / "results.md").write_text(table + "\n")

    print(table)
    say(f"total {time.perf_counter() - t_start:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ")")
    return 0


def _recovered(dense: float, quant: float, lora: float) -> float:
    gap = math.log(quant) - math.log(dense)
    return (math.log(quant) - math.log(lora)) / gap if gap > 0 else float("nan")


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


def _printer():
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return say


__all__ = ["DemoConfig", "build_model", "run_demo"]
