"""``aqlm-lora demo --size medium``: a real model, measured (a quarter of an hour on 2 idle CPU cores).

1. Train a byte-level BPE tokenizer (the ``tokenizers`` library) on Python's standard library
   sources, the small demo's corpus, and save it as transformers files with the model.
2. Build a Llama of ~23M parameters (6 layers, hidden 512) and train it dense.
3. For each scheme (2x8, then 1x16): quantize a copy of the dense model, evaluate it, LoRA-fine-tune
   it (r=16, distilled from the dense model, our fused layer), evaluate that, save both.
4. Time LoRA training steps, with their peak memory, of our layer, PEFT's stock ``AqlmLoraLinear``
   (on each AQLM checkpoint) and PEFT's LoRA on the dense model, each in a fresh process
   (:mod:`aqlm_lora.app.demo_timing`). A contender that fails is reported with its error.

Every phase is the small demo's (:mod:`aqlm_lora.app.demo_phases`); the output folder holds
``dense/``, ``aqlm-2x8/``, ``aqlm-1x16/`` (each loadable with ``AutoModelForCausalLM`` and
``AutoTokenizer``), ``adapter-2x8/``, ``adapter-1x16/`` (usable with ``aqlm-lora eval`` and
``finetune --resume``), ``data/``, ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..lora.fused_base import use_fused_kernels
from ..quantize import Scheme, parse_scheme
from .bpe import token_ids, train_bpe
from .data import load_tokenizer, read_data
from .demo import build_model
from .demo_phases import (
    KLToReference,
    Laps,
    PhaseConfig,
    final_paths,
    finetune_lora,
    quantize_to,
    recovered,
    save_adapter,
    save_data,
    say,
    stored_bits_per_weight,
    train_dense,
)
from .demo_report import perplexity_table, step_table
from .demo_timing import job, measure_all
from .files import check_output_dir, staged_dir
from .models import load_causal_lm
from .text import perplexity, stdlib_corpus
from .tokenizer_files import copy_tokenizer_files


@dataclass(frozen=True)
class SchemeRun:
    """A scheme to quantize to, and how hard the quantizer works at it."""

    scheme: str
    rounds: int  # refinement rounds after the k-means (see aqlm_lora.quantize)
    kmeans_iters: int


@dataclass
class MediumConfig(PhaseConfig):
    """The medium demo: a bigger model on a BPE vocabulary, 2x8 and 1x16, every contender timed."""

    # The model, sized to the BPE vocabulary, and 8 MB of text (the stdlib holds about 4.7 MB of
    # .py files directly under it).
    vocab_size: int = 4096
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 6
    heads: int = 8
    train_bytes: int = 8 << 20
    # Fewer steps than the small demo's, on a model about 25x its size.
    batch: int = 8
    dense_steps: int = 300
    dense_lr: float = 2e-3
    lora_steps: int = 40
    # 1x16 codebooks have 65,536 entries: one assignment pass over every weight group already costs
    # minutes here, so 1x16 takes a sample of the groups as its codebook and assigns once.
    schemes: tuple[SchemeRun, ...] = (SchemeRun("2x8", rounds=2, kmeans_iters=8), SchemeRun("1x16", 0, 0))
    # Timed steps of each contender (after one warm-up step), unless the budget is spent first.
    timed_steps: int = 5
    timing_budget_s: float = 120.0
    timing_timeout_s: float = 1800.0
    timed_kinds: tuple[str, ...] = ("ours", "stock")  # per scheme; then dense PEFT LoRA once
    # A progress line every this many training steps (logs see them; a terminal also gets bars).
    log_every: int = 25


def load_average() -> str:
    """The 1/5/15-minute load average: other processes' share of this machine while it ran."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _note_busy_machine() -> None:
    """On a machine busier than its CPUs, spinning OpenMP threads stall every step: say how to avoid it."""
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return
    if busy and "OMP_WAIT_POLICY" not in os.environ:
        say(
            "note: other processes keep this machine's CPUs busy; torch's idle OpenMP threads then spin and "
            "stall each step. `export OMP_WAIT_POLICY=PASSIVE` before starting makes them sleep (README, "
            "Performance tips)"
        )


