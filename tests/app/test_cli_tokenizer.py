"""The CLI on a model with its own (BPE) tokenizer: quantize keeps the tokenizer, finetune/eval use it,
JSONL data with prompt/completion records, and the errors of data and tokenizers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from aqlm_lora.app.data import load_tokenizer
from aqlm_lora.app.tokenizer_files import TOKENIZER_FILES
from tests.support.cli import assert_user_error, bpe_model_dir, run, words_text

TRAIN = ["--steps", "2", "--batch", "2", "--seq", "16", "--no-progress"]
EXTRA_FILES = {
    "chat_template.jinja": "{{ messages[0]['content'] }}",
    "special_tokens_map.json": '{"bos_token": "<s>"}\n',
    "additional_chat_templates/tool.jinja": "{{ tools }}",
}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    text = words_text()
    dense = bpe_model_dir(root / "dense", text)
    for name, content in EXTRA_FILES.items():
        (dense / name).parent.mkdir(exist_ok=True)
        (dense / name).write_text(content)
    gen = json.loads((dense / "generation_config.json").read_text())
    (dense / "generation_config.json").write_text(json.dumps({**gen, "temperature": 0.7, "do_sample": True}))
    (root / "data.txt").write_text(text)
    records = [{"prompt": "def value(", "completion": " return self )\n"}, {"text": "import class for in if"}] * 150
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from aqlm_lora.app import cli

    assert cli.main(["quantize", str(dense), str(root / "aqlm"), "--no-progress", "--rounds", "1"]) == 0
    return {"root": root, "dense": dense, "aqlm": root / "aqlm", "text": text}


def test_quantize_copies_tokenizer_and_generation_files(bpe):
    dense, quantized = bpe["dense"], bpe["aqlm"]
    expected = [n for n in TOKENIZER_FILES if (dense / n).is_file()] + ["additional_chat_templates/tool.jinja"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"} <= set(expected)
    for name in expected:
        assert (quantized / name).read_bytes() == (dense / name).read_bytes(), name
    assert json.loads((quantized / "generation_config.json").read_text())["temperature"] == 0.7


def test_quantize_without_tokenizer_says_so(capsys, tmp_path, bpe):
    bare = tmp_path / "bare"
    shutil.copytree(bpe["dense"], bare)
    for name in TOKENIZER_FILES:
        (bare / name).unlink(missing_ok=True)
    code, out, err = run(["quantize", bare, tmp_path / "out", "--no-progress", "--rounds", "0"], capsys)
    assert code == 0, err
    assert "note:" in err and "no tokenizer files" in err


def test_finetune_and_eval_use_the_models_tokenizer(bpe, capsys, tmp_path):
    tok = load_tokenizer(bpe["aqlm"])
    data = bpe["root"] / "data.txt"
    n_tokens = len(tok.encode(bpe["text"], specials=True))
    assert n_tokens < len(bpe["text"]) // 2  # BPE merged the words: not one token a byte
    code, out, err = run(["finetune", bpe["aqlm"], "--data", data, "--out", tmp_path / "a", *TRAIN], capsys)
    assert code == 0, err
    code, out, err = run(["eval", bpe["aqlm"], "--adapter", tmp_path / "a", "--data", data, "--seq", "16"], capsys)
    assert code == 0, err
    assert f"({n_tokens // 16} windows of 16 tokens)" in out
    assert 1.0 < float(out.split()[1]) < 2 * tok.vocab_size


def test_prompt_completion_jsonl(bpe, capsys, tmp_path):
    data = bpe["root"] / "data.jsonl"
    code, out, err = run(["finetune", bpe["aqlm"], "--data", data, "--out", tmp_path / "a", *TRAIN], capsys)
    assert code == 0, err
    code, out, err = run(["eval", bpe["aqlm"], "--adapter", tmp_path / "a", "--data", data, "--seq", "16"], capsys)
    assert code == 0, err
    assert "completion tokens only" in out
    ppl_completions = float(out.split()[1])
    # The same records as plain text documents score every token, so another number.
    text = tmp_path / "all.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    text.write_text("".join(json.dumps({"text": r.get("prompt", "") + r.get("completion", r.get("text", ""))}) + "\n"
                            for r in rows))  # fmt: skip
    code, out, err = run(["eval", bpe["aqlm"], "--data", text, "--seq", "16"], capsys)
    assert code == 0, err
    assert "completion tokens only" not in out and float(out.split()[1]) != ppl_completions


def test_eval_of_prompts_only_is_refused(bpe, capsys, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "def value " * 20, "completion": ""}) + "\n")
    # The one scored token, the EOS after the empty completion, falls in the tail no window covers.
    code, _, err = run(["eval", bpe["aqlm"], "--data", data, "--seq", "16"], capsys)
    assert_user_error(code, err, f"cannot evaluate {data}", "prompt token")


@pytest.mark.parametrize("command", ["finetune", "eval"])
def test_bad_jsonl_line_is_one_line(bpe, capsys, tmp_path, command):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "def return"}\n\n{"prompt": "x", "answer": "y"}\n')
    argv = ["finetune", bpe["aqlm"], "--data", data, "--out", tmp_path / "a", *TRAIN]
    if command == "eval":
        argv = ["eval", bpe["aqlm"], "--data", data, "--seq", "16"]
    code, _, err = run(argv, capsys)
    assert_user_error(code, err, f"{data}:3:", '"prompt" and "completion"')
    assert not (tmp_path / "a").exists()


def test_data_format_flag_reads_jsonl_of_any_name(bpe, capsys, tmp_path):
    data = tmp_path / "records.txt"
    data.write_text('{"text": "def return self"}\nnot json\n')
    code, _, err = run(["eval", bpe["aqlm"], "--data", data, "--seq", "2", "--data-format", "jsonl"], capsys)
    assert_user_error(code, err, f"{data}:2: not JSON")


def test_model_without_tokenizer_is_refused(bpe, capsys, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(bpe["aqlm"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    code, _, err = run(["eval", bare, "--data", bpe["root"] / "data.txt", "--seq", "16"], capsys)
    assert_user_error(code, err, f"{bare} has no tokenizer", "tokenizer.json")


def test_broken_tokenizer_is_one_line(bpe, capsys, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bpe["aqlm"], broken)
    (broken / "tokenizer.json").write_text("{")
    code, _, err = run(["eval", broken, "--data", bpe["root"] / "data.txt", "--seq", "16"], capsys)
    assert_user_error(code, err, f"cannot load the tokenizer of {broken}")


def test_tokenizer_larger_than_the_embeddings(bpe, capsys, tmp_path):
    other = tmp_path / "small"
    shutil.copytree(bpe["dense"], other)
    config = json.loads((other / "config.json").read_text())
    vocab = config["vocab_size"]
    from transformers import AutoModelForCausalLM, LlamaConfig

    small = AutoModelForCausalLM.from_config(LlamaConfig(**{**config, "vocab_size": vocab - 5}))
    small.save_pretrained(other)
    code, _, err = run(["eval", other, "--data", bpe["root"] / "data.txt", "--seq", "16"], capsys)
    assert_user_error(code, err, f"{vocab - 5} token embeddings; its tokenizer has {vocab} tokens")


def test_quantize_keeps_the_checkpoints_dtype(capsys, tmp_path):
    text = words_text(400)
    dense = bpe_model_dir(tmp_path / "bf16", text, dtype=torch.bfloat16)
    assert json.loads((dense / "config.json").read_text())["dtype"] == "bfloat16"
    for flag, dtype in (([], "bfloat16"), (["--dtype", "float32"], "float32")):
        out = tmp_path / f"q-{dtype}"
        code, stdout, err = run(["quantize", dense, out, "--no-progress", "--rounds", "1", *flag], capsys)
        assert code == 0, err
        assert f"({dtype};" in stdout
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            codebooks = f.get_tensor("model.layers.0.self_attn.q_proj.codebooks")
            codes = f.get_tensor("model.layers.0.self_attn.q_proj.codes")
        assert codebooks.dtype == getattr(torch, dtype) and codes.dtype == torch.int8
    # The bfloat16 checkpoint evaluates in bfloat16 and float32 to about the same perplexity.
    data = tmp_path / "d.txt"
    data.write_text(text)
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        code, out, err = run(["eval", tmp_path / "q-bfloat16", "--data", data, "--seq", "16", "--dtype", dtype], capsys)
        assert code == 0, err
        ppl[dtype] = float(out.split()[1])
    assert math.isclose(ppl["float32"], ppl["bfloat16"], rel_tol=0.05), ppl


def test_finetune_bfloat16(bpe, capsys, tmp_path):
    out = tmp_path / "a"
    argv = ["finetune", bpe["aqlm"], "--data", bpe["root"] / "data.txt", "--out", out, "--dtype", "bfloat16", *TRAIN]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["dtype"] == "bfloat16" and all(math.isfinite(x) for x in state["losses"])
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # LoRA weights stay float32
    assert Path(out / "optimizer.pt").is_file()
