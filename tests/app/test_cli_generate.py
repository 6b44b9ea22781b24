"""`aqlm-lora generate`: prompts with their own adapters (or none) in mixed batches, on a tiny saved
AQLM model with two saved adapters; the mixed batch gives each prompt the completion it gets alone."""

from __future__ import annotations

import json
import re

import pytest
import torch

from aqlm_lora.app import cli
from tests.support.cli import assert_user_error, run

PROMPTS = [
    ("def value(self):", "a"),
    ("class For(import)", "b"),
    ("return self.value", None),
    ("for x in value: i", "a"),
    ("if self else: ret", "b"),
]


@pytest.fixture(scope="module")
def adapters(workspace, tmp_path_factory):
    """Two random adapters of different ranks and targets, saved as PEFT adapters."""
    from peft import LoraConfig, get_peft_model

    import aqlm_lora
    from aqlm_lora.app.models import load_causal_lm
    from tests.support.layers import edit_adapters

    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for seed, (name, r, targets) in enumerate(
        [("a", 4, ["q_proj", "v_proj"]), ("b", 8, ["q_proj", "o_proj", "up_proj"])]
    ):
        torch.manual_seed(seed)
        model = load_causal_lm(workspace["aqlm"])
        config = aqlm_lora.register(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        peft_model = get_peft_model(model, config)
        edit_adapters(peft_model, lambda p: p.normal_(0, 0.5))
        dirs[name] = root / name
        peft_model.save_pretrained(dirs[name])
    return dirs


def _write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "adapter": a}) + "\n" for p, a in prompts))
    return path


def _generate(workspace, adapters, prompts_file, out, *extra):
    argv = ["generate", str(workspace["aqlm"]), "--prompts", str(prompts_file), "--out", str(out)]
    for name, directory in adapters.items():
        argv += ["--adapter", f"{name}={directory}"]
    return cli.main([*argv, "--max-new-tokens", "6", "--no-progress", *extra])


def test_mixed_batch_equals_each_prompt_alone(workspace, adapters, tmp_path, capsys):
    prompts = _write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    assert _generate(workspace, adapters, prompts, tmp_path / "mixed.jsonl", "--batch", "5") == 0
    err = capsys.readouterr().err
    assert re.search(
        r"generate: 5 prompts, 2 adapters; prompt \d+ tokens in [\d.]+ s \([\d,.]+ tokens/s\); "
        r"decode \d+ tokens in [\d.]+ s \([\d,.]+ tokens/s\)",
        err,
    ), err
    mixed = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in mixed] == PROMPTS
    assert all(r["tokens"] >= 1 and isinstance(r["completion"], str) for r in mixed)
    assert all(len(r["token_ids"]) == r["tokens"] for r in mixed)
    assert _generate(workspace, adapters, prompts, tmp_path / "alone.jsonl", "--batch", "1") == 0
    alone = [json.loads(line) for line in (tmp_path / "alone.jsonl").read_text().splitlines()]
    assert mixed == alone
    # The adapters change the completions (so the comparison above is not vacuous).
    plain = _write_prompts(tmp_path / "plain.jsonl", [(p, None) for p, _ in PROMPTS])
    assert _generate(workspace, {}, plain, tmp_path / "base.jsonl", "--batch", "5") == 0
    base = [json.loads(line) for line in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert base[2]["completion"] == mixed[2]["completion"]
    assert any(b["completion"] != m["completion"] for b, m in zip(base, mixed) if m["adapter"])


def test_stdout_when_no_out_and_sampling(workspace, adapters, tmp_path, capsys):
    prompts = _write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:3])
    argv = [
        "generate",
        str(workspace["aqlm"]),
        "--prompts",
        str(prompts),
        "--adapter",
        f"a={adapters['a']}",
        "--adapter",
        f"b={adapters['b']}",
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--do-sample",
        "--seed",
        "3",
    ]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first  # a fixed seed gives the same samples
    assert len(first.splitlines()) == 3


