"""Input and output paths of the commands: checked up front, written atomically, read safely.

Every check raises :class:`~aqlm_lora.app.errors.UserError` naming the path, so a missing folder or
a truncated file is one line on stderr rather than a traceback from deep inside a loader.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import UserError, one_line

PathLike = Union[str, os.PathLike]


def check_input_dir(path: PathLike, what: str, must_contain: Optional[str] = None) -> Path:
    """``path`` as a :class:`Path` if it is a directory (holding the file ``must_contain``)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{what} {path} is not a directory")
    if must_contain and not (path / must_contain).is_file():
        raise UserError(f"{what} {path} has no {must_contain}")
    return path


def check_input_file(path: PathLike, what: str) -> Path:
    """``path`` as a :class:`Path` if it is a file."""
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


def torch_load(path: Path, what: str):
    """``torch.load(path, weights_only=True)``; :class:`UserError` naming the file if that fails."""
    import torch

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


def check_output_file(path: PathLike, overwrite: bool, what: str = "output file") -> Path:
    """Refuse a directory, a path in a missing folder, or an existing file unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory")
    if not path.parent.is_dir():
        problem = "is not a directory" if path.parent.exists() else "does not exist"
        raise UserError(f"{what} {path}: its folder {path.parent} {problem}")
    if path.exists() and not overwrite:
        raise UserError(f"{what} {path} exists (pass --overwrite to replace it)")
    return path


def check_output_apart(out_dir: PathLike, flag: str, inputs: dict[str, Optional[PathLike]]) -> None:
    """Refuse an output folder that is one of the input folders ``{what: path}`` (None: not given):
    writing it (with ``--overwrite``) would destroy that input."""
    out = Path(out_dir).resolve()
    for what, path in inputs.items():
        if path is not None and Path(path).resolve() == out:
            raise UserError(f"{flag} must differ from {what}")


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
