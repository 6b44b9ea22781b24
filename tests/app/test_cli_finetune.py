"""``aqlm-lora finetune`` then ``eval``: the adapter it saves, exact --resume, its flags and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aqlm_lora.app import cli, cmd_finetune
from aqlm_lora.app.demo import DemoConfig, build_model
from aqlm_lora.app.text import ByteTokenizer
from tests.support.cli import TINY, TRAIN, assert_user_error, byte_model_dir, copy_dir, run, tree


def test_finetune_then_eval(workspace, capsys, tmp_path):
    adapter = tmp_path / "adapter"
    code, out, err = run(["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", adapter, *TRAIN], capsys)
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

    code, out, err = run(["eval", workspace["aqlm"], "--data", workspace["data"], "--seq", "32"], capsys)
    assert code == 0, err
    base_ppl = float(out.split()[1])
    code, out, err = run(
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
    assert run(["finetune", workspace["aqlm"], "--out", straight, "--steps", "4", *common], capsys)[0] == 0
    assert run(["finetune", workspace["aqlm"], "--out", split, "--steps", "2", *common], capsys)[0] == 0
    code, out, err = run(["finetune", workspace["aqlm"], "--out", split, "--steps", "2", "--resume", *common], capsys)
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
    before = tree(split)
    other = tmp_path / "other"
    assert (
        run(["finetune", workspace["aqlm"], "--out", other, "--steps", "1", "--resume", split, *common], capsys)[0] == 0
    )
    assert json.loads((other / "trainer_state.json").read_text())["global_step"] == 5
    assert tree(split) == before


def test_gradient_checkpointing_gives_the_same_step(workspace, capsys, tmp_path):
    args = ["--data", workspace["data"], "--steps", "1", "--batch", "2", "--seq", "16", "--no-progress"]
    assert run(["finetune", workspace["aqlm"], "--out", tmp_path / "a", *args], capsys)[0] == 0
    code, _, err = run(
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
    code, _, err = run(
        ["finetune", workspace["dense"], "--data", workspace["data"], "--out", tmp_path / "a", *TRAIN], capsys
    )
    assert code == 0
    assert "no AQLM layers" in err


def test_error_data_too_short(workspace, capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    code, _, err = run(["finetune", workspace["aqlm"], "--data", short, "--out", tmp_path / "a", *TRAIN], capsys)
    assert_user_error(code, err, "--seq")


def test_error_resume_without_state(workspace, capsys, tmp_path):
    code, _, err = run(
        ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", tmp_path / "x", "--resume"], capsys
    )
    assert_user_error(code, err, "does not exist")


def test_error_adapter_of_another_model(workspace, capsys, tmp_path):
    adapter = tmp_path / "adapter"
    assert run(["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", adapter, *TRAIN], capsys)[0] == 0
    other = byte_model_dir(tmp_path / "other", DemoConfig(hidden=48, intermediate=64, layers=2, heads=2, seq=32))
    code, _, err = run(["eval", other, "--adapter", adapter, "--data", workspace["data"]], capsys)
    assert_user_error(code, err, "does not fit")
    code, _, err = run(["finetune", other, "--data", workspace["data"], "--out", adapter, "--resume", *TRAIN], capsys)
    assert_user_error(code, err, "does not fit")
    assert json.loads((adapter / "trainer_state.json").read_text())["global_step"] == 2  # untouched


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
    assert_user_error(2, capsys.readouterr().err, f"argument {flag}:", value)
    assert not out.exists()


def test_finetune_non_finite_loss_is_one_line(workspace, capsys, tmp_path):
    """A loss that turns NaN (here: a NaN weight in the model) used to end in a traceback blaming --lr."""
    model = build_model(TINY, ByteTokenizer(), seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    ByteTokenizer().save(tmp_path / "nan")
    out = tmp_path / "adapter"
    code, _, err = run(["finetune", tmp_path / "nan", "--data", workspace["data"], "--out", out, *TRAIN], capsys)
    err = "\n".join(line for line in err.splitlines() if not line.startswith("note: "))  # "no AQLM layers"
    assert_user_error(code, err, "loss is nan at step 0")
    assert not out.exists()


def test_error_adapter_made_non_finite_by_the_last_step(workspace, capsys, tmp_path, monkeypatch):
    """The last update is never followed by a loss: a NaN it makes must not be saved as the adapter."""
    real = cmd_finetune.train_steps

    def last_step_diverges(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("inf"))
        return result

    monkeypatch.setattr(cmd_finetune, "train_steps", last_step_diverges)
    out = tmp_path / "adapter"
    code, _, err = run(["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", out, *TRAIN], capsys)
    assert_user_error(code, err, "diverged", "after step 2", "nothing was saved")
    assert not out.exists()


@pytest.mark.parametrize("onto", ["model", "teacher"])
def test_error_out_onto_the_model_or_teacher(workspace, capsys, tmp_path, onto):
    """--out MODEL_DIR (or the --teacher's folder) --overwrite used to replace that model with the adapter."""
    model = copy_dir(workspace["aqlm"], tmp_path / "model")
    teacher = copy_dir(workspace["dense"], tmp_path / "teacher")
    out = {"model": model, "teacher": teacher}[onto]
    before = tree(out)
    argv = ["finetune", model, "--teacher", teacher, "--data", workspace["data"], "--out", out, "--overwrite", *TRAIN]
    code, _, err = run(argv, capsys)
    assert_user_error(code, err, "--out must differ from", {"model": "MODEL_DIR", "teacher": "--teacher"}[onto])
    assert tree(out) == before


def test_data_of_exactly_one_window(workspace, capsys, tmp_path):
    """Training windows are --seq tokens (targets shifted inside them): --seq tokens of data are enough,
    one fewer is refused (finetune used to ask for one token it never reads)."""
    from aqlm_lora.app.data import load_tokenizer, read_data

    data = tmp_path / "short.txt"
    data.write_text("the quick brown fox jumps")
    count = read_data(data, load_tokenizer(workspace["aqlm"])).tokens.numel()
    common = ["--data", data, "--steps", "1", "--batch", "2", "--no-progress"]
    code, out, err = run(["finetune", workspace["aqlm"], "--out", tmp_path / "a", "--seq", str(count), *common], capsys)
    assert code == 0, err
    code, out, err = run(
        ["eval", workspace["aqlm"], "--adapter", tmp_path / "a", "--data", data, "--seq", str(count)], capsys
    )
    assert code == 0, err
    code, _, err = run(
        ["finetune", workspace["aqlm"], "--out", tmp_path / "b", "--seq", str(count + 1), *common], capsys
    )
    assert_user_error(code, err, f"has {count} tokens", f"--seq {count + 1} needs at least {count + 1}")
