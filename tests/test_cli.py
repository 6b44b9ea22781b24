"""The ``aqlm-lora`` command line: quantize -> finetune -> eval, resume, demo, and every user error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aqlm
import pytest
import torch
from safetensors.torch import load_file

from aqlm_lora import cli
from aqlm_lora.demo import DemoConfig, build_model, run_demo
from aqlm_lora.text import TOKENIZER_FILE, ByteTokenizer

TINY = DemoConfig(hidden=32, intermediate=64, layers=2, heads=2, seq=32)
TRAIN = ["--steps", "2", "--batch", "2", "--seq", "16", "--no-progress"]


def _make_model_dir(path: Path, cfg: DemoConfig = TINY, tokenizer: bool = True) -> Path:
    model = build_model(cfg, ByteTokenizer(), seed=0)
    model.save_pretrained(path)
    if tokenizer:
        ByteTokenizer().save(path)
    return path


def _text() -> str:
    gen = torch.Generator().manual_seed(0)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "(", ")", ":", "\n"]
    picks = torch.randint(len(words), (3000,), generator=gen).tolist()
    return " ".join(words[i] for i in picks)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    dense = _make_model_dir(root / "dense")
    data = root / "data.txt"
    data.write_text(_text())
    quantized = root / "aqlm"
    assert cli.main(["quantize", str(dense), str(quantized), "--scheme", "2x8", "--no-progress"]) == 0
    return {"root": root, "dense": dense, "data": data, "aqlm": quantized}


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aqlm-lora: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The main job


def test_quantize_writes_an_aqlm_checkpoint(workspace):
    from transformers import AutoModelForCausalLM

    quantized = workspace["aqlm"]
    assert (quantized / TOKENIZER_FILE).is_file()
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "aqlm" and config["num_codebooks"] == 2 and config["nbits_per_codebook"] == 8
    model = AutoModelForCausalLM.from_pretrained(quantized)
    assert sum(isinstance(m, aqlm.QuantizedLinear) for m in model.modules()) == 2 * 7
    assert not list(quantized.parent.glob(".aqlm.tmp-*"))  # the staging directory is gone


def test_finetune_then_eval(workspace, capsys, tmp_path):
    adapter = tmp_path / "adapter"
    code, out, err = _run(
        ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", adapter, *TRAIN], capsys
    )
    assert code == 0, err
    assert "steps 1..2" in out
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (adapter / name).is_file(), name
    state = json.loads((adapter / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and len(state["losses"]) == 2
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 7  # lora_A and lora_B of every AQLM layer
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 32)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())  # it trained

    code, out, err = _run(["eval", workspace["aqlm"], "--data", workspace["data"], "--seq", "32"], capsys)
    assert code == 0, err
    base_ppl = float(out.split()[1])
    code, out, err = _run(
        ["eval", workspace["aqlm"], "--adapter", adapter, "--data", workspace["data"], "--seq", "32"], capsys
    )
    assert code == 0, err
    lora_ppl = float(out.split()[1])
    assert 1.0 < lora_ppl < 300 and 1.0 < base_ppl < 300
    assert lora_ppl != base_ppl


def test_resume_continues_exactly(workspace, capsys, tmp_path):
    """2 steps + --resume 2 steps == 4 steps in one go (same batches, dropout seeds, AdamW state)."""
    common = ["--data", workspace["data"], "--batch", "2", "--seq", "16", "--no-progress", "--lr", "3e-3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(["finetune", workspace["aqlm"], "--out", straight, "--steps", "4", *common], capsys)[0] == 0
    assert _run(["finetune", workspace["aqlm"], "--out", split, "--steps", "2", *common], capsys)[0] == 0
    code, out, err = _run(["finetune", workspace["aqlm"], "--out", split, "--steps", "2", "--resume", *common], capsys)
    assert code == 0, err
    assert "steps 3..4" in out
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(split / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    state_a = json.loads((straight / "trainer_state.json").read_text())
    state_b = json.loads((split / "trainer_state.json").read_text())
    assert state_b["global_step"] == 4
    assert state_a["losses"] == pytest.approx(state_b["losses"], rel=1e-5)

    # Resume from one directory into another leaves the source as it was.
    before = _tree(split)
    other = tmp_path / "other"
    assert (
        _run(["finetune", workspace["aqlm"], "--out", other, "--steps", "1", "--resume", split, *common], capsys)[0]
        == 0
    )
    assert json.loads((other / "trainer_state.json").read_text())["global_step"] == 5
    assert _tree(split) == before


def test_gradient_checkpointing_gives_the_same_step(workspace, capsys, tmp_path):
    args = ["--data", workspace["data"], "--steps", "1", "--batch", "2", "--seq", "16", "--no-progress"]
    assert _run(["finetune", workspace["aqlm"], "--out", tmp_path / "a", *args], capsys)[0] == 0
    code, _, err = _run(
        ["finetune", workspace["aqlm"], "--out", tmp_path / "b", "--gradient-checkpointing", *args], capsys
    )
    assert code == 0, err
    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_finetune_dense_model_says_so(workspace, capsys, tmp_path):
    code, _, err = _run(
        ["finetune", workspace["dense"], "--data", workspace["data"], "--out", tmp_path / "a", *TRAIN], capsys
    )
    assert code == 0
    assert "no AQLM layers" in err


# ---------------------------------------------------------------------------------------------
# User errors: one line, no traceback, non-zero exit, nothing overwritten


def test_error_missing_model_dir(capsys, tmp_path):
    code, _, err = _run(["quantize", tmp_path / "nope", tmp_path / "out"], capsys)
    _assert_user_error(code, err, "does not exist")
    assert not (tmp_path / "out").exists()


def test_error_not_a_model_dir(capsys, tmp_path):
    code, _, err = _run(["quantize", tmp_path, tmp_path / "out"], capsys)
    _assert_user_error(code, err, "config.json")


def test_error_bad_scheme(workspace, capsys, tmp_path):
    code, _, err = _run(["quantize", workspace["dense"], tmp_path / "out", "--scheme", "2x8q"], capsys)
    _assert_user_error(code, err, "invalid scheme", "2x8q")


def test_error_scheme_does_not_fit(workspace, capsys, tmp_path):
    code, _, err = _run(["quantize", workspace["dense"], tmp_path / "out", "--scheme", "2x8g64"], capsys)
    _assert_user_error(code, err, "does not split")
    assert not (tmp_path / "out").exists()


def test_error_no_linear_layers(workspace, capsys, tmp_path):
    skip = "lm_head,q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    code, _, err = _run(["quantize", workspace["dense"], tmp_path / "out", "--skip", skip], capsys)
    _assert_user_error(code, err, "no nn.Linear")


def test_error_already_quantized(workspace, capsys, tmp_path):
    code, _, err = _run(["quantize", workspace["aqlm"], tmp_path / "out"], capsys)
    _assert_user_error(code, err, "already quantized")


@pytest.mark.parametrize("command", ["quantize", "finetune", "demo"])
def test_error_non_empty_output_dir_is_kept(workspace, capsys, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    argv = {
        "quantize": ["quantize", workspace["dense"], out],
        "finetune": ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", out, *TRAIN],
        "demo": ["demo", "--out", out, "--no-progress"],
    }[command]
    code, _, err = _run(argv, capsys)
    _assert_user_error(code, err, "not empty", "--overwrite")
    assert _tree(out) == {"precious.txt": b"keep me"}


def test_overwrite_replaces_output_dir(workspace, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = _run(["quantize", workspace["dense"], out, "--overwrite", "--no-progress", "--rounds", "0"], capsys)
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


def test_error_output_is_a_file(workspace, capsys, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    code, _, err = _run(["quantize", workspace["dense"], out], capsys)
    _assert_user_error(code, err, "not a directory")
    assert out.read_text() == "x"


def test_error_missing_data_file(workspace, capsys, tmp_path):
    code, _, err = _run(
        ["finetune", workspace["aqlm"], "--data", tmp_path / "none.txt", "--out", tmp_path / "a"], capsys
    )
    _assert_user_error(code, err, "none.txt", "does not exist")
    code, _, err = _run(["eval", workspace["aqlm"], "--data", tmp_path / "none.txt"], capsys)
    _assert_user_error(code, err, "does not exist")


def test_error_data_too_short(workspace, capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    code, _, err = _run(["finetune", workspace["aqlm"], "--data", short, "--out", tmp_path / "a", *TRAIN], capsys)
    _assert_user_error(code, err, "--seq")


def test_error_model_without_tokenizer(capsys, tmp_path, workspace):
    model_dir = _make_model_dir(tmp_path / "m", tokenizer=False)
    code, _, err = _run(["eval", model_dir, "--data", workspace["data"]], capsys)
    _assert_user_error(code, err, TOKENIZER_FILE)


def test_error_adapter_of_another_model(workspace, capsys, tmp_path):
    adapter = tmp_path / "adapter"
    assert _run(["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", adapter, *TRAIN], capsys)[0] == 0
    other = _make_model_dir(tmp_path / "other", DemoConfig(hidden=48, intermediate=64, layers=2, heads=2, seq=32))
    code, _, err = _run(["eval", other, "--adapter", adapter, "--data", workspace["data"]], capsys)
    _assert_user_error(code, err, "does not fit")
    code, _, err = _run(["finetune", other, "--data", workspace["data"], "--out", adapter, "--resume", *TRAIN], capsys)
    _assert_user_error(code, err, "does not fit")
    assert json.loads((adapter / "trainer_state.json").read_text())["global_step"] == 2  # untouched


def test_error_adapter_dir_is_not_an_adapter(workspace, capsys, tmp_path):
    code, _, err = _run(
        ["eval", workspace["aqlm"], "--adapter", workspace["dense"], "--data", workspace["data"]], capsys
    )
    _assert_user_error(code, err, "adapter_config.json")
    code, _, err = _run(["eval", workspace["aqlm"], "--adapter", tmp_path / "x", "--data", workspace["data"]], capsys)
    _assert_user_error(code, err, "does not exist")


def test_error_resume_without_state(workspace, capsys, tmp_path):
    code, _, err = _run(
        ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", tmp_path / "x", "--resume"], capsys
    )
    _assert_user_error(code, err, "does not exist")


def test_usage_errors_are_one_line(capsys):
    bad = (
        ["finetune", "model"],
        ["nope"],
        [],
        ["finetune", "m", "--data", "d", "--out", "o", "--steps", "0"],
        ["eval", "m", "--data", "d", "--bogus"],
    )
    for argv in bad:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        _, err = capsys.readouterr()
        _assert_user_error(2, err)


def test_bench_missing_script(monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench_script", lambda: None)
    code, _, err = _run(["bench"], capsys)
    _assert_user_error(code, err, "bench_linear.py")


def test_bench_runs_the_script(monkeypatch, capfd, tmp_path):
    script = tmp_path / "benchmarks" / "bench_linear.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "bench_script", lambda: script)
    code = cli.main(["bench", "--out", str(tmp_path)])
    assert code == 3  # the script's exit code comes back
    assert "ARGS ['--quick', '--out', '" in capfd.readouterr().out


def test_entry_point_subprocess(tmp_path):
    """``python -m aqlm_lora``: one stderr line and exit code 1 for a user error."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run(
        [sys.executable, "-m", "aqlm_lora", "eval", str(tmp_path / "missing"), "--data", str(tmp_path / "d.txt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"aqlm-lora: error: model directory {tmp_path / 'missing'} does not exist"
    ]


# ---------------------------------------------------------------------------------------------
# The demo, shrunk


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = DemoConfig(
        hidden=64,
        intermediate=128,  # 128 output rows: more than one row block in the CPU kernels
        layers=1,
        heads=2,
        seq=32,
        batch=4,
        dense_steps=4,
        lora_steps=3,
        stock_steps=0,
        train_bytes=20000,
        valid_bytes=4000,
    )
    assert run_demo(str(out), progress=False, config=cfg) == 0
    printed = capsys.readouterr().out
    for name in ("dense/config.json", "aqlm-2x8/config.json", "adapter/adapter_model.safetensors", "results.json"):
        assert (out / name).is_file(), name
    assert (out / "dense" / TOKENIZER_FILE).is_file() and (out / "aqlm-2x8" / TOKENIZER_FILE).is_file()
    results = json.loads((out / "results.json").read_text())
    ppl = results["perplexity"]
    assert all(1.0 < v < 300 for v in ppl.values())
    errors = results["quant_error_per_round"]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))
    stock = results["step_seconds"]["peft_stock"]
    assert "error" in stock or stock["step_seconds"] > 0  # measured or reported, never a crash
    assert "| dense fp32 |" in printed and "adapter saved to" in printed
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(out / "aqlm-2x8")
    # The demo's outputs work with the other commands.
    code = cli.main(
        [
            "eval",
            str(out / "aqlm-2x8"),
            "--adapter",
            str(out / "adapter"),
            "--data",
            str(out / "data" / "valid.txt"),
            "--seq",
            "32",
        ]
    )
    assert code == 0
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(ppl["aqlm_lora"], rel=1e-4)
