"""Data files and tokenizers of the CLI (aqlm_lora.app.data): JSONL records, labels, errors by line."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from aqlm_lora.app import data
from aqlm_lora.app.errors import UserError
from aqlm_lora.app.text import IGNORE, ByteTokenizer
from aqlm_lora.app.train import next_token_loss
from tests.support.cli import bpe_model_dir, words_text


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    return bpe_model_dir(tmp_path_factory.mktemp("bpe") / "model", words_text())


@pytest.fixture(autouse=True)
def no_datasets(monkeypatch):
    """Plain Python unless a test installs a (fake) datasets module."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def _jsonl(path: Path, *lines) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_tokenizer_choice(bpe_dir, tmp_path):
    tok = data.load_tokenizer(bpe_dir)
    assert isinstance(tok, data.HFTokenizer) and tok.eos_token_id is not None
    assert tok.encode("def return") == tok.tokenizer("def return", add_special_tokens=False)["input_ids"]
    ByteTokenizer().save(tmp_path)
    assert isinstance(data.load_tokenizer(tmp_path), ByteTokenizer)


def test_no_tokenizer_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no tokenizer.*tokenizer.json.*aqlm_lora_tokenizer.json"):
        data.load_tokenizer(tmp_path)


def test_broken_tokenizer_names_the_model(bpe_dir, tmp_path):
    broken = tmp_path / "m"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": ')
    (broken / "tokenizer_config.json").write_text((bpe_dir / "tokenizer_config.json").read_text())
    with pytest.raises(UserError, match=f"cannot load the tokenizer of {broken}") as info:
        data.load_tokenizer(broken)
    assert "\n" not in str(info.value)


def test_check_vocab():
    data.check_vocab(259, ByteTokenizer(), "m")
    with pytest.raises(UserError, match="258 token embeddings; its tokenizer has 259"):
        data.check_vocab(258, ByteTokenizer(), "m")


@pytest.mark.parametrize("name, fmt, expect", [("a.jsonl", "auto", "jsonl"), ("a.NDJSON", "auto", "jsonl"),
                                               ("a.txt", "auto", "text"), ("a.txt", "jsonl", "jsonl"),
                                               ("a.jsonl", "text", "text")])  # fmt: skip
def test_data_format(name, fmt, expect):
    assert data.data_format(name, fmt) == expect


def test_text_file_byte_and_bpe(bpe_dir, tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"abc\xff")  # the byte tokenizer takes any bytes
    assert data.read_data(path, ByteTokenizer()).tokens.tolist() == [97, 98, 99, 255]
    tok = data.load_tokenizer(bpe_dir)
    with pytest.raises(UserError, match=r"a.txt:1: not UTF-8 text \(byte 3: 0xff\)"):
        data.read_data(path, tok)
    path.write_text("def return self\n")
    loaded = data.read_data(path, tok)
    assert loaded.tokens.tolist() == tok.encode("def return self\n", specials=True) and loaded.labels is None


def test_prompt_completion_labels(bpe_dir, tmp_path):
    tok = data.load_tokenizer(bpe_dir)
    path = _jsonl(tmp_path / "d.jsonl", {"prompt": "def value", "completion": " return self"}, "", {"text": "for in"})
    loaded = data.read_data(path, tok)
    prompt, completion, text = tok.encode("def value", True), tok.encode(" return self"), tok.encode("for in", True)
    eos = tok.eos_token_id
    assert loaded.tokens.tolist() == prompt + completion + [eos] + text + [eos]
    assert loaded.labels.tolist() == [IGNORE] * len(prompt) + completion + [eos] + text + [eos]
    assert loaded.documents == 2 and loaded.targets == len(completion) + len(text) + 2