@pytest.mark.parametrize(
    "lines,adapter_args,message",
    [
        (
            [{"prompt": "x", "adapter": "zzz"}],
            ["a"],
            r"prompts.jsonl:1: adapter 'zzz' is not one of the --adapter names \(a\)",
        ),
        (["not json"], ["a"], r"prompts.jsonl:1: not a JSON object"),
        ([{"text": "x"}], ["a"], r"prompts.jsonl:1: expected \{\"prompt\""),
        ([{"prompt": "x"}], ["bad"], r"--adapter expects NAME=DIR, got 'bad'"),
    ],
)
def test_mistakes_are_one_line_errors(workspace, adapters, tmp_path, capsys, lines, adapter_args, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    argv = ["generate", str(workspace["aqlm"]), "--prompts", str(path)]
    for name in adapter_args:
        argv += ["--adapter", f"{name}={adapters[name]}" if name in adapters else name]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("aqlm-lora: error:") and re.search(message, err), err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--temperature", "0"),
        ("--temperature", "-1"),
        ("--temperature", "nan"),
        ("--top-k", "-3"),
        ("--top-p", "2"),
        ("--top-p", "0"),
        ("--seed", str(2**70)),
    ],
)
def test_error_bad_sampling_number(capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "M", "--prompts", "P", "--do-sample", flag, value])
    assert info.value.code == 2
    assert_user_error(2, capsys.readouterr().err, f"argument {flag}:", value)


def test_error_bad_out_and_prompts_files(workspace, tmp_path, capsys):
    prompts = _write_prompts(tmp_path / "prompts.jsonl", [("def", None)])
    base = ["generate", workspace["aqlm"], "--prompts", prompts, "--max-new-tokens", "2", "--no-progress"]
    code, _, err = run([*base, "--out", tmp_path / "missing" / "out.jsonl"], capsys)
    assert_user_error(code, err, "missing", "does not exist")
    code, _, err = run([*base, "--out", tmp_path], capsys)
    assert_user_error(code, err, str(tmp_path), "is a directory")
    kept = tmp_path / "kept.jsonl"
    kept.write_text("keep me\n")
    code, _, err = run([*base, "--out", kept], capsys)
    assert_user_error(code, err, str(kept), "exists", "--overwrite")
    assert kept.read_text() == "keep me\n"
    assert run([*base, "--out", kept, "--overwrite"], capsys)[0] == 0
    assert json.loads(kept.read_text())["prompt"] == "def"
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "x"}\n{"prompt": "caf\xe9"}\n')
    code, _, err = run(["generate", workspace["aqlm"], "--prompts", latin1], capsys)
    assert_user_error(code, err, f"{latin1}:2", "not UTF-8")


def test_decode_count_leaves_out_rows_that_ended(workspace, tmp_path, capsys, monkeypatch):
    """The summary counts the tokens rows produced after the prefill's one (an EOS included), not
    steps x rows: a row that stopped at EOS is only padded by the later steps."""
    from aqlm_lora.app import cmd_generate

    def fake_batch(model, tokenizer, records, args, pad_id, clock):
        clock.times.extend([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # 6 steps: the longest row made 6 tokens
        eos_after = [6, 0, 2, 5, 6]  # tokens before EOS (6: no EOS within --max-new-tokens 6)
        return [(3, [7] * n, min(n + 1, 6)) for n in eos_after[: len(records)]]

    monkeypatch.setattr(cmd_generate, "generate_batch", fake_batch)
    prompts = _write_prompts(tmp_path / "prompts.jsonl", [(p, None) for p, _ in PROMPTS])
    assert _generate(workspace, {}, prompts, tmp_path / "out.jsonl", "--batch", "5") == 0
    err = capsys.readouterr().err
    assert "prompt 15 tokens" in err and "decode 17 tokens" in err, err  # 5 + 0 + 2 + 5 + 5 (was 5 x 5)
