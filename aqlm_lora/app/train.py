"""The training loop of ``finetune`` and the demo: AdamW steps on random windows, the losses, the schedule.

Step ``t`` draws its batch and its dropout seeds from ``(seed, t)`` only, so 2 steps + resume 2
steps gives the same adapter as 4 steps in one go. What a run saves to resume from is
:mod:`aqlm_lora.app.train_state`'s; periodic and interrupt checkpoints are :mod:`aqlm_lora.app.checkpoint`'s.

On several processes (:mod:`aqlm_lora.app.distributed`) each one runs its share of the global
batch; the loss of a share is scaled so that DDP's gradient average equals the gradient of the
global batch's loss, so K processes train the same adapter as one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

# The old name of use_fused_kernels, for callers from before it moved to the library (app code
# imports aqlm_lora.lora.fused_base directly).
from ..lora.fused_base import use_fused_kernels as use_fused_base  # noqa: F401
from .distributed import Dist, Shares
from .errors import UserError
from .text import IGNORE, random_starts, take_windows


@dataclass
class TrainSettings:
    steps: int = 100
    lr: float = 1e-3
    batch: int = 8
    seq: int = 128
    seed: int = 0
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class TrainResult:
    global_step: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    stopped: bool = False  # a stop request (Ctrl-C on any rank) ended the run after this step

    def median_step_seconds(self, skip_first: bool = True) -> float:
        times = self.step_seconds[1:] if skip_first and len(self.step_seconds) > 1 else self.step_seconds
        return sorted(times)[len(times) // 2] if times else float("nan")


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _step_seed(seed: int, step: int, stream: int) -> int:
    return (seed * 1_000_003 + step * 2 + stream) % (2**63)


# Between the dropout seeds of two micro-batches of a step (odd, so micro-batches never share one).
_MICRO_BATCH_STRIDE = 0x9E3779B97F4A7C15


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The seed of torch's default generator (hence of the dropout masks) for micro-batch ``index``
    of step ``step``: ``(seed * 1000003 + 2 * step + 1 + index * 0x9E3779B97F4A7C15) mod 2**63``.

    Micro-batch 0 keeps the seed a one-process run always used, so old checkpoints resume exactly.
    """
    return (_step_seed(seed, step, 1) + index * _MICRO_BATCH_STRIDE) % (2**63)


# ``on_step(result)`` after every step; True stops training there (on several processes every
# rank must return the same; a per-rank request such as Ctrl-C goes through ``stop_requested``).
StepCallback = Callable[[TrainResult], bool]


def train_steps(
    model: nn.Module,
    tokens: Tensor,
    settings: TrainSettings,
    optimizer: torch.optim.Optimizer,
    *,
    start_step: int = 0,
    progress: bool = True,
    desc: str = "finetune",
    lr_schedule=None,
    teacher: Optional[nn.Module] = None,
    labels: Optional[Tensor] = None,
    on_step: Optional[StepCallback] = None,
    stop_requested: Optional[Callable[[], bool]] = None,
    where: Optional[Dist] = None,
    grad_accum: int = 1,
) -> TrainResult:
    """``settings.steps`` AdamW steps on random windows of ``tokens`` (fewer if ``on_step`` stops it).

    The loss is the next-token cross-entropy, or with a ``teacher`` the KL divergence from the
    teacher's next-token distribution to the model's (distillation, as in AQLM's own fine-tuning:
    the quantized model learns to behave like the dense one). With ``labels`` (same shape as
    ``tokens``) positions whose next token is labelled ``IGNORE`` (prompts) do not count in either.
    Step ``t`` (global, counted from ``start_step``) takes its batch from generator seed
    ``(seed, t)`` and seeds torch's default generator (dropout) the same way. The learning rate is
    ``lr_schedule(t)`` when given, else ``lr`` with a linear warm-up over ``settings.warmup`` steps.

    The global batch (``settings.batch`` rows) is cut into ``world * grad_accum`` micro-batches in
    row order (:class:`~aqlm_lora.app.distributed.Shares`); this process runs its ``grad_accum``
    ones (``where``: rank, world, device; ``model`` is then DDP-wrapped), each seeding torch's
    default generator with :func:`micro_batch_seed`. Each micro-batch's loss is its share of the
    global batch's mean (sum over its trained positions / the global batch's count), times
    ``world`` because DDP averages gradients, so the update equals one process's on the whole
    batch. The recorded loss is the global mean, summed over the processes in one all-reduce that
    also carries a non-finite flag and ``stop_requested()`` (so Ctrl-C on any rank stops all of
    them after the same step: ``result.stopped``).
    """
    from tqdm.auto import tqdm

    if tokens.numel() < settings.seq:
        raise UserError(f"the training text has {tokens.numel()} tokens; --seq {settings.seq} needs at least that many")
    where = where if where is not None else Dist()
    shares = Shares(settings.batch, where.world, where.rank, grad_accum)
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    result = TrainResult(global_step=start_step)
    bar = tqdm(
        range(settings.steps), desc=desc, unit="step", disable=None if progress else True, dynamic_ncols=True
    )  # None: only on a terminal
    tokens_per_step = settings.batch * settings.seq
    mine = list(shares.mine)
    for _ in bar:
        step = result.global_step
        lr = lr_schedule(step) if lr_schedule is not None else _warmup_lr(settings, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(_step_seed(settings.seed, step, 0))
        starts = random_starts(tokens.numel(), settings.batch, settings.seq, generator)  # the global batch
        trained = _trained_positions(labels, starts, settings.seq) if labels is not None else None
        seconds, loss_sum, nonfinite = 0.0, 0.0, False
        for k, index in enumerate(mine):
            rows = starts[index * shares.rows : (index + 1) * shares.rows]
            batch = take_windows(tokens, rows, settings.seq).to(where.device)
            targets = take_windows(labels, rows, settings.seq).to(where.device) if labels is not None else None
            torch.manual_seed(micro_batch_seed(settings.seed, step, index))
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch).logits
            start = time.perf_counter()  # the step time counts the model's forward, backward and update only
            last = k == len(mine) - 1
            with model.no_sync() if where.active and not last else contextlib.nullcontext():  # one all-reduce
                loss = _step_loss(model, batch, targets, teacher_logits, shares.rows / settings.batch, trained)
                value = float(loss.detach())
                if not math.isfinite(value):
                    if not where.active:  # the user's numbers (lr, alpha, weights, data), not a bug
                        raise _diverged(value, step)
                    nonfinite = True  # the other ranks are in this step's all-reduce: agree first
                (loss * where.world if where.world != 1 else loss).backward()
            seconds += time.perf_counter() - start
            loss_sum += value
        start = time.perf_counter()
        stop = stop_requested() if stop_requested is not None else False
        loss, nonfinite, stop = where.step_stats(loss_sum, nonfinite, stop)
        if nonfinite:
            raise _diverged(loss, step)
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        result.losses.append(loss)
        result.step_seconds.append(seconds)
        result.global_step += 1
        result.stopped = stop
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}")
        if on_step is not None and on_step(result):
            result.stopped = True
        if result.stopped:
            break
    bar.close()
    return result


