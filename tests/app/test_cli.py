"""The ``aqlm-lora`` command line: quantize -> finetune -> eval, resume, demo, and every user error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import aqlm
import pytest
import torch
from safetensors.torch import load_file

from aqlm_lora.app import cli
from aqlm_lora.app.demo import DemoConfig, build_model, run_demo
from aqlm_lora.app.text import TOKENIZER_FILE, ByteTokenizer

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


# ---------------------------------------------------------------------------------------------
# Numeric flags: checked at parse time, one line naming the flag, nothing run or written


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--alpha", "nan"),
        ("--alpha", "inf"),
        ("--alpha", "-1"),
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--lr", "2"),
        ("--dropout", "nan"),
        ("--dropout", "1"),
        ("--dropout", "-0.1"),
        ("--r", "0"),
        ("--r", "1.5"),
        ("--steps", "1e3"),
        ("--batch", str(2**40)),
        ("--seq", "-3"),
        ("--warmup", "-1"),
        ("--seed", str(2**70)),
        ("--seed", "nan"),
    ],
)
def test_error_bad_finetune_number(workspace, capsys, tmp_path, flag, value):
    out = tmp_path / "adapter"
    with pytest.raises(SystemExit) as info:
        cli.main(
            ["finetune", str(workspace["aqlm"]), "--data", str(workspace["data"]), "--out", str(out), *TRAIN]
            + [flag, value]
        )
    assert info.value.code == 2
    _assert_user_error(2, capsys.readouterr().err, f"argument {flag}:", value)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "M", "O", "--rounds", "-1"],
        ["quantize", "M", "O", "--kmeans-iters", "nan"],
        ["quantize", "M", "O", "--beam", "0"],
        ["quantize", "M", "O", "--seed", "1e400"],
        ["eval", "M", "--data", "D", "--seq", "inf"],
        ["eval", "M", "--data", "D", "--batch", "0"],
        ["eval", "M", "--data", "D", "--max-windows", "-2"],
        ["demo", "--seed", str(-(2**64))],
    ],
)
def test_error_bad_number_other_commands(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    _assert_user_error(2, capsys.readouterr().err, f"argument {argv[-2]}:")


def test_finetune_non_finite_loss_is_one_line(workspace, capsys, tmp_path):
    """A loss that turns NaN (here: a NaN weight in the model) used to end in a traceback blaming --lr."""
    model = build_model(TINY, ByteTokenizer(), seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    ByteTokenizer().save(tmp_path / "nan")
    out = tmp_path / "adapter"
    code, _, err = _run(["finetune", tmp_path / "nan", "--data", workspace["data"], "--out", out, *TRAIN], capsys)
    err = "\n".join(line for line in err.splitlines() if not line.startswith("note: "))  # "no AQLM layers"
    _assert_user_error(code, err, "loss is nan at step 0")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Broken files: one line naming the file, nothing written


@pytest.fixture(scope="module")
def adapter(workspace):
    out = workspace["root"] / "adapter"
    assert (
        cli.main(["finetune", str(workspace["aqlm"]), "--data", str(workspace["data"]), "--out", str(out), *TRAIN]) == 0
    )
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def _quantize_eval_finetune(model_dir: Path, workspace, tmp_path: Path) -> list[list]:
    return [
        ["quantize", model_dir, tmp_path / "out", "--no-progress"],
        ["eval", model_dir, "--data", workspace["data"], "--seq", "16"],
        ["finetune", model_dir, "--data", workspace["data"], "--out", tmp_path / "out", *TRAIN],
    ]


@pytest.mark.parametrize(
    "field, value", [("hidden_size", "32"), ("num_hidden_layers", "two"), ("vocab_size", [259]), ("rms_norm_eps", "x")]
)
def test_error_wrong_typed_model_config(workspace, capsys, tmp_path, field, value):
    model_dir = _copy(workspace["dense"], tmp_path / "model")
    _edit_json(model_dir / "config.json", **{field: value})
    for argv in _quantize_eval_finetune(model_dir, workspace, tmp_path):
        code, _, err = _run(argv, capsys)
        _assert_user_error(code, err, str(model_dir / "config.json"), field)
        assert not (tmp_path / "out").exists()


def test_error_model_config_not_json(workspace, capsys, tmp_path):
    model_dir = _copy(workspace["dense"], tmp_path / "model")
    (model_dir / "config.json").write_text('{"model_type": "llama", ')
    code, _, err = _run(["quantize", model_dir, tmp_path / "out", "--no-progress"], capsys)
    _assert_user_error(code, err, str(model_dir / "config.json"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_error_truncated_model_weights(workspace, capsys, tmp_path, keep):
    for name in ("dense", "aqlm"):
        model_dir = _copy(workspace[name], tmp_path / name)
        _truncate(model_dir / "model.safetensors", keep)
        for argv in _quantize_eval_finetune(model_dir, workspace, tmp_path):
            code, _, err = _run(argv, capsys)
            if name == "aqlm" and argv[0] == "quantize":
                continue  # refused as already quantized or as unreadable: either way one line
            _assert_user_error(code, err, str(model_dir / "model.safetensors"))
            assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.9, 0.0001])
def test_error_truncated_adapter(workspace, adapter, capsys, tmp_path, keep):
    broken = _copy(adapter, tmp_path / "adapter")
    _truncate(broken / "adapter_model.safetensors", keep)
    code, _, err = _run(["eval", workspace["aqlm"], "--adapter", broken, "--data", workspace["data"]], capsys)
    _assert_user_error(code, err, str(broken / "adapter_model.safetensors"))
    before = _tree(broken)
    code, _, err = _run(
        ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", broken, "--resume", *TRAIN], capsys
    )
    _assert_user_error(code, err, str(broken / "adapter_model.safetensors"))
    assert _tree(broken) == before


@pytest.mark.parametrize("field, value", [("r", "16"), ("lora_alpha", "x"), ("lora_dropout", 2.0), ("r", 0)])
def test_error_wrong_typed_adapter_config(workspace, adapter, capsys, tmp_path, field, value):
    broken = _copy(adapter, tmp_path / "adapter")
    _edit_json(broken / "adapter_config.json", **{field: value})
    code, _, err = _run(["eval", workspace["aqlm"], "--adapter", broken, "--data", workspace["data"]], capsys)
    _assert_user_error(code, err, str(broken / "adapter_config.json"), field)


def _corrupt_optimizer(path: Path, how: str) -> None:
    if how == "truncated":
        _truncate(path)
    elif how == "garbage":
        path.write_bytes(b"not a torch file\n")
    elif how == "list":
        torch.save([1, 2], path)
    else:  # a dict of the wrong shape
        torch.save({"state": {}, "param_groups": [{"params": "x"}]}, path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "list", "wrong_groups"])
def test_error_corrupt_optimizer_on_resume(workspace, adapter, capsys, tmp_path, how):
    broken = _copy(adapter, tmp_path / "adapter")
    _corrupt_optimizer(broken / "optimizer.pt", how)
    before = _tree(broken)
    for out in (broken, tmp_path / "elsewhere"):
        code, _, err = _run(
            ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", out, "--resume", broken, *TRAIN],
            capsys,
        )
        _assert_user_error(code, err, str(broken / "optimizer.pt"))
    assert _tree(broken) == before and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    "changes", [{"losses": 5}, {"losses": ["a"]}, {"global_step": "2"}, {"global_step": 2.5}, {"global_step": -1}]
)
def test_error_wrong_typed_trainer_state(workspace, adapter, capsys, tmp_path, changes):
    broken = _copy(adapter, tmp_path / "adapter")
    _edit_json(broken / "trainer_state.json", **changes)
    before = _tree(broken)
    code, _, err = _run(
        ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", broken, "--resume", *TRAIN], capsys
    )
    _assert_user_error(code, err, str(broken / "trainer_state.json"), next(iter(changes)))
    assert _tree(broken) == before


@pytest.mark.parametrize("content", ["[1, 2]", '{"type": 3', b"\xff\xfe"])
def test_error_bad_tokenizer_file(workspace, capsys, tmp_path, content):
    model_dir = _copy(workspace["dense"], tmp_path / "model")
    path = model_dir / TOKENIZER_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = _run(["eval", model_dir, "--data", workspace["data"]], capsys)
    _assert_user_error(code, err, str(path))


def test_error_adapter_made_non_finite_by_the_last_step(workspace, capsys, tmp_path, monkeypatch):
    """The last update is never followed by a loss: a NaN it makes must not be saved as the adapter."""
    from aqlm_lora.app import train

    real = train.train_steps

    def last_step_diverges(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
        return result

    monkeypatch.setattr(train, "train_steps", last_step_diverges)
    out = tmp_path / "adapter"
    code, _, err = _run(["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", out, *TRAIN], capsys)
    _assert_user_error(code, err, "diverged", "after step 2", "nothing was saved")
    assert not out.exists()


def test_error_quantize_nan_weight(capsys, tmp_path):
    """A NaN weight used to quantize to NaN codebooks with exit code 0 (perplexity nan)."""
    model = build_model(TINY, ByteTokenizer(), seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[2, 3] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    code, _, err = _run(["quantize", tmp_path / "nan", tmp_path / "out", "--no-progress"], capsys)
    _assert_user_error(code, err, "model.layers.1.self_attn.k_proj", "NaN")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# --no-progress


class _Terminal(io.StringIO):
    """stderr that says it is a terminal, so tqdm (disable=None) and transformers would draw bars."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("no_progress", [True, False])
def test_quantize_no_progress_draws_no_bar(workspace, monkeypatch, tmp_path, no_progress):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as a caller of cli.main may have left it
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["quantize", str(workspace["dense"]), str(tmp_path / "out"), "--rounds", "0"]
    assert cli.main(argv + (["--no-progress"] if no_progress else [])) == 0
    if no_progress:
        assert terminal.getvalue() == ""
    else:  # the check can see bars: ours shows without the flag
        assert "quantize 2x8" in terminal.getvalue()


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
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
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
