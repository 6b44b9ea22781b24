"""The phases both demos run, in the order they run them: dense training, quantization, LoRA, timing.

``aqlm-lora demo`` (:mod:`aqlm_lora.app.demo`) and ``aqlm-lora demo --size medium``
(:mod:`aqlm_lora.app.demo_medium`) differ in the model, the tokenizer and how many schemes they
try; every training step, quantization and perplexity goes through the functions here, which use
the same loop (:func:`~aqlm_lora.app.train.train_steps`), quantizer and evaluation as the CLI.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..lora.fused_base import use_fused_kernels
from ..quantize import Scheme, mean_errors, quantize_model
from .adapters import new_adapter
from .models import load_causal_lm
from .progress import LossLines, ProgressLog
from .train import (
    TrainResult,
    TrainSettings,
    cosine_schedule,
    distillation_loss,
    make_optimizer,
    settings_dict,
    train_steps,
)
from .train_state import save_training

# Progress bar labels of the timed steps, by kind of LoRA layer.
STEP_LABELS = {"ours": "aqlm_lora step", "stock": "PEFT stock AQLM layer", "dense": "PEFT dense LoRA"}
# Warm-up steps of the dense run (then cosine decay) and of the LoRA runs (then constant).
DENSE_WARMUP = 20
LORA_WARMUP = 10


def say(message: str) -> None:
    """A line on stderr at once: the demos' running commentary (stdout gets the result tables)."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class PhaseConfig:
    """What the phases below read, the same for both demos: the model, the text, dense and LoRA
    training. The defaults are the small demo's; the medium demo overrides the sizes and steps."""

    # The model: a Llama with the tokenizer's vocabulary.
    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    seq: int = 128
    init_std: float = 0.02
    # The text: characters of the Python stdlib's .py files.
    train_bytes: int = 1 << 20
    valid_bytes: int = 1 << 16
    # Dense training.
    batch: int = 16
    dense_steps: int = 800
    dense_lr: float = 3e-3
    dense_weight_decay: float = 0.01
    # LoRA on each AQLM model.
    lora_steps: int = 80
    distill: bool = True  # LoRA loss: KL to the dense model (AQLM's recipe); False: next-token loss
    lora_lr: float = 2e-3
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05


