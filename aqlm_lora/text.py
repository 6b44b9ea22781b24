"""Byte-level tokenizer and text data for the CLI (no download: every byte is a token).

The tokenizer is saved next to a model as ``aqlm_lora_tokenizer.json``; models made by
``aqlm-lora demo`` carry it, and ``quantize`` copies it, so ``finetune`` and ``eval`` read any of them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Union

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

    def encode(self, text: Union[str, bytes]) -> list[int]:
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


def random_batch(tokens: Tensor, batch: int, seq: int, generator: torch.Generator) -> Tensor:
    """``[batch, seq]`` windows at random offsets of a 1-D token tensor."""
    starts = torch.randint(0, tokens.numel() - seq + 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + seq] for s in starts.tolist()])


def windows(tokens: Tensor, seq: int) -> Tensor:
    """Consecutive non-overlapping ``[n, seq]`` windows (the tail shorter than ``seq`` is dropped)."""
    n = tokens.numel() // seq
    return tokens[: n * seq].reshape(n, seq)


@torch.no_grad()
def perplexity(model, tokens: Tensor, seq: int, batch: int = 16, max_windows: int = 0) -> float:
    """Per-token perplexity of a causal LM on consecutive windows of ``seq`` tokens."""
    data = windows(tokens, seq)
    if max_windows:
        data = data[:max_windows]
    if data.shape[0] == 0:
        raise ValueError(f"need at least {seq} tokens to measure perplexity, got {tokens.numel()}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, data.shape[0], batch):
            ids = data[start : start + batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)
