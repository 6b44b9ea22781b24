"""Tokenizers and training/evaluation data of the CLI: plain text or JSONL, as one token stream.

A model's tokenizer is its own transformers tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
... read by ``transformers.AutoTokenizer``), or the byte tokenizer of :mod:`aqlm_lora.app.text` for the
demo's models, which carry ``aqlm_lora_tokenizer.json``.

Data files:

- plain text: the whole file is one document (read as bytes by the byte tokenizer, as UTF-8 text
  by a transformers tokenizer, with the specials it adds at the start of a text, e.g. BOS);
- JSONL (``.jsonl`` / ``.ndjson``, or ``--data-format jsonl``): one JSON object a line, either
  ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}``; blank lines are skipped. Each
  record becomes a document followed by the tokenizer's EOS; a prompt's tokens get the label
  :data:`aqlm_lora.app.text.IGNORE`, so the loss (and perplexity) covers the completion only.

Documents are concatenated into one stream, from which training draws random windows and
evaluation takes consecutive ones. JSONL is read with the ``datasets`` library when it is
installed and reads the file; otherwise, or when it fails, with plain Python, whose errors name
the file and line.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol, Union

import torch
from torch import Tensor

from .errors import UserError, one_line
from .files import PathLike
from .text import IGNORE, TOKENIZER_FILE, ByteTokenizer

# Files that mean "a transformers tokenizer lives here" (any one is enough for AutoTokenizer).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATA_FORMATS = ("auto", "text", "jsonl")


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: Optional[int]

    def encode(self, text: str, specials: bool = False) -> list[int]: ...


class HFTokenizer:
    """A transformers tokenizer behind the byte tokenizer's small interface."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)  # added tokens included, unlike tokenizer.vocab_size
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str, specials: bool = False) -> list[int]:
        """Token ids of ``text``; ``specials``: with what the tokenizer puts around a text (e.g. BOS)."""
        return list(self.tokenizer(text, add_special_tokens=specials)["input_ids"])


def has_tokenizer(model_dir: PathLike) -> bool:
    """Whether :func:`load_tokenizer` finds a tokenizer to load in ``model_dir``."""
    return any((Path(model_dir) / name).is_file() for name in (TOKENIZER_FILE, *HF_TOKENIZER_FILES))


def load_tokenizer(model_dir: PathLike) -> Tokenizer:
    """The byte tokenizer of a demo model, else the model's transformers tokenizer; :class:`UserError` if none."""
    model_dir = Path(model_dir)
    if (model_dir / TOKENIZER_FILE).is_file():
        try:
            return ByteTokenizer.load(model_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(str(exc)) from None
    if not any((model_dir / name).is_file() for name in HF_TOKENIZER_FILES):
        raise UserError(
            f"model directory {model_dir} has no tokenizer: expected a transformers tokenizer "
            f"({', '.join(HF_TOKENIZER_FILES[:2])}, ... as tokenizer.save_pretrained writes them) or "
            f"{TOKENIZER_FILE} (models of `aqlm-lora demo`); copy the tokenizer files of the model it came from"
        )
    return HFTokenizer(_auto_tokenizer(model_dir))


def _auto_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a broken or unsupported tokenizer, whatever transformers raises
        raise UserError(f"cannot load the tokenizer of {model_dir}: {one_line(exc)}") from None


def check_vocab(num_embeddings: int, tokenizer: Tokenizer, model_dir: PathLike) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    if num_embeddings < tokenizer.vocab_size:
        raise UserError(
            f"{model_dir} has {num_embeddings} token embeddings; its tokenizer has {tokenizer.vocab_size} tokens"
        )


# ---------------------------------------------------------------------------------------------
# Data files


@dataclass
class TokenData:
    """One token stream; ``labels`` is None when every token is trained and scored."""

    tokens: Tensor  # 1-D int64
    labels: Optional[Tensor] = None  # 1-D int64, IGNORE on prompt tokens
    documents: int = 1

    @property
    def targets(self) -> int:
        """How many tokens are trained/scored."""
        return self.tokens.numel() if self.labels is None else int((self.labels != IGNORE).sum())


@dataclass
class Example:
    """A JSONL record: a text, or a prompt (context only) and its completion (trained)."""

    text: str
    prompt: Optional[str] = None


def data_format(path: PathLike, fmt: str = "auto") -> str:
    """``text`` or ``jsonl``: as asked, or (``auto``) by the file's suffix."""
    if fmt != "auto":
        return fmt
    return "jsonl" if Path(path).suffix.lower() in JSONL_SUFFIXES else "text"


def read_data(path: PathLike, tokenizer: Tokenizer, fmt: str = "auto") -> TokenData:
    """Tokenize a data file (see the module docstring); :class:`UserError` naming the file if it is unusable."""
    path = Path(path)
    if data_format(path, fmt) == "jsonl":
        return tokenize_examples(read_jsonl(path), tokenizer)
    if isinstance(tokenizer, ByteTokenizer):  # bytes as they are: any file works
        return TokenData(torch.tensor(tokenizer.encode(_read_bytes(path)), dtype=torch.int64))
    return TokenData(torch.tensor(tokenizer.encode(_read_text(path), specials=True), dtype=torch.int64))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read data file {path}: {exc.strerror or one_line(exc)}") from None


def _read_text(path: Path) -> str:
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x})") from None


