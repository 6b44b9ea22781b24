"""``aqlm-lora``: quantize, fine-tune, evaluate, benchmark, and the end-to-end demo.

    aqlm-lora quantize MODEL_DIR OUT_DIR --scheme 2x8
    aqlm-lora finetune MODEL_DIR --data FILE.txt --out ADAPTER_DIR [--steps N ...] [--resume]
    aqlm-lora eval MODEL_DIR [--adapter DIR] --data FILE.txt
    aqlm-lora bench [ARGS for benchmarks/bench_linear.py]
    aqlm-lora demo [--out ./aqlm_lora_demo]

Mistakes (missing paths, bad scheme, non-empty output directory, adapter of another model, a
number flag that is not finite or out of its range, a wrong-typed config field, a truncated or
corrupt weight/adapter/optimizer file, a NaN weight...) are reported as one ``aqlm-lora: error: ...``
line on stderr, naming the flag or file, with a non-zero exit code. Number flags are checked when
the command line is parsed (exit code 2), before anything is loaded. Output
directories are written to a temporary sibling and renamed into place, so an existing directory is
only replaced (with ``--overwrite``) once the new one is complete.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
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


def build_parser() -> argparse.ArgumentParser:
    from .quantize import SCHEME_GRAMMAR

    parser = _Parser(prog=PROG, description="Fast LoRA on AQLM-quantized models (PEFT drop-in).")
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
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("finetune", help="LoRA fine-tuning (PEFT adapter) of an AQLM or dense model")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--data", required=True, metavar="FILE", help="training text (read as bytes)")
    p.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="where to save the adapter")
    p.add_argument("--r", type=_POSITIVE, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=_float_in(0, low_open=True), default=32.0, help="LoRA alpha, > 0 (default 32)")
    p.add_argument(
        "--dropout", type=_float_in(0, 1, high_open=True), default=0.05, help="LoRA dropout, in [0, 1) (default 0.05)"
    )
    p.add_argument("--steps", type=_POSITIVE, default=100, help="optimizer steps in this run (default 100)")
    p.add_argument(
        "--lr", type=_float_in(0, 1, low_open=True), default=1e-3, help="AdamW learning rate, in (0, 1] (default 1e-3)"
    )
    p.add_argument("--warmup", type=_COUNT, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--batch", type=_POSITIVE, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=_POSITIVE, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument(
        "--teacher",
        metavar="DENSE_DIR",
        help="distil from this (dense) model: KL to its next-token distribution instead of the data's "
        "next token, as AQLM's own fine-tuning does (same tokenizer and vocabulary)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue from the adapter and optimizer state in DIR (default: --out); rank, alpha and "
        "dropout then come from the saved adapter",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (not needed with --resume)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="perplexity of a model (optionally with a LoRA adapter) on a text file")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter directory")
    p.add_argument("--data", required=True, metavar="FILE")
    p.add_argument("--seq", type=_POSITIVE, default=128, help="window length (default 128)")
    p.add_argument("--batch", type=_POSITIVE, default=16)
    p.add_argument("--max-windows", type=_COUNT, default=0, help="evaluate at most this many windows")

    p = sub.add_parser(
        "bench",
        help="run benchmarks/bench_linear.py --quick (source checkout only)",
        description="Run benchmarks/bench_linear.py --quick; other arguments (--out DIR, --shapes ...) are "
        "passed on to it. Results go to ~/.cache/aqlm_lora/bench unless --out is given; only --full "
        "(the whole sweep) rewrites the committed benchmarks/results.",
    )
    p.add_argument("--full", action="store_true", help="run the whole sweep and update benchmarks/results")

    p = sub.add_parser("demo", help="train a tiny Llama, quantize it to AQLM 2x8, recover with LoRA")
    p.add_argument("--out", default="aqlm_lora_demo", metavar="DIR", help="output directory (default ./aqlm_lora_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--no-progress", action="store_true")
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_quantize(args) -> int:
    import torch

    from .quantize import mean_errors, parse_scheme, quantize_model
    from .text import TOKENIZER_FILE
    from .train import UserError, aqlm_layer_names, check_input_dir, check_output_dir, load_causal_lm, staged_dir

    try:
        scheme = parse_scheme(args.scheme)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    out_dir = check_output_dir(args.out_dir, args.overwrite)
    if out_dir.resolve() == model_dir.resolve():
        raise UserError("OUT_DIR must differ from MODEL_DIR")
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
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
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        if (model_dir / TOKENIZER_FILE).is_file():
            shutil.copy2(model_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    per_round = " -> ".join(f"{e:.4f}" for e in mean_errors(errors))
    print(f"quantized {len(errors)} layers to AQLM {scheme} ({scheme.bits_per_weight:g} bits/weight in codes)")
    print(f"relative weight error ||W - Wq|| / ||W||, mean over layers, per round: {per_round}")
    print(f"saved to {out_dir}")
    return 0


def cmd_finetune(args) -> int:
    import torch

    from .text import ByteTokenizer, encode_file
    from .train import (
        OPTIMIZER_FILE,
        TrainSettings,
        UserError,
        aqlm_layer_names,
        check_input_dir,
        check_input_file,
        check_output_dir,
        enable_checkpointing,
        load_adapter,
        load_causal_lm,
        make_optimizer,
        new_adapter,
        one_line,
        read_training_state,
        save_training,
        settings_dict,
        staged_dir,
        train_steps,
        use_fused_base,
    )

    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    data = check_input_file(args.data, "data file")
    out_dir = Path(args.out)
    resume_dir = None
    if args.resume is not None:
        resume_dir = check_input_dir(args.resume or out_dir, "adapter directory", must_contain="adapter_config.json")
    if resume_dir is None or out_dir.resolve() != resume_dir.resolve():
        check_output_dir(out_dir, args.overwrite)
    tokenizer = _load_tokenizer(model_dir, ByteTokenizer)
    tokens = encode_file(data, tokenizer)
    if tokens.numel() < args.seq + 1:
        raise UserError(f"{data} has {tokens.numel()} bytes; --seq {args.seq} needs at least {args.seq + 1}")

    teacher = None
    if args.teacher:
        teacher_dir = check_input_dir(args.teacher, "teacher directory", must_contain="config.json")
        teacher = load_causal_lm(teacher_dir).eval()
        teacher.requires_grad_(False)
        use_fused_base(teacher)
    model = load_causal_lm(model_dir)
    _check_vocab(model, tokenizer, model_dir)
    if teacher is not None and teacher.get_output_embeddings().weight.shape[0] != model.config.vocab_size:
        raise UserError(f"the teacher {args.teacher} has another vocabulary size than {model_dir}")
    dense = not aqlm_layer_names(model)
    use_fused_base(model)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    settings = TrainSettings(
        steps=args.steps, lr=args.lr, batch=args.batch, seq=args.seq, seed=args.seed, warmup=args.warmup
    )
    previous_losses: list[float] = []
    if resume_dir is not None:
        state, optimizer_state = read_training_state(resume_dir)
        peft_model = load_adapter(model, resume_dir, trainable=True)
        optimizer = make_optimizer(peft_model, settings)
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise UserError(
                f"{resume_dir / OPTIMIZER_FILE} does not match the adapter in {resume_dir}: {one_line(exc)}"
            ) from None
        start = int(state["global_step"])
        previous_losses = list(state.get("losses", []))
    else:
        torch.manual_seed(args.seed)  # LoRA A's init
        peft_model = new_adapter(model, args.r, args.alpha, args.dropout)
        optimizer = make_optimizer(peft_model, settings)
        start = 0
    if dense:
        print(f"note: {model_dir} has no AQLM layers; training plain PEFT LoRA", file=sys.stderr)
    result = train_steps(
        peft_model,
        tokens,
        settings,
        optimizer,
        start_step=start,
        progress=not args.no_progress,
        desc="finetune",
        teacher=teacher,
    )
    _check_finite_adapter(peft_model, result.global_step)
    state = {
        "global_step": result.global_step,
        "model_dir": str(model_dir),
        "data": str(data),
        "settings": settings_dict(settings),
        "teacher": str(args.teacher) if args.teacher else None,
        "losses": previous_losses + result.losses,
    }
    with staged_dir(out_dir) as tmp:
        save_training(peft_model, optimizer, state, tmp)
    step_s = result.median_step_seconds()
    print(
        f"steps {start + 1}..{result.global_step}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
        f"{step_s:.3f} s/step ({settings.batch * settings.seq / step_s:,.0f} tokens/s)"
    )
    print(f"adapter and optimizer state saved to {out_dir}")
    return 0


def cmd_eval(args) -> int:
    from .text import ByteTokenizer, encode_file, perplexity
    from .train import UserError, check_input_dir, check_input_file, load_adapter, load_causal_lm, use_fused_base

    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    data = check_input_file(args.data, "data file")
    tokenizer = _load_tokenizer(model_dir, ByteTokenizer)
    tokens = encode_file(data, tokenizer)
    if tokens.numel() < args.seq:
        raise UserError(f"{data} has {tokens.numel()} bytes; --seq {args.seq} needs at least {args.seq}")
    model = load_causal_lm(model_dir)
    _check_vocab(model, tokenizer, model_dir)
    use_fused_base(model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    ppl = perplexity(model, tokens, args.seq, batch=args.batch, max_windows=args.max_windows)
    windows = tokens.numel() // args.seq
    if args.max_windows:
        windows = min(windows, args.max_windows)
    print(f"perplexity {ppl:.4f} ({windows} windows of {args.seq} tokens)")
    return 0


def bench_script() -> Optional[Path]:
    """``benchmarks/bench_linear.py`` of the source checkout (next to the package, or in the cwd)."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        candidate = root / "benchmarks" / "bench_linear.py"
        if candidate.is_file():
            return candidate
    return None


def cmd_bench(args) -> int:
    from .train import UserError

    script = bench_script()
    if script is None:
        raise UserError(
            "benchmarks/bench_linear.py not found: it ships with the source checkout, not the installed "
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


def _load_tokenizer(model_dir: Path, cls):
    from .train import UserError

    try:
        return cls.load(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None


def _check_vocab(model, tokenizer, model_dir: Path) -> None:
    from .train import UserError

    vocab = model.get_input_embeddings().num_embeddings
    if vocab < tokenizer.vocab_size:
        raise UserError(f"{model_dir} has {vocab} token embeddings; the byte tokenizer needs {tokenizer.vocab_size}")


COMMANDS = {"quantize": cmd_quantize, "finetune": cmd_finetune, "eval": cmd_eval, "bench": cmd_bench, "demo": cmd_demo}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``aqlm-lora`` / ``python -m aqlm_lora``; returns the exit code."""
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


if __name__ == "__main__":
    sys.exit(main())
