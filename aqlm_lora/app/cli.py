"""``aqlm-lora``: quantize, fine-tune, evaluate, benchmark, and the end-to-end demo.

    aqlm-lora quantize MODEL_DIR OUT_DIR --scheme 2x8 [--dtype bfloat16]
    aqlm-lora finetune MODEL_DIR --data FILE.{txt,jsonl} --out ADAPTER_DIR [--steps N ...] [--save-every N] [--resume]
    aqlm-lora eval MODEL_DIR [--adapter DIR] --data FILE.{txt,jsonl}
    aqlm-lora bench [ARGS for benchmarks/cpu/bench_linear.py]
    aqlm-lora demo [--out ./aqlm_lora_demo]

Mistakes (missing paths, bad scheme, non-empty output directory, adapter of another model, a
number flag that is not finite or out of its range, a wrong-typed config field, a truncated or
corrupt weight/adapter/optimizer file, a NaN weight...) are reported as one ``aqlm-lora: error: ...``
line on stderr, naming the flag or file, with a non-zero exit code. Number flags are checked when
the command line is parsed (exit code 2), before anything is loaded. Output
directories are written to a temporary sibling and renamed into place, so an existing directory is
only replaced (with ``--overwrite``) once the new one is complete.

Long runs: ``finetune --save-every N`` keeps a checkpoint beside the adapter folder
(:mod:`aqlm_lora.app.checkpoint`), Ctrl-C saves one and stops, ``--resume`` continues exactly;
``--log-every N`` prints a progress line per N steps (eval: batches) that a log file sees too.
A closed output pipe (``aqlm-lora ... | head -1``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

PROG = "aqlm-lora"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (``aqlm-lora: error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


# Counts and sizes above this are never meant (and become tensor sizes torch cannot allocate).
_INT_MAX = 2**31 - 1
# What torch.manual_seed and torch.Generator.manual_seed accept.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _int_in(low: int, high: int = _INT_MAX):
    """argparse type: an integer in ``[low, high]`` (argparse names the flag in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text}")
        return value

    return parse


