"""Byte-level tokenizer, token windows and perplexity (no download: every byte is a token).

The byte tokenizer is saved next to a model as ``aqlm_lora_tokenizer.json``; models made by
``aqlm-lora demo`` carry it, and ``quantize`` copies it. Other models use their own transformers
tokenizer (see :mod:`aqlm_lora.app.data`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

TOKENIZER_FILE = "aqlm_lora_tokenizer.json"


class ByteTokenizer:
    """Token ``b`` (0..255) is byte ``b``; then ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258."""

    kind = "aqlm_lora.byte"
    specials = ("<pad>", "<bos>", "<eos>")

    def __init__(self) -> None:
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 256, 257, 258
        self.vocab_size = 256 + len(self.specials)

    def encode(self, text: Union[str, bytes], specials: bool = False) -> list[int]:
        """The bytes of ``text`` (UTF-8); ``specials`` is accepted for a common interface: no BOS is added."""
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        spec = {"type": self.kind, "vocab_size": self.vocab_size, "specials": dict(zip(self.specials, (256, 257, 258)))}
        path.write_text(json.dumps(spec, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> ByteTokenizer:
        """The tokenizer saved in ``directory``; ``FileNotFoundError`` / ``ValueError`` explain what is wrong."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} has no {TOKENIZER_FILE} (the aqlm_lora byte tokenizer); models made by "
                "`aqlm-lora demo` have one, and `aqlm-lora quantize` copies it"
            )
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
            raise ValueError(f"{path} is not readable JSON: {exc}") from None
        tok = cls()
        if not isinstance(spec, dict) or spec.get("type") != cls.kind or spec.get("vocab_size") != tok.vocab_size:
            raise ValueError(f"{path} describes an unsupported tokenizer: {str(spec)[:200]}")
        return tok


def encode_file(path: Union[str, os.PathLike], tokenizer: ByteTokenizer) -> Tensor:
    """All bytes of a file as a 1-D int64 tensor of token ids."""
    return torch.tensor(tokenizer.encode(Path(path).read_bytes()), dtype=torch.int64)


def stdlib_corpus(max_train_bytes: int = 1 << 20, max_valid_bytes: int = 1 << 16) -> tuple[str, str, list[str]]:
    """A text corpus read at run time from this Python's standard library sources (no download).

    The ``.py`` files directly under the stdlib directory, sorted by name; every 8th file (the 4th,
    12th, ...) goes to validation, the others to training, each side capped at its budget
    (counted in characters, which are bytes for these ASCII-only sources).
    Returns ``(train_text, valid_text, file names used)``.
    """
    root = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    train, valid, used = [], [], []
    sizes = [0, 0]
    for i, path in enumerate(files):
        side = 1 if i % 8 == 3 else 0
        budget = max_valid_bytes if side else max_train_bytes
        if sizes[side] >= budget:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[: budget - sizes[side]]
        (valid if side else train).append(text)
        sizes[side] += len(text)
        used.append(path.name)
    if not train or not valid:
        raise RuntimeError(f"found too few Python sources under {root} to build the demo corpus")
    return "".join(train), "".join(valid), used


def random_starts(length: int, batch: int, seq: int, generator: torch.Generator) -> list[int]:
    """``batch`` random offsets of ``seq``-long windows in a sequence of ``length`` tokens."""
    return torch.randint(0, length - seq + 1, (batch,), generator=generator).tolist()


def random_batch(tokens: Tensor, batch: int, seq: int, generator: torch.Generator) -> Tensor:
    """``[batch, seq]`` windows at random offsets of a 1-D token tensor."""
    return take_windows(tokens, random_starts(tokens.numel(), batch, seq, generator), seq)


def take_windows(tokens: Tensor, starts: list[int], seq: int) -> Tensor:
    """``[len(starts), seq]``: the windows of a 1-D tensor at these offsets."""
    return torch.stack([tokens[s : s + seq] for s in starts])


def windows(tokens: Tensor, seq: int) -> Tensor:
    """Consecutive non-overlapping ``[n, seq]`` windows (the tail shorter than ``seq`` is dropped)."""
    n = tokens.numel() // seq
    return tokens[: n * seq].reshape(n, seq)


def sample_windows(tokens: Tensor, seq: int, count: int, seed: int = 0) -> Tensor:
    """Up to ``count`` of the consecutive :func:`windows`, drawn without replacement with ``seed``."""
    all_windows = windows(tokens, seq)
    pick = torch.randperm(all_windows.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return all_windows[pick]


# Label of a token that is not trained or scored (a prompt token), as transformers uses it.
IGNORE = -100

# ``progress(windows_done, windows_total, perplexity_so_far)``, called after each batch.
Progress = Callable[[int, int, float], None]


@torch.no_grad()
def perplexity(
    model,
    tokens: Tensor,
    seq: int,
    batch: int = 16,
    max_windows: int = 0,
    *,
    labels: Optional[Tensor] = None,
    progress: Optional[Progress] = None,
    on_logits: Optional[Callable[[Tensor, Tensor], None]] = None,
) -> float:
    """Per-token perplexity of a causal LM on consecutive windows of ``seq`` tokens.

    With ``labels`` (same shape as ``tokens``), only the tokens whose label is not
    :data:`IGNORE` are scored (e.g. completions, not their prompts). ``on_logits(ids, logits)``
    sees each batch of windows and the model's logits for them (to measure more in the same pass).
    """
    data = windows(tokens, seq)
    targets = windows(labels, seq) if labels is not None else data
    if max_windows:
        data, targets = data[:max_windows], targets[:max_windows]
    if data.shape[0] == 0:
        raise ValueError(f"need at least {seq} tokens to measure perplexity, got {tokens.numel()}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, data.shape[0], batch):
            ids, target = data[start : start + batch], targets[start : start + batch, 1:]
            logits = model(input_ids=ids).logits
            if on_logits is not None:
                on_logits(ids, logits)
            logits = logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum", ignore_index=IGNORE
            )
            total += float(nll)
            count += int((target != IGNORE).sum())
            if progress is not None:
                progress(start + ids.shape[0], data.shape[0], math.exp(total / count) if count else math.nan)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no token to score: every target token of the evaluated windows is a prompt token")
    return math.exp(total / count)