class Laps:
    """Seconds per phase, each measured from the end of the previous one (``lap(name)`` ends a phase)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = self.mark = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.mark, 2)
        self.mark = now

    def skip(self) -> None:
        """Start the next phase now: the time since the last mark counts in the total only."""
        self.mark = time.perf_counter()

    def summary(self) -> str:
        """``total N s (phase N s, ...)``."""
        total = time.perf_counter() - self.started
        return f"total {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()) + ")"


def loss_lines(label: str, steps: int, every: int, tokens_per_step: int) -> Optional[Callable[[TrainResult], None]]:
    """A step hook printing the mean loss every ``every`` steps (None for 0): logs see progress, not only terminals."""
    return LossLines(ProgressLog(label, "step", 0, steps, every, tokens_per_step)) if every else None


def _phase_settings(cfg: PhaseConfig, seed: int, steps: int, lr: float, **more) -> TrainSettings:
    """The settings of a phase's training steps: the demo's batch of ``cfg.batch`` windows of
    ``cfg.seq`` tokens, the run's seed, and the phase's own steps, learning rate and ``more``."""
    return TrainSettings(steps=steps, lr=lr, batch=cfg.batch, seq=cfg.seq, seed=seed, **more)


def train_dense(
    model: nn.Module, tokens: Tensor, cfg: PhaseConfig, seed: int, progress: bool, log_every: int = 0
) -> TrainResult:
    """Train ``model`` from scratch on ``tokens``: AdamW, warm-up then cosine decay; left in eval mode."""
    settings = _phase_settings(cfg, seed, cfg.dense_steps, cfg.dense_lr, weight_decay=cfg.dense_weight_decay)
    optimizer = make_optimizer(model, settings)
    result = train_steps(
        model,
        tokens,
        settings,
        optimizer,
        progress=progress,
        desc="dense",
        lr_schedule=cosine_schedule(cfg.dense_lr, cfg.dense_steps, warmup=DENSE_WARMUP),
        on_step=loss_lines("dense", cfg.dense_steps, log_every, cfg.batch * cfg.seq),
    )
    model.eval()
    return result


@dataclass
class Quantized:
    """What :func:`quantize_to` reports: errors per layer and round, the time it took."""

    errors: dict[str, list[float]]
    seconds: float

    @property
    def per_round(self) -> list[float]:
        return mean_errors(self.errors)

    def summary(self) -> str:
        return f"{len(self.errors)} layers in {self.seconds:.1f} s; relative weight error per round " + " -> ".join(
            f"{e:.4f}" for e in self.per_round
        )


def quantize_to(
    model: nn.Module, scheme: Scheme, seed: int, progress: bool, rounds: int, kmeans_iters: Optional[int] = None
) -> Quantized:
    """Quantize ``model``'s linear layers (not the head) in place; ``kmeans_iters`` None: the quantizer's default."""
    extra = {} if kmeans_iters is None else {"kmeans_iters": kmeans_iters}
    start = time.perf_counter()
    errors = quantize_model(model, scheme, progress=progress, rounds=rounds, seed=seed, **extra)
    return Quantized(errors, time.perf_counter() - start)


def stored_bits_per_weight(model: nn.Module) -> float:
    """Bits the AQLM layers store per weight: codes, codebooks and scales (the codebooks count too)."""
    from aqlm import QuantizedLinear

    bits = weights = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            bits += m.codes.numel() * m.nbits_per_codebook
            bits += sum(t.numel() * t.element_size() * 8 for t in (m.codebooks, m.scales))
            weights += m.in_features * m.out_features
    return bits / weights if weights else float("nan")


def finetune_lora(
    model: nn.Module,
    base_dir: Path,
    tokens: Tensor,
    cfg: PhaseConfig,
    seed: int,
    teacher_dir: Optional[Path],
    desc: str,
    progress: bool,
    log_every: int = 0,
):
    """LoRA (our fused layer) on the AQLM ``model``, distilled from ``teacher_dir`` when given.

    Returns ``(peft_model, optimizer, settings, result)``.
    """
    torch.manual_seed(seed)
    model.name_or_path = str(base_dir)  # PEFT reads the base config from here when saving
    peft_model = new_adapter(model, cfg.r, cfg.alpha, cfg.dropout)
    settings = _phase_settings(cfg, seed, cfg.lora_steps, cfg.lora_lr, warmup=LORA_WARMUP)
    optimizer = make_optimizer(peft_model, settings)
    teacher = load_causal_lm(teacher_dir).eval() if teacher_dir is not None else None
    lines = loss_lines(desc, cfg.lora_steps, log_every, cfg.batch * cfg.seq)
    result = train_steps(
        peft_model, tokens, settings, optimizer, progress=progress, desc=desc, teacher=teacher, on_step=lines
    )
    return peft_model, optimizer, settings, result


def save_data(work: Path, train_text: str, valid_text: str) -> Path:
    """``work/data/train.txt`` and ``valid.txt``: the splits the demo trains and evaluates on; returns the folder."""
    data_dir = work / "data"
    data_dir.mkdir()
    (data_dir / "train.txt").write_text(train_text)
    (data_dir / "valid.txt").write_text(valid_text)
    return data_dir


def final_paths(out_dir: Path, model_dir: Path, distill: bool) -> dict:
    """What :func:`save_adapter` records for an adapter trained on the AQLM model ``model_dir`` and the
    data of :func:`save_data`, distilled from ``dense/`` when ``distill``: those paths as they will be
    once the staged output folder holding them is renamed to ``out_dir``."""
    return {
        "model_dir": str(out_dir / model_dir.name),
        "data": str(out_dir / "data" / "train.txt"),
        "teacher": str(out_dir / "dense") if distill else None,
    }


def save_adapter(
    peft_model, optimizer, settings: TrainSettings, result: TrainResult, work: Path, name: str, *, final: dict
) -> None:
    """Save the adapter as ``finetune`` does into ``work/name``; paths in it name the final folder.

    ``final``: ``model_dir``, ``data`` and ``teacher`` (or None) as they will be after the staged
    output folder is renamed into place (:func:`final_paths`).
    """
    state = {
        "global_step": result.global_step,
        "model_dir": final["model_dir"],
        "data": final["data"],
        "settings": settings_dict(settings),
        "losses": result.losses,
        "teacher": final["teacher"],
    }
    save_training(peft_model, optimizer, state, work / name)
    adapter_config = work / name / "adapter_config.json"  # record the final, not the staging, path
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = final["model_dir"]
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class KLToReference:
    """Mean ``KL(reference || model)`` of the next-token distributions, in nats per position.

    Pass it as ``perplexity(..., on_logits=kl)``: it runs the reference on the same windows and
    compares its distributions with the model's (the quantity LoRA distillation lowers).
    """

    def __init__(self, reference: nn.Module) -> None:
        self.reference = reference
        self.total, self.positions = 0.0, 0

    @torch.no_grad()
    def __call__(self, ids: Tensor, logits: Tensor) -> None:
        kl = distillation_loss(logits, self.reference(input_ids=ids).logits)  # mean over the batch's positions
        self.total += float(kl) * ids.numel()
        self.positions += ids.numel()

    @property
    def value(self) -> float:
        # KL >= 0; a sum of float32 terms over matching distributions can end a hair below
        return max(0.0, self.total / self.positions) if self.positions else float("nan")


def recovered(dense: float, quant: float, lora: float) -> float:
    """Share of the log-perplexity that quantization lost and LoRA won back (nan if nothing was lost)."""
    gap = math.log(quant) - math.log(dense)
    return (math.log(quant) - math.log(lora)) / gap if gap > 0 else float("nan")


def time_training_steps(
    model_dir: Path,
    kind: str,
    tokens: Tensor,
    cfg: PhaseConfig,
    seed: int,
    progress: bool,
    steps: int,
    budget_s: float,
    before_steps: Optional[Callable[[], None]] = None,
) -> dict:
    """Time LoRA training steps (next-token loss) of a fresh copy of the model in ``model_dir``.

    ``kind``: ``ours`` (our fused layer on the AQLM layers, as ``finetune`` runs it), ``stock``
    (PEFT's own ``peft.tuners.lora.aqlm.AqlmLoraLinear`` over aqlm's kernels) or ``dense`` (PEFT's
    LoRA over ``nn.Linear``, for a dense checkpoint). One warm-up step (numba compiles aqlm's kernels
    in it), then up to ``steps`` timed ones unless ``budget_s`` seconds are spent first. Returns the
    median step time, or the error the path raised (its first sentence): a failure is a result here.
    ``before_steps()`` runs once the model, adapter and optimizer are built (e.g. to start measuring memory).
    """
    model = load_causal_lm(model_dir)  # fresh copy: aqlm's CPU forward permutes codes in place
    if kind == "ours":
        use_fused_kernels(model)
    peft_model = new_adapter(model, cfg.r, cfg.alpha, cfg.dropout, ours=kind == "ours")
    layer_type = type(peft_model.base_model.model.model.layers[0].self_attn.q_proj)
    settings = _phase_settings(cfg, seed, 1, cfg.lora_lr)
    optimizer = make_optimizer(peft_model, settings)
    if before_steps is not None:
        before_steps()
    times: list[float] = []
    start = time.perf_counter()
    try:
        for step in range(1 + steps):
            result = train_steps(
                peft_model, tokens, settings, optimizer, start_step=step, progress=progress, desc=STEP_LABELS[kind]
            )
            times.append(result.step_seconds[0])
            if time.perf_counter() - start > budget_s:
                break
    except Exception as exc:  # noqa: BLE001 - the point is to report whatever the path raises
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
