"""What a fine-tuning run saves beside its adapter, and reads back to resume.

``save_pretrained``'s adapter files, ``optimizer.pt`` (AdamW state) and ``trainer_state.json``
(global step, the step the run was going to, hyper-parameters, losses). ``finetune`` writes them
at the end, :mod:`aqlm_lora.app.checkpoint` on the way; ``--resume`` reads them back, every field
checked so a hand-edited or truncated file is one line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError, is_int, is_number, one_line
from .files import PathLike, torch_load

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


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
    optimizer_state = torch_load(path, "optimizer state")
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
    if not is_int(step) or step < 0:
        raise UserError(f"{path}: global_step must be an integer >= 0, got {step!r}")
    target = state.get("target_step", step)
    if not is_int(target) or target < 0:
        raise UserError(f"{path}: target_step must be an integer >= 0, got {target!r}")
    losses = state.get("losses", [])
    if not isinstance(losses, list) or not all(is_number(x) for x in losses):
        raise UserError(f"{path}: losses must be a list of numbers, got {one_line(repr(losses), 60)}")
    return state
