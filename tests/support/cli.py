"""Shared pieces of the CLI tests: tiny models with a byte or a real BPE tokenizer, a workspace
(dense model, data, its AQLM quantization), running the CLI and checking its one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from aqlm_lora.app import cli
from aqlm_lora.app.demo import DemoConfig, build_model
from aqlm_lora.app.text import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = DemoConfig(hidden=32, intermediate=64, layers=2, heads=2, seq=32)
# Both demos' phases shrunk to seconds (fields of DemoConfig and MediumConfig alike): one layer,
# 32-token windows, a few steps on 20 kB of text.
TINY_RUN = dict(layers=1, heads=2, seq=32, batch=4, dense_steps=4, lora_steps=3, train_bytes=20000, valid_bytes=4000)
# The small demo so shrunk, without timing PEFT's stock layer; 128 output rows (intermediate): more
# than one row block in the CPU kernels.
TINY_DEMO = DemoConfig(hidden=64, intermediate=128, stock_steps=0, **TINY_RUN)
WORDS = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "(", ")", ":", "\n"]
# The smallest finetune run: 2 steps of 2 windows of 16 tokens.
TRAIN = ["--steps", "2", "--batch", "2", "--seq", "16", "--no-progress"]


def words_text(n: int = 3000, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=gen).tolist())


def byte_model(cfg: DemoConfig = TINY):
    """A tiny dense Llama for the byte tokenizer, built as the demo builds it (seed 0)."""
    return build_model(cfg, ByteTokenizer(), seed=0)


def byte_model_dir(path: Path, cfg: DemoConfig = TINY, tokenizer: bool = True) -> Path:
    """:func:`byte_model` saved with the byte tokenizer (as the demo saves them); ``tokenizer=False``: without it."""
    byte_model(cfg).save_pretrained(path)
    if tokenizer:
        ByteTokenizer().save(path)
    return path


def make_workspace(root: Path, *quantize_args: str) -> dict[str, Path]:
    """``root`` with a tiny dense byte-tokenizer model, a data file of words, and the model quantized to
    AQLM 2x8 by the CLI (``quantize_args``: more flags for it). Keys: root, dense, data, aqlm."""
    dense = byte_model_dir(root / "dense")
    data = root / "data.txt"
    data.write_text(words_text())
    quantized = root / "aqlm"
    argv = ["quantize", str(dense), str(quantized), "--scheme", "2x8", "--no-progress", *quantize_args]
    assert cli.main(argv) == 0
    return {"root": root, "dense": dense, "data": data, "aqlm": quantized}


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
    """``aqlm-lora ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """A failure reported as one ``aqlm-lora: error: ...`` line holding every needle, no traceback."""
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aqlm-lora: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` and its bytes: equal before and after means nothing was touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its size, as an interrupted download or copy leaves it."""
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "aqlm_lora", *map(str, args)]


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