def run_medium_demo(
    out: str, *, overwrite: bool = False, seed: int = 0, progress: bool = True, config: MediumConfig | None = None
) -> int:
    """The medium demo (see the module docstring); prints the result tables, returns the exit code 0."""
    cfg = config or MediumConfig()
    out_dir = check_output_dir(out, overwrite)
    schemes = [(parse_scheme(run.scheme), run) for run in cfg.schemes]  # a typo fails before any work
    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }
    say(
        f"machine: {machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads, load average "
        f"{machine['load_average_at_start']} (1/5/15 min)"
    )
    _note_busy_machine()
    train_text, valid_text, files = stdlib_corpus(cfg.train_bytes, cfg.valid_bytes)
    with staged_dir(out_dir) as work, tempfile.TemporaryDirectory(prefix="aqlm_lora_demo_") as scratch:
        run = _MediumRun(cfg, seed, progress, work, out_dir)
        run.tokenizer_and_data(train_text, valid_text, files)
        run.dense()
        for scheme, how in schemes:
            run.scheme(scheme, how)
        run.timing(Path(scratch), [scheme for scheme, _ in schemes])
        machine["load_average_at_end"] = load_average()
        tables = run.save_results(files, machine)
    print(tables)
    say(f"{run.laps.summary()}; load average at the end {machine['load_average_at_end']}")
    return 0