def _float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number in the interval from ``low`` to ``high`` (open ends as flagged)."""
    if high == math.inf:
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"must be a finite number {interval}, got {text}")
        return value

    return parse


_POSITIVE = _int_in(1)
_COUNT = _int_in(0)
_SEED = _int_in(_SEED_MIN, _SEED_MAX)
_SEQ = _int_in(2)  # a window of 1 token has no next token to predict

# Window length when --seq is not given (shorter if the model has fewer positions).
DEFAULT_SEQ = 128
DEFAULT_STEPS = 100
DTYPE_CHOICES = ("float32", "bfloat16")


def _add_data_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help=f'{what}: plain text, or JSONL (.jsonl) with one {{"text": ...}} or {{"prompt": ..., '
        '"completion": ...} object a line (then only completion tokens count)',
    )
    p.add_argument(
        "--data-format",
        choices=("auto", "text", "jsonl"),
        default="auto",
        help="how to read --data (default auto: JSONL for .jsonl/.ndjson files, else plain text)",
    )


def _add_seq_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--seq",
        type=_SEQ,
        default=None,
        help=f"{what}, >= 2 (default {DEFAULT_SEQ}, or the model's max_position_embeddings if fewer; "
        "more than that is refused)",
    )


def _add_progress_args(p: argparse.ArgumentParser, unit: str, every: int) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the --log-every lines stay)")
    p.add_argument(
        "--log-every",
        type=_COUNT,
        default=every,
        metavar="N",
        help=f"print a progress line to stderr every N {unit}s, also when it is not a terminal "
        f"(default {every}; 0: none)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..quantize import SCHEME_GRAMMAR

    parser = _Parser(prog=PROG, description="Fast LoRA on AQLM-quantized models (PEFT drop-in).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("quantize", help="quantize a dense Hugging Face causal LM to AQLM")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local dense Hugging Face checkpoint")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the AQLM checkpoint")
    p.add_argument("--scheme", default="2x8", help=f"AQLM scheme: {SCHEME_GRAMMAR} (default 2x8)")
    p.add_argument("--skip", default="lm_head", help="comma-separated layer names left dense (default lm_head)")
    p.add_argument("--rounds", type=_COUNT, default=4, help="alternating refinement rounds (default 4)")
    p.add_argument("--kmeans-iters", type=_COUNT, default=12, help="k-means iterations (default 12)")
    p.add_argument("--beam", type=_POSITIVE, default=1, help="beam width of the code search (default 1)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="dtype of the saved codebooks, scales and dense layers (default: the checkpoint's own; "
        "quantization itself runs in float32)",
    )
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the k-means initialisation (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("finetune", help="LoRA fine-tuning (PEFT adapter) of an AQLM or dense model")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local AQLM (or dense) checkpoint with its tokenizer")
    _add_data_args(p, "training data")
    p.add_argument(
        "--out",
        required=True,
        metavar="ADAPTER_DIR",
        help="where to save the adapter (with optimizer.pt and trainer_state.json, for --resume)",
    )
    p.add_argument("--r", type=_POSITIVE, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=_float_in(0, low_open=True), default=32.0, help="LoRA alpha, > 0 (default 32)")
    p.add_argument(
        "--dropout", type=_float_in(0, 1, high_open=True), default=0.05, help="LoRA dropout, in [0, 1) (default 0.05)"
    )
    p.add_argument(
        "--steps",
        type=_POSITIVE,
        default=None,
        help=f"optimizer steps in this run (default {DEFAULT_STEPS}); --resume of an interrupted run runs the "
        "steps it had left instead",
    )
    p.add_argument(
        "--lr", type=_float_in(0, 1, low_open=True), default=1e-3, help="AdamW learning rate, in (0, 1] (default 1e-3)"
    )
    p.add_argument("--warmup", type=_COUNT, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--batch", type=_POSITIVE, default=8, help="sequences per step (default 8)")
    _add_seq_arg(p, "tokens per sequence")
    p.add_argument(
        "--seed", type=_SEED, default=0, help="seed of LoRA's initialisation, the batches and dropout (default 0)"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help="dtype the model (and --teacher) is loaded in; LoRA weights stay float32 (default float32)",
    )
    p.add_argument(
        "--teacher",
        metavar="DENSE_DIR",
        help="distil from this (dense) model: KL to its next-token distribution instead of the data's "
        "next token, as AQLM's own fine-tuning does (same tokenizer and vocabulary)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument(
        "--save-every",
        type=_COUNT,
        default=0,
        metavar="N",
        help="save a checkpoint (adapter + optimizer state) every N steps in --checkpoint-dir (default 0: "
        "only on Ctrl-C)",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="where checkpoints go, apart from the adapter (default ADAPTER_DIR.checkpoint); removed when "
        "the run finishes",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue from a checkpoint or adapter folder (default: the --checkpoint-dir checkpoint if "
        "there is one, else --out); rank, alpha and dropout then come from the saved adapter",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out, or a checkpoint of an unfinished run (not needed with --resume)",
    )
    _add_progress_args(p, "step", every=10)

    p = sub.add_parser("eval", help="perplexity of a model (optionally with a LoRA adapter) on a text file")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local AQLM (or dense) checkpoint with its tokenizer")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory")
    _add_data_args(p, "evaluation data")
    _add_seq_arg(p, "window length")
    p.add_argument("--batch", type=_POSITIVE, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--max-windows", type=_COUNT, default=0, help="evaluate at most this many windows")
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype the model is loaded in (default float32)"
    )
    _add_progress_args(p, "batch", every=10)

    p = sub.add_parser(
        "bench",
        help="run benchmarks/cpu/bench_linear.py --quick (source checkout only)",
        description="Run benchmarks/cpu/bench_linear.py --quick; other arguments (--out DIR, --shapes ...) are "
        "passed on to it. Results go to ~/.cache/aqlm_lora/bench unless --out is given; only --full "
        "(the whole sweep) rewrites the committed benchmarks/results.",
    )
    p.add_argument("--full", action="store_true", help="run the whole sweep and update benchmarks/results")

    p = sub.add_parser("demo", help="train a tiny Llama, quantize it to AQLM 2x8, recover with LoRA")
    p.add_argument("--out", default="aqlm_lora_demo", metavar="DIR", help="output directory (default ./aqlm_lora_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the model, data order and LoRA (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_quantize(args) -> int:
    import torch

    from ..quantize import mean_errors, parse_scheme, quantize_model
    from .data import has_tokenizer
    from .tokenizer_files import copy_tokenizer_files
    from .train import (
        DTYPES,
        UserError,
        aqlm_layer_names,
        check_input_dir,
        check_output_dir,
        config_dtype,
        load_causal_lm,
        load_model_config,
        staged_dir,
    )

    try:
        scheme = parse_scheme(args.scheme)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    out_dir = check_output_dir(args.out_dir, args.overwrite)
    if out_dir.resolve() == model_dir.resolve():
        raise UserError("OUT_DIR must differ from MODEL_DIR")
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    # Quantize in float32 whatever the checkpoint holds; save in the dtype asked for, else the checkpoint's.
    dtype = DTYPES[args.dtype] if args.dtype else config_dtype(load_model_config(model_dir)) or torch.float32
    model = load_causal_lm(model_dir)
    if aqlm_layer_names(model) or getattr(model.config, "quantization_config", None) is not None:
        raise UserError(f"{model_dir} is already quantized; quantize a dense checkpoint")
    torch.manual_seed(args.seed)
    try:
        errors = quantize_model(
            model,
            scheme,
            skip=skip,
            progress=not args.no_progress,
            rounds=args.rounds,
            kmeans_iters=args.kmeans_iters,
            beam_size=args.beam,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UserError(f"cannot quantize {model_dir}: {exc}") from None
    model.to(dtype)  # codes stay integers
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        copied = copy_tokenizer_files(model_dir, tmp)
    per_round = " -> ".join(f"{e:.4f}" for e in mean_errors(errors))
    print(f"quantized {len(errors)} layers to AQLM {scheme} ({scheme.bits_per_weight:g} bits/weight in codes)")
    print(f"relative weight error ||W - Wq|| / ||W||, mean over layers, per round: {per_round}")
    print(
        f"saved to {out_dir} ({str(dtype).removeprefix('torch.')}; copied {', '.join(copied) or 'no tokenizer files'})"
    )
    if not has_tokenizer(out_dir):
        print(
            f"note: {model_dir} has no tokenizer files; finetune and eval will need them in {out_dir}", file=sys.stderr
        )
    return 0


def cmd_finetune(args) -> int:
    from .checkpoint import default_checkpoint_dir
    from .train import check_input_dir, check_input_file

    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    data_path = check_input_file(args.data, "data file")
    out_dir = Path(args.out)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_checkpoint_dir(out_dir)
    resume_dir = _check_finetune_dirs(args, out_dir, checkpoint_dir)
    tokenizer, data = _model_inputs(args, model_dir, data_path, extra_token=True)
    job = _FinetuneJob(args, model_dir, data_path, out_dir, checkpoint_dir, data)
    job.load(tokenizer, resume_dir)
    return job.run()


def _check_finetune_dirs(args, out_dir: Path, checkpoint_dir: Path) -> Optional[Path]:
    """Check --out, --checkpoint-dir and --resume before anything is loaded; returns the folder to resume from."""
    from .checkpoint import check_checkpoint_dir, is_checkpoint_dir, latest_step_dir
    from .train import UserError, check_input_dir, check_output_dir

    if checkpoint_dir.resolve() == out_dir.resolve():
        raise UserError("--checkpoint-dir must differ from --out (checkpoints are kept apart from the adapter)")
    resume_dir, from_checkpoint = None, False
    if args.resume is not None:
        source = Path(args.resume) if args.resume else checkpoint_dir if is_checkpoint_dir(checkpoint_dir) else out_dir
        from_checkpoint = is_checkpoint_dir(source)
        if from_checkpoint:
            resume_dir = latest_step_dir(source)
        else:
            resume_dir = check_input_dir(source, "adapter directory", must_contain="adapter_config.json")
    resuming_own = from_checkpoint and resume_dir.parent.resolve() == checkpoint_dir.resolve()
    if not resuming_own and (resume_dir is None or out_dir.resolve() != resume_dir.resolve()):
        check_output_dir(out_dir, args.overwrite)
    check_checkpoint_dir(checkpoint_dir, overwrite=args.overwrite, resuming_from_it=resuming_own)
    return resume_dir


def _model_inputs(args, model_dir: Path, data_path: Path, *, extra_token: bool):
    """The model's tokenizer and the tokenized data, --seq settled against the model's positions."""
    from .data import load_tokenizer, read_data
    from .train import UserError, check_seq, load_model_config

    config = load_model_config(model_dir)
    if args.seq is None:
        limit = getattr(config, "max_position_embeddings", None)
        args.seq = min(DEFAULT_SEQ, limit) if isinstance(limit, int) and limit >= 2 else DEFAULT_SEQ
    check_seq(config, args.seq, model_dir)
    tokenizer = load_tokenizer(model_dir)
    data = read_data(data_path, tokenizer, args.data_format)
    need = args.seq + 1 if extra_token else args.seq
    if data.tokens.numel() < need:
        raise UserError(f"{data_path} has {data.tokens.numel()} tokens; --seq {args.seq} needs at least {need}")
    if data.targets == 0:
        raise UserError(f"{data_path} has no completion tokens to learn or score (only prompts)")
    return tokenizer, data


class _FinetuneJob:
    """One ``finetune`` run: models, adapter and optimizer (new or resumed), the loop, the saves."""

    def __init__(self, args, model_dir: Path, data_path: Path, out_dir: Path, checkpoint_dir: Path, data) -> None:
        self.args, self.model_dir, self.data_path = args, model_dir, data_path
        self.out_dir, self.checkpoint_dir, self.data = out_dir, checkpoint_dir, data
        self.previous_losses: list[float] = []
        self.saved_step = -1

    def load(self, tokenizer, resume_dir: Optional[Path]) -> None:
        import torch

        from .data import check_vocab
        from .train import DTYPES, UserError, aqlm_layer_names, enable_checkpointing, load_causal_lm, use_fused_base

        args = self.args
        dtype = DTYPES[args.dtype]
        self.teacher = _load_teacher(args.teacher, dtype, args.seq) if args.teacher else None
        model = load_causal_lm(self.model_dir, dtype)
        check_vocab(model.get_input_embeddings().num_embeddings, tokenizer, self.model_dir)
        if self.teacher is not None and self.teacher.get_output_embeddings().weight.shape[0] != model.config.vocab_size:
            raise UserError(f"the teacher {args.teacher} has another vocabulary size than {self.model_dir}")
        self.dense = not aqlm_layer_names(model)
        use_fused_base(model)
        if args.gradient_checkpointing:
            enable_checkpointing(model)
        if resume_dir is not None:
            self._resume(model, resume_dir)
        else:
            torch.manual_seed(args.seed)  # LoRA A's init
            self._start(model)

    def _start(self, model) -> None:
        from .train import make_optimizer, new_adapter

        self.start = 0
        self.settings = self._settings(self.args.steps or DEFAULT_STEPS)
        self.peft_model = new_adapter(model, self.args.r, self.args.alpha, self.args.dropout)
        self.optimizer = make_optimizer(self.peft_model, self.settings)

    def _resume(self, model, resume_dir: Path) -> None:
        from .train import OPTIMIZER_FILE, UserError, load_adapter, make_optimizer, one_line, read_training_state

        state, optimizer_state = read_training_state(resume_dir)
        self.start = int(state["global_step"])
        target = int(state.get("target_step", self.start))
        if target > self.start:  # an interrupted run: finish it, so the same command line continues it
            print(f"note: finishing the interrupted run: steps {self.start + 1}..{target}", file=sys.stderr)
        steps = target - self.start if target > self.start else self.args.steps or DEFAULT_STEPS
        self.settings = self._settings(steps)
        _note_changed_settings(state.get("settings"), self.settings)
        self.peft_model = load_adapter(model, resume_dir, trainable=True)
        self.optimizer = make_optimizer(self.peft_model, self.settings)
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise UserError(
                f"{resume_dir / OPTIMIZER_FILE} does not match the adapter in {resume_dir}: {one_line(exc)}"
            ) from None
        self.previous_losses = list(state.get("losses", []))

    def _settings(self, steps: int):
        from .train import TrainSettings

        a = self.args
        return TrainSettings(steps=steps, lr=a.lr, batch=a.batch, seq=a.seq, seed=a.seed, warmup=a.warmup)

    def state(self, step: int, losses: list[float], interrupted: bool = False) -> dict:
        from .train import settings_dict

        return {
            "global_step": step,
            "target_step": self.start + self.settings.steps,
            "interrupted": interrupted,
            "model_dir": str(self.model_dir),
            "data": str(self.data_path),
            "dtype": self.args.dtype,
            "settings": settings_dict(self.settings),
            "teacher": str(self.args.teacher) if self.args.teacher else None,
            "losses": self.previous_losses + losses,
        }

    def save_checkpoint(self, result, interrupted: bool = False) -> None:
        from .checkpoint import save_checkpoint

        if result.global_step == self.saved_step:
            return
        _check_finite_adapter(self.peft_model, result.global_step)
        save_checkpoint(
            self.checkpoint_dir,
            self.peft_model,
            self.optimizer,
            self.state(result.global_step, result.losses, interrupted),
        )
        self.saved_step = result.global_step

    def run(self) -> int:
        from .checkpoint import StopOnInterrupt
        from .progress import ProgressLog
        from .train import train_steps

        if self.dense:
            print(f"note: {self.model_dir} has no AQLM layers; training plain PEFT LoRA", file=sys.stderr)
        end = self.start + self.settings.steps
        log = ProgressLog(
            "finetune", "step", self.start, end, self.args.log_every, self.settings.batch * self.settings.seq
        )
        stop = StopOnInterrupt(
            f"{PROG}: stopping after this step to save a checkpoint in {self.checkpoint_dir} (Ctrl-C again: quit "
            "without saving)"
        )
        hook = _StepHook(self, log, stop)
        with stop:
            result = train_steps(
                self.peft_model,
                self.data.tokens,
                self.settings,
                self.optimizer,
                start_step=self.start,
                progress=not self.args.no_progress,
                desc="finetune",
                teacher=self.teacher,
                labels=self.data.labels,
                on_step=hook,
            )
        if stop.requested and result.global_step < end:  # on the last step: just save the adapter
            return self._interrupted(result, end)
        return self._finish(result)

    def _interrupted(self, result, end: int) -> int:
        self.save_checkpoint(result, interrupted=True)  # the loop stops after a step: there is one to save
        print(
            f"{PROG}: interrupted after step {result.global_step} of {end}; checkpoint saved in {self.checkpoint_dir} "
            "(run the same command with --resume to continue)",
            file=sys.stderr,
        )
        return 130

    def _finish(self, result) -> int:
        from .checkpoint import remove_checkpoint_dir
        from .train import save_training, staged_dir

        _check_finite_adapter(self.peft_model, result.global_step)
        with staged_dir(self.out_dir) as tmp:
            save_training(self.peft_model, self.optimizer, self.state(result.global_step, result.losses), tmp)
        remove_checkpoint_dir(self.checkpoint_dir)  # the adapter folder now holds the same state
        step_s = result.median_step_seconds()
        print(
            f"steps {self.start + 1}..{result.global_step}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
            f"{step_s:.3f} s/step ({self.settings.batch * self.settings.seq / step_s:,.0f} tokens/s)"
        )
        print(f"adapter and optimizer state saved to {self.out_dir}")
        return 0


class _StepHook:
    """After each step: a progress line when due, a checkpoint every --save-every steps, stop on Ctrl-C."""

    def __init__(self, job: _FinetuneJob, log, stop) -> None:
        self.job, self.log, self.stop = job, log, stop
        self.logged = 0  # losses already summarised in a line

    def __call__(self, result) -> bool:
        step = result.global_step
        if self.log.due(step):
            recent = result.losses[self.logged :]
            self.log.update(step, f"loss {sum(recent) / len(recent):.4f}")
            self.logged = len(result.losses)
        every = self.job.args.save_every
        last = step == self.job.start + self.job.settings.steps  # the final save follows anyway
        if every and step % every == 0 and not last and not self.stop.requested:
            self.job.save_checkpoint(result)
        return self.stop.requested


def _load_teacher(path: str, dtype, seq: int):
    from .train import check_input_dir, check_seq, load_causal_lm, load_model_config, use_fused_base

    teacher_dir = check_input_dir(path, "teacher directory", must_contain="config.json")
    check_seq(load_model_config(teacher_dir), seq, teacher_dir)
    teacher = load_causal_lm(teacher_dir, dtype).eval()
    teacher.requires_grad_(False)
    use_fused_base(teacher)
    return teacher


def _note_changed_settings(saved: object, settings) -> None:
    """Resuming with other batches/seeds/lr is allowed, but then it is no exact continuation: say so."""
    from .train import settings_dict

    if not isinstance(saved, dict):
        return
    flags = {"lr": "--lr", "batch": "--batch", "seq": "--seq", "seed": "--seed", "warmup": "--warmup"}
    now = settings_dict(settings)
    changed = [
        f"{flag} {now[key]} (was {saved[key]})"
        for key, flag in flags.items()
        if key in saved and saved[key] != now[key]
    ]
    if changed:
        print(f"note: resuming with {', '.join(changed)}: not an exact continuation", file=sys.stderr)


def cmd_eval(args) -> int:
    from .data import check_vocab
    from .text import perplexity
    from .train import (
        DTYPES,
        UserError,
        check_input_dir,
        check_input_file,
        load_adapter,
        load_causal_lm,
        use_fused_base,
    )

    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    data_path = check_input_file(args.data, "data file")
    tokenizer, data = _model_inputs(args, model_dir, data_path, extra_token=False)
    model = load_causal_lm(model_dir, DTYPES[args.dtype])
    check_vocab(model.get_input_embeddings().num_embeddings, tokenizer, model_dir)
    use_fused_base(model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    windows = data.tokens.numel() // args.seq
    if args.max_windows:
        windows = min(windows, args.max_windows)
    progress = _EvalProgress(args, windows)
    try:
        ppl = perplexity(
            model,
            data.tokens,
            args.seq,
            batch=args.batch,
            max_windows=args.max_windows,
            labels=data.labels,
            progress=progress,
        )
    except ValueError as exc:  # e.g. the windows hold prompt tokens only
        raise UserError(f"cannot evaluate {data_path}: {exc}") from None
    finally:
        progress.close()
    scored = "" if data.labels is None else ", completion tokens only"
    print(f"perplexity {ppl:.4f} ({windows} windows of {args.seq} tokens{scored})")
    return 0


class _EvalProgress:
    """A bar (on a terminal) and --log-every lines (anywhere) over the batches of ``eval``."""

    def __init__(self, args, windows: int) -> None:
        from tqdm.auto import tqdm

        from .progress import ProgressLog

        self.batch = args.batch
        batches = -(-windows // args.batch)
        self.log = ProgressLog("eval", "batch", 0, batches, args.log_every, args.batch * args.seq)
        self.bar = tqdm(total=windows, desc="eval", unit="window", disable=True if args.no_progress else None)

    def __call__(self, done: int, total: int, running_ppl: float) -> None:
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(ppl=f"{running_ppl:.3f}")
        self.log.update(-(-done // self.batch), f"ppl {running_ppl:.4f}")

    def close(self) -> None:
        self.bar.close()


def bench_script() -> Optional[Path]:
    """``benchmarks/cpu/bench_linear.py`` of the source checkout (next to the package, or in the cwd)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        candidate = root / "benchmarks" / "cpu" / "bench_linear.py"
        if candidate.is_file():
            return candidate
    return None


