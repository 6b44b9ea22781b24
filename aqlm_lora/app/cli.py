"""``aqlm-lora``: quantize, fine-tune, evaluate, benchmark, and the end-to-end demo.

    aqlm-lora quantize MODEL_DIR OUT_DIR --scheme 2x8 [--dtype bfloat16]
    aqlm-lora finetune MODEL_DIR --data FILE.{txt,jsonl} --out ADAPTER_DIR [--steps N ...] [--save-every N] [--resume]
    aqlm-lora eval MODEL_DIR [--adapter DIR] --data FILE.{txt,jsonl}
    aqlm-lora generate MODEL_DIR [--adapter NAME=DIR ...] --prompts FILE.jsonl [--out FILE.jsonl]
    aqlm-lora bench [ARGS for benchmarks/cpu/bench_linear.py]
    aqlm-lora demo [--size small|medium] [--out DIR]

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
import importlib
import math
import os
import sys
import warnings
from typing import Optional

from .errors import PROG


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
    from .inputs import DEFAULT_SEQ

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
    from .cmd_demo import DEMO_OUT, DEMO_SIZES
    from .cmd_finetune import DEFAULT_STEPS
    from .models import DTYPE_CHOICES

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
    p.add_argument(
        "--batch",
        type=_POSITIVE,
        default=8,
        help="sequences per step, over all processes under torchrun (each takes an equal share; default 8)",
    )
    p.add_argument(
        "--grad-accum",
        type=_POSITIVE,
        default=1,
        metavar="N",
        help="run each process's share of --batch as N micro-batches (gradient accumulation; default 1)",
    )
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
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to train (default cpu); under torchrun: cpu uses gloo, cuda NCCL with one GPU per process",
    )
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

    p = sub.add_parser(
        "demo",
        help="train a Llama, quantize it to AQLM, recover with LoRA, measure (small: minutes; medium: longer)",
        description="small (default): a 0.9M-parameter Llama on bytes, AQLM 2x8, LoRA, perplexity and step "
        "times. medium: a ~23M-parameter Llama with its own BPE tokenizer, AQLM 2x8 and 1x16 each with LoRA, "
        "and LoRA step time and peak memory of ours, PEFT's stock layer and dense PEFT LoRA.",
    )
    p.add_argument(
        "--size", choices=DEMO_SIZES, default="small", help="which demo: small (default, minutes) or medium (longer)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"output directory (default ./{DEMO_OUT['small']}, or ./{DEMO_OUT['medium']} with --size medium)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the model, data order and LoRA (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    from .cmd_merge import add_parser as add_merge_parser

    add_merge_parser(sub)
    from .cmd_generate import add_parser as add_generate_parser

    add_generate_parser(sub)
    return parser


# Each command's module (``run(args) -> exit code``), imported when the command runs: `--help` loads none.
COMMANDS = {
    "quantize": "cmd_quantize",
    "finetune": "cmd_finetune",
    "eval": "cmd_eval",
    "bench": "cmd_bench",
    "demo": "cmd_demo",
    "merge": "cmd_merge",
    "generate": "cmd_generate",
}


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
    from .errors import UserError
    from .models import quiet_transformers

    quiet_transformers()
    try:
        command = importlib.import_module(f"{__package__}.{COMMANDS[args.command]}")
        return command.run(args)
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
