"""Shared pieces of the CLI tests: tiny models with a byte or a real BPE tokenizer, running the CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from aqlm_lora.app import cli
from aqlm_lora.app.demo import DemoConfig, build_model
from aqlm_lora.app.text import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = DemoConfig(hidden=32, intermediate=64, layers=2, heads=2, seq=32)
WORDS = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "(", ")", ":", "\n"]


def words_text(n: int = 3000, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=gen).tolist())


def byte_model_dir(path: Path, cfg: DemoConfig = TINY) -> Path:
    """A tiny dense Llama with the byte tokenizer (as the demo makes them)."""
    build_model(cfg, ByteTokenizer(), seed=0).save_pretrained(path)
    ByteTokenizer().save(path)
    return path


def bpe_tokenizer(text: str, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained here on ``text`` (no download), as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def bpe_model_dir(path: Path, text: str, cfg: DemoConfig = TINY, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny dense Llama sized to a BPE tokenizer saved beside it (tokenizer.json, tokenizer_config.json)."""
    tokenizer = bpe_tokenizer(text)
    ids = SimpleNamespace(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = build_model(cfg, ids, seed=0).to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aqlm-lora: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "aqlm_lora", *map(str, args)]


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