def cmd_bench(args) -> int:
    from .train import UserError

    script = bench_script()
    if script is None:
        raise UserError(
            "benchmarks/cpu/bench_linear.py not found: it ships with the source checkout, not the installed "
            "package; run `aqlm-lora bench` from the repository root"
        )
    command = [sys.executable, str(script)] + ([] if args.full else ["--quick"]) + list(args.extra)
    print("running " + " ".join(command), file=sys.stderr)
    # Kineto (the profiler behind the peak-memory column) prints profiler_start/stop lines per
    # measurement at every log level below 6; the user can still ask for them.
    env = dict(os.environ)
    env.setdefault("KINETO_LOG_LEVEL", "6")
    return subprocess.call(command, cwd=str(script.parent.parent), env=env)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.out, overwrite=args.overwrite, seed=args.seed, progress=not args.no_progress)


def _check_finite_adapter(peft_model, step: int) -> None:
    """The last update comes after the last loss we checked: refuse to save weights it made NaN/Inf."""
    from .train import UserError

    bad = [name for name, p in peft_model.named_parameters() if p.requires_grad and not bool(p.isfinite().all())]
    if bad:
        raise UserError(
            f"training diverged: after step {step} {len(bad)} adapter tensors (e.g. {bad[0]}) hold NaN/Inf; "
            "nothing was saved (try a lower --lr or --alpha)"
        )


COMMANDS = {"quantize": cmd_quantize, "finetune": cmd_finetune, "eval": cmd_eval, "bench": cmd_bench, "demo": cmd_demo}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``aqlm-lora`` / ``python -m aqlm_lora``; returns the exit code."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        return _closed_pipe()


def _main(argv: Optional[list[str]]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT 0.21 still reads transformers' deprecated `is_gradient_checkpointing`; not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from .train import UserError, quiet_transformers

    quiet_transformers()
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _closed_pipe() -> int:
    """The reader went away (``| head``): no traceback, and no second error when Python flushes at exit."""
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured by a test)
            continue
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return 141  # 128 + SIGPIPE, as a shell reports a command killed by the closed pipe


if __name__ == "__main__":
    sys.exit(main())
