"""LoRA fine-tuning and evaluation of (AQLM) causal LMs, as the CLI and the demo run them.

Adapters are plain PEFT adapters (``save_pretrained``), built through :func:`aqlm_lora.register`
so every ``aqlm.QuantizedLinear`` gets our fused layer. Next to the adapter we save
``optimizer.pt`` (AdamW state) and ``trainer_state.json`` (global step, hyper-parameters, losses);
``--resume`` reloads both. Step ``t`` draws its batch and its dropout seeds from ``(seed, t)``
only, so 2 steps + resume 2 steps gives the same adapter as 4 steps in one go. Periodic and
interrupt checkpoints (same files, kept apart from the adapter) are :mod:`aqlm_lora.app.checkpoint`'s.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

# use_fused_base: the CLI and demo import it from here (it lives in fused_base now).
from ..lora.fused_base import use_fused_kernels as use_fused_base  # noqa: F401
from .text import IGNORE, random_starts, take_windows

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"

PathLike = Union[str, os.PathLike]


class UserError(Exception):
    """A mistake in what the user asked for; the CLI prints it as one line, without a traceback."""


def one_line(message: object, limit: int = 240) -> str:
    """``str(message)`` (e.g. an exception's, which libraries spread over lines) on one line, at most ``limit`` long."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip()) or type(message).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Directories


def check_input_dir(path: PathLike, what: str, must_contain: Optional[str] = None) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a directory")
    if must_contain and not (path / must_contain).is_file():
        raise UserError(f"{what} {path} has no {must_contain}")
    return path


def check_input_file(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a file")
    return path


def check_safetensors(path: PathLike) -> None:
    """Raise :class:`UserError` naming ``path`` unless it is a complete safetensors file.

    ``safe_open`` reads the header and checks that the tensors it lists cover the file exactly, so a
    truncated download or copy is caught here rather than deep inside a loader.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - whatever safetensors raises, the file is unusable
        raise UserError(f"{path} is not a complete safetensors file (truncated or corrupt?): {one_line(exc)}") from None


def _torch_load(path: Path, what: str):
    """``torch.load(path, weights_only=True)``; :class:`UserError` naming the file if that fails."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a file torch cannot read back is unusable, whatever the reason
        first = one_line(exc).split(". ")[0]  # torch's later sentences are advice about weights_only
        raise UserError(f"{path} is not a readable {what} (truncated or corrupt?): {first}") from None


def check_output_dir(path: PathLike, overwrite: bool, what: str = "output directory") -> Path:
    """Refuse an existing non-empty directory (or a file) unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{what} {path} exists and is not empty (pass --overwrite to replace it)")
    return path


@contextmanager
def staged_dir(path: PathLike) -> Iterator[Path]:
    """Write into a temporary sibling of ``path``; on success it replaces ``path`` in one rename.

    On failure ``path`` is untouched (an existing directory is never lost half-way).
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like a normal mkdir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Models


def quiet_transformers() -> None:
    """No info logs or loading/saving progress bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model_config(model_dir: PathLike):
    """The transformers config of a model directory; :class:`UserError` naming ``config.json`` if unusable."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - bad JSON, a wrong-typed field, an unknown model type...
        raise UserError(f"{path} is not a usable model config: {one_line(exc)}") from None


# ``--dtype`` choices of the CLI.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def config_dtype(config) -> Optional[torch.dtype]:
    """The floating dtype a model config records (``dtype`` / ``torch_dtype``), or None."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def check_seq(config, seq: int, model_dir: PathLike, flag: str = "--seq") -> None:
    """A window longer than the model's positions (``max_position_embeddings``) is refused."""
    limit = getattr(config, "max_position_embeddings", None)
    if _is_int(limit) and seq > limit:
        raise UserError(
            f"{flag} {seq} is longer than the {limit} positions of {model_dir} (max_position_embeddings in config.json)"
        )


def load_causal_lm(model_dir: PathLike, dtype: torch.dtype = torch.float32):
    """A causal LM (float32 unless ``dtype``) from a local Hugging Face directory (dense or AQLM).

    The config and every ``*.safetensors`` file are checked first, so a wrong-typed config field or
    a truncated weight file is reported (as :class:`UserError`) by name.
    """
    from transformers import AutoModelForCausalLM

    model_dir = check_input_dir(model_dir, "model directory", must_contain="config.json")
    load_model_config(model_dir)
    for weights in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, EOFError) as exc:
        raise UserError(f"cannot load a causal LM from {model_dir}: {one_line(exc)}") from None
    return model


def aqlm_layer_names(model: nn.Module) -> list[str]:
    from aqlm import QuantizedLinear

    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def lora_targets(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Leaf names (``q_proj``, ...) of the AQLM / linear layers to adapt (the output head excluded)."""
    from aqlm import QuantizedLinear

    names = set()
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, nn.Linear)) and name.rsplit(".", 1)[-1] not in skip:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise UserError(f"{type(model).__name__} has no linear or AQLM layers to put LoRA on")
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# Adapters


def _lora_config(r: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")


def new_adapter(model: nn.Module, r: int, alpha: float, dropout: float, *, ours: bool = True):
    """``get_peft_model`` with a fresh LoRA adapter on every linear/AQLM layer but the head.

    ``ours=False`` builds PEFT's stock layers (``peft.tuners.lora.aqlm.AqlmLoraLinear``) instead.
    """
    from peft import get_peft_model

    from ..lora.dispatch import register

    if r < 1:
        raise UserError(f"--r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {dropout}")
    config = _lora_config(r, alpha, dropout, lora_targets(model))
    return get_peft_model(model, register(config) if ours else config)


def _adapter_tensors(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        check_safetensors(weights)
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.is_file():
        tensors = _torch_load(legacy, "adapter")
        if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
            raise UserError(f"{legacy} does not hold a dict of tensors")
        return {k: tuple(v.shape) for k, v in tensors.items()}
    raise UserError(f"adapter directory {adapter_dir} has no adapter_model.safetensors")


def check_adapter_fits(model: nn.Module, adapter_dir: PathLike) -> None:
    """Raise :class:`UserError` unless every LoRA tensor of the adapter matches a layer of ``model``."""
    adapter_dir = check_input_dir(adapter_dir, "adapter directory", must_contain="adapter_config.json")
    modules = dict(model.named_modules())
    shapes = _adapter_tensors(adapter_dir)
    if not shapes:
        raise UserError(f"adapter {adapter_dir} holds no tensors")
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        for part in (".lora_A.", ".lora_B."):
            if part in name:
                module_name, kind = name.split(part)[0], part.strip(".")
                break
        else:
            continue  # other saved tensors (e.g. modules_to_save) are PEFT's business
        module = modules.get(module_name)
        if module is None or not hasattr(module, "in_features"):
            raise UserError(f"adapter {adapter_dir} does not fit this model: it has no layer {module_name}")
        expect = module.in_features if kind == "lora_A" else module.out_features
        got = shape[1] if kind == "lora_A" else shape[0]
        if len(shape) != 2 or got != expect:
            raise UserError(
                f"adapter {adapter_dir} does not fit this model: {key} has shape {list(shape)}, but layer "
                f"{module_name} has {module.in_features} inputs and {module.out_features} outputs"
            )


def load_adapter(model: nn.Module, adapter_dir: PathLike, *, trainable: bool = False):
    """``PeftModel.from_pretrained`` through :func:`aqlm_lora.register`, after checking the adapter fits."""
    from peft import LoraConfig, PeftModel

    from ..lora.dispatch import register

    check_adapter_fits(model, adapter_dir)
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path} is not a usable LoRA config: {one_line(exc)}") from None
    _check_lora_config(config, path)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=register(config), is_trainable=trainable)


def _check_lora_config(config, path: Path) -> None:
    """The fields we train and run with must have the right type and range (PEFT takes any JSON value)."""
    r, alpha, dropout = config.r, config.lora_alpha, config.lora_dropout
    if not _is_int(r) or r < 1:
        raise UserError(f"{path}: r must be an integer >= 1, got {r!r}")
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"{path}: lora_alpha must be a finite number > 0, got {alpha!r}")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise UserError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")


# ---------------------------------------------------------------------------------------------
# Training


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


# ``on_step(result)`` after every step; True stops training there (e.g. on Ctrl-C).
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
) -> TrainResult:
    """``settings.steps`` AdamW steps on random windows of ``tokens`` (fewer if ``on_step`` stops it).

    The loss is the next-token cross-entropy, or with a ``teacher`` the KL divergence from the
    teacher's next-token distribution to the model's (distillation, as in AQLM's own fine-tuning:
    the quantized model learns to behave like the dense one). With ``labels`` (same shape as
    ``tokens``) positions whose next token is labelled ``IGNORE`` (prompts) do not count in either.
    Step ``t`` (global, counted from ``start_step``) takes its batch from generator seed
    ``(seed, t)`` and seeds torch's default generator (dropout) the same way. The learning rate is
    ``lr_schedule(t)`` when given, else ``lr`` with a linear warm-up over ``settings.warmup`` steps.
    """
    from tqdm.auto import tqdm

    if tokens.numel() < settings.seq + 1:
        raise UserError(f"the training text has {tokens.numel()} tokens; --seq {settings.seq} needs more")
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    result = TrainResult(global_step=start_step)
    bar = tqdm(
        range(settings.steps), desc=desc, unit="step", disable=None if progress else True, dynamic_ncols=True
    )  # None: only on a terminal
    tokens_per_step = settings.batch * settings.seq
    for _ in bar:
        step = result.global_step
        lr = lr_schedule(step) if lr_schedule is not None else _warmup_lr(settings, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(_step_seed(settings.seed, step, 0))
        starts = random_starts(tokens.numel(), settings.batch, settings.seq, generator)
        batch = take_windows(tokens, starts, settings.seq)
        targets = take_windows(labels, starts, settings.seq) if labels is not None else None
        torch.manual_seed(_step_seed(settings.seed, step, 1))
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch).logits
        start = time.perf_counter()  # the step time counts the model's forward, backward and update only
        loss = _step_loss(model, batch, targets, teacher_logits)
        if not torch.isfinite(loss.detach()):  # the user's numbers (lr, alpha, weights, data), not a bug
            raise UserError(
                f"the loss is {float(loss.detach())} at step {step}: training diverged, or the model holds "
                "non-finite weights (try a lower --lr or --alpha)"
            )
        loss.backward()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        loss = float(loss.detach())
        result.losses.append(loss)
        result.step_seconds.append(seconds)
        result.global_step += 1
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}")
        if on_step is not None and on_step(result):
            break
    bar.close()
    return result


def _warmup_lr(settings: TrainSettings, step: int) -> float:
    return settings.lr * min(1.0, (step + 1) / settings.warmup) if settings.warmup else settings.lr


def _step_loss(model: nn.Module, batch: Tensor, targets: Optional[Tensor], teacher_logits: Optional[Tensor]) -> Tensor:
    """The training loss of one batch (see :func:`train_steps`)."""
    if targets is None and teacher_logits is None:
        return model(input_ids=batch, labels=batch).loss  # transformers' own loss, as before labels existed
    logits = model(input_ids=batch).logits
    if teacher_logits is not None:
        return distillation_loss(logits, teacher_logits, None if targets is None else targets[:, 1:] != IGNORE)
    return next_token_loss(logits, targets)


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the next token over the labels that are not ``IGNORE`` (0 if there are none).

    A batch of prompt tokens only then trains nothing, where transformers' mean would be 0/0 = NaN.
    """
    shifted = labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(shifted.numel(), -1), shifted, ignore_index=IGNORE, reduction="sum"
    )
    return total / max(1, int((shifted != IGNORE).sum()))


def distillation_loss(logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean over tokens of ``KL(teacher || model)`` of the next-token distributions.

    With ``mask`` (``[batch, seq - 1]``, True where the next token is trained) only those positions count.
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
    return (per_position * mask).sum() / max(1, int(mask.sum()))


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing on a transformers model, non-reentrant."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def save_training(peft_model, optimizer: torch.optim.Optimizer, state: dict, out_dir: PathLike) -> None:
    """PEFT adapter (``save_pretrained``) + ``optimizer.pt`` + ``trainer_state.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    torch.save(optimizer.state_dict(), out_dir / OPTIMIZER_FILE)
    (out_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def read_training_state(adapter_dir: PathLike) -> tuple[dict, dict]:
    """``(trainer_state, optimizer_state_dict)`` saved by :func:`save_training`."""
    adapter_dir = Path(adapter_dir)
    for name in (STATE_FILE, OPTIMIZER_FILE):
        if not (adapter_dir / name).is_file():
            raise UserError(
                f"cannot resume from {adapter_dir}: it has no {name} (was it saved by `aqlm-lora finetune`?)"
            )
    state = _read_trainer_state(adapter_dir / STATE_FILE)
    path = adapter_dir / OPTIMIZER_FILE
    optimizer_state = _torch_load(path, "optimizer state")
    if not isinstance(optimizer_state, dict) or not {"state", "param_groups"} <= optimizer_state.keys():
        raise UserError(f"{path} does not hold an optimizer state (a dict with 'state' and 'param_groups')")
    return state, optimizer_state


def _read_trainer_state(path: Path) -> dict:
    """``trainer_state.json``, its fields checked: ``global_step`` and ``target_step`` (the step the run
    that saved it was going to; optional) ints >= 0, ``losses`` a list of numbers."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON: {one_line(exc)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(state).__name__}")
    step = state.get("global_step")
    if not _is_int(step) or step < 0:
        raise UserError(f"{path}: global_step must be an integer >= 0, got {step!r}")
    target = state.get("target_step", step)
    if not _is_int(target) or target < 0:
        raise UserError(f"{path}: target_step must be an integer >= 0, got {target!r}")
    losses = state.get("losses", [])
    if not isinstance(losses, list) or not all(_is_number(x) for x in losses):
        raise UserError(f"{path}: losses must be a list of numbers, got {one_line(repr(losses), 60)}")
    return state


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
