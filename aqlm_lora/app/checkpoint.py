"""Checkpoints of long ``finetune`` runs, and Ctrl-C that stops a run after saving one.

A checkpoint is what ``finetune`` saves at the end (PEFT adapter, ``optimizer.pt``,
``trainer_state.json``), written under a checkpoint folder that is kept apart from the adapter
folder, so a published adapter never carries it (default ``<ADAPTER_DIR>.checkpoint``)::

    <out>.checkpoint/
        latest              the name of the newest complete step folder, one line
        step-00000040/      adapter_config.json, adapter_model.safetensors, optimizer.pt, trainer_state.json

A step folder is written under a temporary name and renamed once complete; ``latest`` is then
replaced in one ``os.replace``, and only after that are older step folders removed. Killed at
any moment, the folder still names a complete checkpoint. A run that finishes removes it (its
adapter folder holds the same state).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from .errors import UserError
from .files import PathLike
from .train_state import save_training

LATEST = "latest"
STEP_PREFIX = "step-"
_TMP_PREFIX = ".step-tmp-"
SUFFIX = ".checkpoint"


def default_checkpoint_dir(out_dir: PathLike) -> Path:
    """``<out_dir>.checkpoint``, beside the adapter folder."""
    out = Path(out_dir).absolute()
    return out.with_name(out.name + SUFFIX)


def is_checkpoint_dir(path: PathLike) -> bool:
    return (Path(path) / LATEST).is_file()


def _ours(path: Path) -> bool:
    """Everything in ``path`` is a checkpoint's (or the folder is empty)."""
    return all(p.name == LATEST or p.name.startswith((STEP_PREFIX, _TMP_PREFIX)) for p in path.iterdir())


def latest_step_dir(root: PathLike) -> Path:
    """The step folder ``latest`` names; :class:`UserError` if it is missing or broken."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {root / LATEST}: {exc}") from None
    step_dir = root / name
    if not name.startswith(STEP_PREFIX) or "/" in name or not step_dir.is_dir():
        raise UserError(f"{root / LATEST} names {name!r}, which is not a step folder of {root}")
    return step_dir


def check_checkpoint_dir(root: PathLike, *, overwrite: bool, resuming_from_it: bool) -> Path:
    """The checkpoint folder must be absent, empty, or a checkpoint; a checkpoint of an unfinished
    run is only replaced when resuming from it or with ``overwrite``."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"checkpoint directory {root} exists and is not a directory")
    if not root.is_dir() or not any(root.iterdir()):
        return root
    if not _ours(root):
        raise UserError(f"checkpoint directory {root} holds other files; choose another --checkpoint-dir")
    if is_checkpoint_dir(root) and not (resuming_from_it or overwrite):
        raise UserError(
            f"{root} holds a checkpoint of an unfinished run ({latest_step_dir(root).name}): pass --resume "
            f"(or --resume {root}) to continue it, or --overwrite to start over"
        )
    return root


def save_checkpoint(root: PathLike, peft_model, optimizer, state: dict) -> Path:
    """Write a checkpoint of step ``state["global_step"]`` under ``root``; returns its step folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"{STEP_PREFIX}{state['global_step']:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        save_training(peft_model, optimizer, state, tmp)
        _fsync_dir_files(tmp)
        final = root / name
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_text(root / LATEST, name + "\n")
    for old in root.iterdir():
        if old.name != name and old.name.startswith((STEP_PREFIX, _TMP_PREFIX)):
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_checkpoint_dir(root: PathLike) -> None:
    """Remove a checkpoint folder (only if all it holds is a checkpoint's)."""
    root = Path(root)
    if root.is_dir() and _ours(root):
        shutil.rmtree(root, ignore_errors=True)


def _fsync_dir_files(directory: Path) -> None:
    """Flush the files to disk before ``latest`` may name them (a power cut then loses no checkpoint)."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets :attr:`requested`, so training can stop at
    the end of the current step and save a checkpoint; a second one interrupts at once.

    ``same_within`` seconds: a second SIGINT that soon after the first counts as the same Ctrl-C.
    Under torchrun a worker gets Ctrl-C twice, from the terminal and forwarded by the launcher.
    ``quiet``: no message (ranks other than 0). Outside the main thread (where Python cannot
    install a handler) it does nothing.
    """

    def __init__(self, message: str, *, same_within: float = 0.0, quiet: bool = False) -> None:
        self.message = message
        self.requested = False
        self.same_within, self.quiet = same_within, quiet
        self._first = 0.0
        self._previous = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Optional[object]) -> None:
        if self.requested:
            if time.monotonic() - self._first < self.same_within:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._first = time.monotonic()
        if self.quiet:
            return
        try:  # the raw descriptor: a handler may run in the middle of another write to sys.stderr
            os.write(2, (self.message + "\n").encode())
        except OSError:
            pass