def test_text_records_need_no_labels(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", {"text": "ab"}, {"text": "c", "id": 3})
    loaded = data.read_data(path, ByteTokenizer())
    assert loaded.tokens.tolist() == [97, 98, 258, 99, 258] and loaded.labels is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"d.jsonl:3: not JSON \("),
        ('{"txt": "a"}', r'd.jsonl:3: needs a string "text", or "prompt" and "completion" \(fields: txt'),
        ('{"text": 5}', r'd.jsonl:3: needs a string "text".*a int "text"'),
        ('{"prompt": "a"}', r'd.jsonl:3: "prompt" and "completion" must both be strings, got str and nothing'),
        ('{"prompt": "a", "completion": ["b"]}', r"got str and list"),
        ("[1, 2]", r"d.jsonl:3: expected a JSON object, got list"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path, line, message):
    path = _jsonl(tmp_path / "d.jsonl", {"text": "a"}, "   ", line, {"text": "b"})
    with pytest.raises(UserError, match=message) as info:
        data.read_data(path, ByteTokenizer())
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_jsonl_lines_end_at_line_feeds_only(tmp_path):
    """Raw U+2028/U+2029/U+0085 in a string (json.dumps(ensure_ascii=False)) are not line ends; CRLF is one."""
    texts = ["a\u2028b", "c\u2029d", "e\u0085f", "g\x1ch\x0bi\x0cj"]
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    assert [e.text for e in data.read_jsonl(path)] == texts
    # Line numbers in errors still count line feeds only.
    path.write_text(lines[0] + "\n\n" + "{bad" + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d.jsonl:3: not JSON"):
        data.read_jsonl(path)


def test_empty_jsonl(tmp_path):
    with pytest.raises(UserError, match="holds no JSONL records"):
        data.read_jsonl(_jsonl(tmp_path / "d.jsonl", "", "  "))


def _fake_datasets(monkeypatch, load_dataset) -> list:
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    module = types.SimpleNamespace(
        load_dataset=record,
        disable_progress_bars=lambda: None,
        logging=types.SimpleNamespace(set_verbosity_error=lambda: None),
    )
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_jsonl_through_datasets_when_it_serves(monkeypatch, tmp_path):
    rows = [{"text": "from datasets", "prompt": None, "completion": None}]  # absent columns come as None
    calls = _fake_datasets(monkeypatch, lambda *a, **k: types.SimpleNamespace(to_list=lambda: rows))
    path = _jsonl(tmp_path / "d.jsonl", {"text": "from the file"})
    assert [e.text for e in data.read_jsonl(path)] == ["from datasets"]
    ((args, kwargs),) = calls
    assert args == ("json",) and kwargs["data_files"] == str(path) and kwargs["split"] == "train"


def test_jsonl_falls_back_to_python(monkeypatch, tmp_path):
    def fails(*args, **kwargs):
        raise ValueError("arrow could not parse")

    _fake_datasets(monkeypatch, fails)
    path = _jsonl(tmp_path / "d.jsonl", {"text": "from the file"})
    assert [e.text for e in data.read_jsonl(path)] == ["from the file"]
    # Records that datasets reads but that lack the fields: the plain reader names the line.
    bad = [{"text": "ok"}, {"txt": "x"}]
    _fake_datasets(monkeypatch, lambda *a, **k: types.SimpleNamespace(to_list=lambda: bad))
    path = _jsonl(tmp_path / "e.jsonl", {"text": "ok"}, {"txt": "x"})
    with pytest.raises(UserError, match="e.jsonl:2: needs"):
        data.read_jsonl(path)


def test_loss_ignores_prompt_positions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.randint(11, (2, 6), generator=gen)
    labels[0, :3] = IGNORE
    labels[1, :] = IGNORE
    labels[1, 5] = 4
    keep = labels[:, 1:] != IGNORE
    expect = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(next_token_loss(logits, labels), expect)
    all_prompt = torch.full((1, 6), IGNORE)
    assert float(next_token_loss(logits[:1], all_prompt)) == 0.0  # nothing to learn: 0, not NaN


def test_distillation_ignores_prompt_positions():
    from aqlm_lora.app.train import distillation_loss

    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    mask = torch.tensor([[False, True, True, False], [False, False, False, True]])
    log_p, log_q = student.log_softmax(-1), teacher.log_softmax(-1)
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)[:, :-1]
    torch.testing.assert_close(distillation_loss(student, teacher, mask), per_position[mask].mean())
    assert float(distillation_loss(student, teacher, torch.zeros_like(mask))) == 0.0
