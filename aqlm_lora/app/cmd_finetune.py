"""``aqlm-lora finetune MODEL_DIR --data FILE --out ADAPTER_DIR``: LoRA training, with checkpoints and --resume.

A run is a :class:`_FinetuneJob`: it loads the model (and the ``--teacher``), builds a new adapter
or resumes one (adapter + optimizer + trainer state), runs :func:`~aqlm_lora.app.train.train_steps`
with a hook that logs, checkpoints every ``--save-every`` steps and stops on Ctrl-C, and saves the
adapter folder only once the run is complete.

Under torchrun / accelerate launch (:mod:`aqlm_lora.app.distributed`) every process runs the same
job on its share of each global batch through DDP; only rank 0 checks and writes the output and
checkpoint folders and prints. A failure while setting up on any rank stops all of them
(:func:`_together`), and rank 0 hands the folder to resume from to the others.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

from ..lora.fused_base import use_fused_kernels
from .adapters import load_adapter, new_adapter
from .checkpoint import (
    StopOnInterrupt,
    check_checkpoint_dir,
    default_checkpoint_dir,
    is_checkpoint_dir,
    latest_step_dir,
    remove_checkpoint_dir,
    save_checkpoint,
)
from .data import check_vocab
from .distributed import Dist, check_batch, setup, wrap_ddp
from .errors import PROG, UserError, one_line
from .files import check_input_dir, check_input_file, check_output_apart, check_output_dir, staged_dir
from .inputs import model_inputs
from .models import DTYPES, aqlm_layer_names, check_seq, load_causal_lm, load_model_config
from .progress import LossLines, ProgressLog
from .train import TrainSettings, enable_checkpointing, make_optimizer, settings_dict, train_steps
from .train_state import OPTIMIZER_FILE, read_training_state, save_training

DEFAULT_STEPS = 100


def run(args) -> int:
    where = setup(getattr(args, "device", "cpu"))
    try:
        return _run(args, where)
    finally:
        where.close()


def _run(args, where: Dist) -> int:
    grad_accum = getattr(args, "grad_accum", 1)
    check_batch(args.batch, where.world, grad_accum)  # the same answer on every rank
    out_dir = Path(args.out)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else default_checkpoint_dir(out_dir)

    def check_paths() -> tuple[Path, Path, Optional[Path]]:
        model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
        data_path = check_input_file(args.data, "data file")
        # Only rank 0 writes, so only its view of --out, --checkpoint-dir and --resume counts.
        resume_dir = _check_finetune_dirs(args, out_dir, checkpoint_dir) if where.main else None
        return model_dir, data_path, resume_dir

    model_dir, data_path, resume_dir = _together(where, check_paths)
    local_resume = where.share_dir(resume_dir)
    try:
        tokenizer, data = _together(where, lambda: model_inputs(args, model_dir, data_path))
        job = _FinetuneJob(args, model_dir, data_path, out_dir, checkpoint_dir, data, where)
        _together(where, lambda: job.load(tokenizer, local_resume))
    finally:
        if local_resume is not None and local_resume != resume_dir:  # another rank's copy of rank 0's folder
            shutil.rmtree(local_resume.parent, ignore_errors=True)
    return job.run()


T = TypeVar("T")


def _together(where: Dist, action: Callable[[], T]) -> T:
    """``action()`` on every rank; if it fails on any, every rank stops (none is left waiting for it)."""
    try:
        value = action()
    except BaseException:
        where.all_ok(False)
        raise
    if not where.all_ok(True):
        raise UserError(f"rank {where.rank}: stopping, another process failed (its error is above)")
    return value


def _check_finetune_dirs(args, out_dir: Path, checkpoint_dir: Path) -> Optional[Path]:
    """Check --out, --checkpoint-dir and --resume before anything is loaded; returns the folder to resume from."""
    check_output_apart(out_dir, "--out", {"MODEL_DIR": args.model_dir, "--teacher": args.teacher})
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


class _FinetuneJob:
    """One ``finetune`` run: models, adapter and optimizer (new or resumed), the loop, the saves."""

    def __init__(
        self, args, model_dir: Path, data_path: Path, out_dir: Path, checkpoint_dir: Path, data, where: Dist
    ) -> None:
        self.args, self.model_dir, self.data_path = args, model_dir, data_path
        self.out_dir, self.checkpoint_dir, self.data = out_dir, checkpoint_dir, data
        self.where = where
        self.grad_accum = getattr(args, "grad_accum", 1)
        self.previous_losses: list[float] = []
        self.saved_step = -1

    def note(self, message: str) -> None:
        """A ``note:`` line on stderr, from rank 0 only."""
        if self.where.main:
            print(f"note: {message}", file=sys.stderr)

    def load(self, tokenizer, resume_dir: Optional[Path]) -> None:
        args = self.args
        dtype = DTYPES[args.dtype]
        self.teacher = _load_teacher(args.teacher, dtype, args.seq) if args.teacher else None
        model = load_causal_lm(self.model_dir, dtype)
        check_vocab(model.get_input_embeddings().num_embeddings, tokenizer, self.model_dir)
        if self.teacher is not None and self.teacher.get_output_embeddings().weight.shape[0] != model.config.vocab_size:
            raise UserError(f"the teacher {args.teacher} has another vocabulary size than {self.model_dir}")
        self.dense = not aqlm_layer_names(model)
        use_fused_kernels(model)
        model.to(self.where.device)
        if self.teacher is not None:
            self.teacher.to(self.where.device)
        if args.gradient_checkpointing:
            enable_checkpointing(model)
        if resume_dir is not None:
            self._resume(model, resume_dir)
        else:
            torch.manual_seed(args.seed)  # LoRA A's init (the same on every rank)
            self._start(model)
        # What trains: the PEFT model, under DDP on several processes (LoRA weights all-reduced only).
        self.train_model = wrap_ddp(self.peft_model, self.where) if self.where.active else self.peft_model

    def _start(self, model) -> None:
        self.start = 0
        self.settings = self._settings(self.args.steps or DEFAULT_STEPS)
        self.peft_model = new_adapter(model, self.args.r, self.args.alpha, self.args.dropout)
        self.optimizer = make_optimizer(self.peft_model, self.settings)

    def _resume(self, model, resume_dir: Path) -> None:
        state, optimizer_state = read_training_state(resume_dir)
        self.start = int(state["global_step"])
        target = int(state.get("target_step", self.start))
        if target > self.start:  # an interrupted run: finish it, so the same command line continues it
            self.note(f"finishing the interrupted run: steps {self.start + 1}..{target}")
        steps = target - self.start if target > self.start else self.args.steps or DEFAULT_STEPS
        self.settings = self._settings(steps)
        self.peft_model = load_adapter(model, resume_dir, trainable=True)
        if self.where.main:
            _note_changed_settings(state.get("settings"), self.settings)
            self._note_other_split(state)
        self.optimizer = make_optimizer(self.peft_model, self.settings)
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            raise UserError(
                f"{resume_dir / OPTIMIZER_FILE} does not match the adapter in {resume_dir}: {one_line(exc)}"
            ) from None
        self.previous_losses = list(state.get("losses", []))

    def _note_other_split(self, state: dict) -> None:
        """Another process count is fine (global steps, global batches); only dropout masks follow the split."""
        saved = state.get("processes", 1), state.get("grad_accum", 1)
        if not all(isinstance(v, int) for v in saved):
            return
        chunks, saved_chunks = self.where.world * self.grad_accum, saved[0] * saved[1]
        dropout = getattr(self.peft_model.peft_config.get("default"), "lora_dropout", 0.0)
        if chunks != saved_chunks and dropout:
            self.note(
                f"resuming on {self.where.world} process(es) x --grad-accum {self.grad_accum} (was {saved[0]} x "
                f"{saved[1]}): the same batches, but other dropout masks (they are drawn per micro-batch)"
            )

    def _settings(self, steps: int):
        a = self.args
        return TrainSettings(steps=steps, lr=a.lr, batch=a.batch, seq=a.seq, seed=a.seed, warmup=a.warmup)

    def state(self, step: int, losses: list[float], interrupted: bool = False) -> dict:
        return {
            "global_step": step,
            "target_step": self.start + self.settings.steps,
            "interrupted": interrupted,
            "model_dir": str(self.model_dir),
            "data": str(self.data_path),
            "dtype": self.args.dtype,
            "settings": settings_dict(self.settings),
            "teacher": str(self.args.teacher) if self.args.teacher else None,
            "processes": self.where.world,
            "grad_accum": self.grad_accum,
            "losses": self.previous_losses + losses,
        }

    def save_checkpoint(self, result, interrupted: bool = False) -> None:
        """Rank 0 writes a checkpoint (every rank checks the weights, so all refuse a NaN together)."""
        if result.global_step == self.saved_step:
            return
        _check_finite_adapter(self.peft_model, result.global_step)
        self.saved_step = result.global_step
        if not self.where.main:
            return
        save_checkpoint(
            self.checkpoint_dir,
            self.peft_model,
            self.optimizer,
            self.state(result.global_step, result.losses, interrupted),
        )

    def run(self) -> int:
        main = self.where.main
        if self.dense:
            self.note(f"{self.model_dir} has no AQLM layers; training plain PEFT LoRA")
        end = self.start + self.settings.steps
        log = ProgressLog(
            "finetune",
            "step",
            self.start,
            end,
            self.args.log_every if main else 0,
            self.settings.batch * self.settings.seq,
        )
        stop = StopOnInterrupt(
            f"{PROG}: stopping after this step to save a checkpoint in {self.checkpoint_dir} (Ctrl-C again: quit "
            "without saving)",
            same_within=3.0 if self.where.active else 0.0,  # torchrun forwards the terminal's Ctrl-C again
            quiet=not main,
        )
        hook = _StepHook(self, log)
        with stop:
            result = train_steps(
                self.train_model,
                self.data.tokens,
                self.settings,
                self.optimizer,
                start_step=self.start,
                progress=main and not self.args.no_progress,
                desc="finetune",
                teacher=self.teacher,
                labels=self.data.labels,
                on_step=hook,
                stop_requested=lambda: stop.requested,
                where=self.where,
                grad_accum=self.grad_accum,
            )
        if result.stopped and result.global_step < end:  # on the last step: just save the adapter
            return self._interrupted(result, end)
        return self._finish(result)

    def _interrupted(self, result, end: int) -> int:
        self.save_checkpoint(result, interrupted=True)  # the loop stops after a step: there is one to save
        if self.where.main:
            print(
                f"{PROG}: interrupted after step {result.global_step} of {end}; checkpoint saved in "
                f"{self.checkpoint_dir} (run the same command with --resume to continue)",
                file=sys.stderr,
            )
        self.where.barrier()  # no rank exits (and gets the others killed by the launcher) before the save
        return 130

    def _finish(self, result) -> int:
        _check_finite_adapter(self.peft_model, result.global_step)
        if self.where.main:
            with staged_dir(self.out_dir) as tmp:
                save_training(self.peft_model, self.optimizer, self.state(result.global_step, result.losses), tmp)
            remove_checkpoint_dir(self.checkpoint_dir)  # the adapter folder now holds the same state
            step_s = result.median_step_seconds()
            procs = f" on {self.where.world} processes" if self.where.active else ""
            print(
                f"steps {self.start + 1}..{result.global_step}: loss {result.losses[0]:.4f} -> "
                f"{result.losses[-1]:.4f}, {step_s:.3f} s/step ({self.settings.batch * self.settings.seq / step_s:,.0f}"
                f" tokens/s{procs})"
            )
            print(f"adapter and optimizer state saved to {self.out_dir}")
        self.where.barrier()
        return 0


class _StepHook:
    """After each step: a progress line when due, a checkpoint every --save-every steps (rank 0 writes it)."""

    def __init__(self, job: _FinetuneJob, log) -> None:
        self.job, self.lines = job, LossLines(log)

    def __call__(self, result) -> bool:
        step = result.global_step
        self.lines(result)
        every = self.job.args.save_every
        last = step == self.job.start + self.job.settings.steps  # the final save follows anyway
        if every and step % every == 0 and not last and not result.stopped:  # a stop saves right after
            self.job.save_checkpoint(result)
        return False  # stopping is train_steps' business (stop_requested, agreed over the ranks)


def _load_teacher(path: str, dtype, seq: int):
    teacher_dir = check_input_dir(path, "teacher directory", must_contain="config.json")
    check_seq(load_model_config(teacher_dir), seq, teacher_dir)
    teacher = load_causal_lm(teacher_dir, dtype).eval()
    teacher.requires_grad_(False)
    use_fused_kernels(teacher)
    return teacher


def _note_changed_settings(saved: object, settings) -> None:
    """Resuming with other batches/seeds/lr is allowed, but then it is no exact continuation: say so."""
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


def _check_finite_adapter(peft_model, step: int) -> None:
    """The last update comes after the last loss we checked: refuse to save weights it made NaN/Inf."""
    bad = [name for name, p in peft_model.named_parameters() if p.requires_grad and not bool(p.isfinite().all())]
    if bad:
        raise UserError(
            f"training diverged: after step {step} {len(bad)} adapter tensors (e.g. {bad[0]}) hold NaN/Inf; "
            "nothing was saved (try a lower --lr or --alpha)"
        )