class _MediumRun:
    """The phases of one medium demo, writing into the staged output folder ``work``."""

    def __init__(self, cfg: MediumConfig, seed: int, progress: bool, work: Path, out_dir: Path) -> None:
        self.cfg, self.seed, self.progress = cfg, seed, progress
        self.work, self.out_dir = work, out_dir  # out_dir: where work ends up; saved paths name it
        self.dense_dir = work / "dense"
        self.laps = Laps()
        self.ppl: dict[str, float] = {}
        self.per_scheme: dict[str, dict] = {}
        self.timings: list[dict] = []

    def tokenizer_and_data(self, train_text: str, valid_text: str, files: list[str]) -> None:
        """Train the BPE tokenizer and save it first: the data is read back through it as ``eval`` reads it."""
        data_dir = save_data(self.work, train_text, valid_text)
        self.hf_tokenizer = train_bpe(train_text, self.cfg.vocab_size)
        self.hf_tokenizer.save_pretrained(str(self.dense_dir))
        tokenizer = load_tokenizer(self.dense_dir)
        self.train_tokens = read_data(data_dir / "train.txt", tokenizer).tokens
        self.valid_tokens = read_data(data_dir / "valid.txt", tokenizer).tokens
        self.laps.lap("tokenizer")
        say(
            f"corpus: {len(files)} stdlib files, {len(train_text):,} / {len(valid_text):,} characters; BPE of "
            f"{len(self.hf_tokenizer)} tokens: {self.train_tokens.numel():,} train / "
            f"{self.valid_tokens.numel():,} validation tokens"
        )

    def dense(self) -> None:
        cfg = self.cfg
        model = build_model(cfg, token_ids(self.hf_tokenizer), self.seed)
        self.n_params = sum(p.numel() for p in model.parameters())
        say(
            f"dense Llama: {cfg.layers} layers, hidden {cfg.hidden}, {self.n_params / 1e6:.1f}M parameters; "
            f"training {cfg.dense_steps} steps of {cfg.batch}x{cfg.seq} tokens"
        )
        self.dense_result = train_dense(model, self.train_tokens, cfg, self.seed, self.progress, cfg.log_every)
        self.laps.lap("dense_training")
        model.save_pretrained(str(self.dense_dir))
        self.ppl["dense"] = perplexity(model, self.valid_tokens, cfg.seq)
        self.reference = model  # what the quantized models' distributions are compared with
        self.laps.lap("dense_eval")
        say(
            f"dense: final train loss {self.dense_result.losses[-1]:.3f}, validation perplexity {self.ppl['dense']:.3f}"
        )

    def scheme(self, scheme: Scheme, how: SchemeRun) -> None:
        """Quantize a fresh copy of the dense model to ``scheme``, evaluate, LoRA-fine-tune, evaluate, save."""
        cfg, laps = self.cfg, self.laps
        model = load_causal_lm(self.dense_dir)
        quantized = quantize_to(
            model, scheme, self.seed, self.progress, rounds=how.rounds, kmeans_iters=how.kmeans_iters
        )
        qdir = self.work / f"aqlm-{scheme}"
        model.save_pretrained(str(qdir))  # before any forward: the saved codes are the canonical ones
        copy_tokenizer_files(self.dense_dir, qdir)
        laps.lap(f"quantization_{scheme}")
        use_fused_kernels(model)
        kl_quant = KLToReference(self.reference)
        ppl_quant = perplexity(model, self.valid_tokens, cfg.seq, on_logits=kl_quant)
        laps.lap(f"aqlm_{scheme}_eval")
        bits = stored_bits_per_weight(model)
        say(
            f"AQLM {scheme}: {quantized.summary()}; {bits:.2f} bits/weight stored; "
            f"validation perplexity {ppl_quant:.3f}, KL to dense {kl_quant.value:.4f}"
        )

        teacher = self.dense_dir if cfg.distill else None
        peft_model, optimizer, settings, lora = finetune_lora(
            model, qdir, self.train_tokens, cfg, self.seed, teacher, f"LoRA {scheme}", self.progress, cfg.log_every
        )
        laps.lap(f"lora_{scheme}_training")
        kl_lora = KLToReference(self.reference)
        ppl_lora = perplexity(peft_model, self.valid_tokens, cfg.seq, on_logits=kl_lora)
        laps.lap(f"lora_{scheme}_eval")
        say(
            f"AQLM {scheme} + LoRA r={cfg.r}: {cfg.lora_steps} steps, validation perplexity {ppl_lora:.3f}, "
            f"KL to dense {kl_lora.value:.4f}"
        )
        final = final_paths(self.out_dir, qdir, cfg.distill)
        save_adapter(peft_model, optimizer, settings, lora, self.work, f"adapter-{scheme}", final=final)
        share = recovered(self.ppl["dense"], ppl_quant, ppl_lora)
        self.ppl[f"aqlm_{scheme}"], self.ppl[f"aqlm_{scheme}_lora"] = ppl_quant, ppl_lora
        self.per_scheme[str(scheme)] = {
            "perplexity": ppl_quant,
            "perplexity_lora": ppl_lora,
            "recovered_fraction_of_log_ppl_gap": share if math.isfinite(share) else None,
            "kl_to_dense": kl_quant.value,
            "kl_to_dense_lora": kl_lora.value,
            "stored_bits_per_weight": bits,
            "quant_error_per_round": quantized.per_round,
            "quant_seconds": quantized.seconds,
            "lora_losses": lora.losses,
            "lora_step_seconds": lora.median_step_seconds(),
        }

    def timing(self, scratch: Path, schemes: list[Scheme]) -> None:
        """Time each contender's LoRA steps on the same batches, each in a process of its own."""
        cfg = self.cfg
        tokens_file = scratch / "train_tokens.pt"
        torch.save(self.train_tokens, tokens_file)
        contenders = [(str(s), kind, self.work / f"aqlm-{s}") for s in schemes for kind in cfg.timed_kinds]
        contenders.append(("dense", "dense", self.dense_dir))
        jobs = [
            job(model_dir, kind, tokens_file, cfg, self.seed, steps=cfg.timed_steps, budget_s=cfg.timing_budget_s)
            for _, kind, model_dir in contenders
        ]
        results = measure_all(jobs, scratch, timeout_s=cfg.timing_timeout_s)
        self.timings = [{"base": base, "kind": kind, **r} for (base, kind, _), r in zip(contenders, results)]
        self.laps.lap("step_timing")

    def save_results(self, files: list[str], machine: dict) -> str:
        """``results.json`` and ``results.md`` in the output folder; returns the tables."""
        cfg = self.cfg
        results = {
            "config": asdict(cfg),
            "seed": self.seed,
            "parameters": self.n_params,
            "files": files,
            "tokens": {
                "train": self.train_tokens.numel(),
                "valid": self.valid_tokens.numel(),
                "vocab": len(self.hf_tokenizer),
            },
            "perplexity": self.ppl,
            "schemes": self.per_scheme,
            "step_timing": self.timings,
            "dense_losses": self.dense_result.losses,
            "dense_step_seconds": self.dense_result.median_step_seconds(),
            "phase_seconds": self.laps.seconds,
            "machine": machine,
        }
        (self.work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        size = f"{self.n_params / 1e6:.1f}M parameters, {len(self.hf_tokenizer)}-token BPE"
        title = f"{cfg.layers}x{cfg.hidden} Llama, {size}"
        names = ", ".join(f"aqlm-{s}/ + adapter-{s}/" for s in self.per_scheme)
        tables = "\n\n".join(
            [
                perplexity_table(title, self.ppl["dense"], self.per_scheme, cfg),
                step_table(self.timings, cfg),
                f"models and adapters saved in {self.out_dir}: dense/, {names}",
            ]
        )
        (self.work / "results.md").write_text(tables + "\n")
        return tables


__all__ = ["MediumConfig", "SchemeRun", "run_medium_demo"]