def tokenize_examples(examples: list[Example], tokenizer: Tokenizer) -> TokenData:
    """Documents one after the other, each ending with EOS; prompt tokens labelled IGNORE."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokens: list[int] = []
    labels: list[int] = []
    for example in examples:
        if example.prompt is None:
            ids = tokenizer.encode(example.text, specials=True) + eos
            tokens += ids
            labels += ids
        else:
            prompt = tokenizer.encode(example.prompt, specials=True)
            completion = tokenizer.encode(example.text) + eos
            tokens += prompt + completion
            labels += [IGNORE] * len(prompt) + completion
    masked = any(e.prompt is not None for e in examples)  # else labels == tokens: the plain loss
    label_tensor = torch.tensor(labels, dtype=torch.int64) if masked else None
    return TokenData(torch.tensor(tokens, dtype=torch.int64), label_tensor, documents=len(examples))


# ---------------------------------------------------------------------------------------------
# JSONL


def read_jsonl(path: PathLike) -> list[Example]:
    """The records of a JSONL file; :class:`UserError` naming the file and line of a bad one."""
    path = Path(path)
    records = _records_from_datasets(path)
    if records is not None:
        examples = [_example(record) for record in records]
        if all(isinstance(e, Example) for e in examples):
            return examples  # type: ignore[return-value]
    return _read_jsonl_plain(path)  # also the way to name the line of a bad record


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 JSONL file, blank lines skipped.

    Lines end at a line feed only (a carriage return before it dropped), as JSONL defines them:
    ``str.splitlines()`` also splits at U+2028, U+0085, ..., which ``json.dumps(ensure_ascii=False)``
    leaves raw inside strings.
    """
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def _read_jsonl_plain(path: Path) -> list[Example]:
    examples = []
    for number, line in jsonl_lines(path):
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{number}: not JSON ({one_line(exc, 120)})") from None
        example = _example(record)
        if not isinstance(example, Example):
            raise UserError(f"{path}:{number}: {example}")
        examples.append(example)
    if not examples:
        raise UserError(f"{path} holds no JSONL records")
    return examples


def _example(record: object) -> Union[Example, str]:
    """The record as an :class:`Example`, or what is wrong with it."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    fields = {k: v for k, v in record.items() if v is not None}  # datasets fills absent columns with None
    if "prompt" in fields or "completion" in fields:
        prompt, completion = fields.get("prompt"), fields.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return f'"prompt" and "completion" must both be strings, got {_kinds(prompt, completion)}'
        return Example(completion, prompt)
    text = fields.get("text")
    if not isinstance(text, str):
        found = ", ".join(sorted(map(str, fields))) or "none"
        what = "no such field" if text is None else f'a {type(text).__name__} "text"'
        return f'needs a string "text", or "prompt" and "completion" (fields: {found}; {what})'
    return Example(text)


def _kinds(*values: object) -> str:
    return " and ".join("nothing" if v is None else type(v).__name__ for v in values)


def _records_from_datasets(path: Path) -> Optional[list]:
    """The records as the ``datasets`` library reads them; None if it is not installed or fails."""
    try:
        import datasets
    except ImportError:
        return None
    try:
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        with tempfile.TemporaryDirectory(prefix="aqlm_lora_datasets_") as cache:
            loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache)
            return loaded.to_list()
    except Exception:  # noqa: BLE001 - whatever it cannot read, plain Python reads or explains by line
        return None