def _warmup_lr(settings: TrainSettings, step: int) -> float:
    return settings.lr * min(1.0, (step + 1) / settings.warmup) if settings.warmup else settings.lr


def _diverged(loss: float, step: int) -> UserError:
    return UserError(
        f"the loss is {loss} at step {step}: training diverged, or the model holds "
        "non-finite weights (try a lower --lr or --alpha)"
    )


def _trained_positions(labels: Tensor, starts: list[int], seq: int) -> int:
    """How many next-token targets of the windows at ``starts`` are trained (labelled, not ``IGNORE``)."""
    return sum(int((labels[s + 1 : s + seq] != IGNORE).sum()) for s in starts)


def _step_loss(
    model: nn.Module,
    batch: Tensor,
    targets: Optional[Tensor],
    teacher_logits: Optional[Tensor],
    share: float = 1.0,
    trained: Optional[int] = None,
) -> Tensor:
    """This micro-batch's part of the global batch's loss (see :func:`train_steps`).

    ``share``: its fraction of the global batch's rows (every row has as many positions); with
    labels, ``trained`` is the global batch's count of trained positions, the denominator of the
    mean, so micro-batches with more prompt tokens weigh less, as in one batch.
    """
    if targets is None and teacher_logits is None:  # transformers' own loss, as before labels existed
        loss = model(input_ids=batch, labels=batch).loss
        return loss if share == 1.0 else loss * share
    logits = model(input_ids=batch).logits
    if teacher_logits is not None:
        mask = None if targets is None else targets[:, 1:] != IGNORE
        loss = distillation_loss(logits, teacher_logits, mask, denominator=trained)
        return loss if share == 1.0 or mask is not None else loss * share
    return next_token_loss(logits, targets, denominator=trained)


def next_token_loss(logits: Tensor, labels: Tensor, denominator: Optional[int] = None) -> Tensor:
    """Mean cross-entropy of the next token over the labels that are not ``IGNORE`` (0 if there are none).

    A batch of prompt tokens only then trains nothing, where transformers' mean would be 0/0 = NaN.
    ``denominator``: divide the sum by this count instead (the whole batch's, for one micro-batch).
    """
    shifted = labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(shifted.numel(), -1), shifted, ignore_index=IGNORE, reduction="sum"
    )
    count = int((shifted != IGNORE).sum()) if denominator is None else denominator
    return total / max(1, count)


def distillation_loss(
    logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None, denominator: Optional[int] = None
) -> Tensor:
    """Mean over tokens of ``KL(teacher || model)`` of the next-token distributions.

    With ``mask`` (``[batch, seq - 1]``, True where the next token is trained) only those positions
    count, and ``denominator`` (if given) replaces their count in the mean.
    """
    if logits.shape != teacher_logits.shape:
        raise UserError(
            f"the teacher's logits {list(teacher_logits.shape)} do not match the model's {list(logits.shape)}"
        )
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(teacher_logits.float(), dim=-1)
    if mask is None:
        return torch.nn.functional.kl_div(
            log_p.flatten(0, -2), log_q.flatten(0, -2), log_target=True, reduction="batchmean"
        )
    per_position = torch.nn.functional.kl_div(log_p[:, :-1], log_q[:, :-1], log_target=True, reduction="none").sum(-1)
    count = int(mask.sum()) if denominator is None else denominator
    return (per_position * mask).sum() / max(1, count)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing on a transformers model, non-reentrant."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def settings_dict(settings: TrainSettings) -> dict:
    return asdict(settings)


def cosine_schedule(lr: float, steps: int, warmup: int, floor: float = 0.1):
    """Linear warm-up then cosine decay to ``floor * lr`` (for training from scratch)."""

    def schedule(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))

    return schedule
