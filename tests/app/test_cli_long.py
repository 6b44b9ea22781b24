"""Long runs: periodic checkpoints kept apart from the adapter, Ctrl-C saves one, --resume continues
exactly; progress lines in logs; --seq against the model's positions; --version, help, a closed pipe."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aqlm_lora.app import cli, cmd_finetune
from tests.support.cli import assert_user_error, cli_command, cli_env, make_workspace, run

COMMON = ["--batch", "2", "--seq", "16", "--no-progress", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("long"), "--rounds", "1")


@pytest.fixture(scope="module")
def straight(ws):
    """8 steps in one go: what every interrupted and resumed run must reproduce."""
    out = ws["root"] / "straight"
    argv = ["finetune", ws["aqlm"], "--data", ws["data"], "--out", out, "--steps", "8", *COMMON]
    assert cli.main([str(a) for a in argv]) == 0
    return out


def _finetune(ws, out: Path, *extra) -> list:
    return ["finetune", ws["aqlm"], "--data", ws["data"], "--out", out, *COMMON, *extra]


def _assert_same_run(a: Path, b: Path) -> None:
    state_a = json.loads((a / "trainer_state.json").read_text())
    state_b = json.loads((b / "trainer_state.json").read_text())
    assert state_a["global_step"] == state_b["global_step"]
    assert state_b["losses"] == pytest.approx(state_a["losses"], rel=1e-5)
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_save_every_writes_checkpoints_outside_the_adapter(ws, straight, capsys, tmp_path, monkeypatch):
    seen = []
    real = cmd_finetune.save_checkpoint

    def spy(root, peft_model, optimizer, state):
        step_dir = real(root, peft_model, optimizer, state)
        names = sorted(p.name for p in Path(root).iterdir())
        seen.append((state["global_step"], names, sorted(p.name for p in step_dir.iterdir())))
        return step_dir

    monkeypatch.setattr(cmd_finetune, "save_checkpoint", spy)
    out = tmp_path / "adapter"
    code, _, err = run(_finetune(ws, out, "--steps", "8", "--save-every", "3"), capsys)
    assert code == 0, err
    assert [s for s, _, _ in seen] == [3, 6]  # not 8: the adapter itself is saved then
    for step, names, files in seen:
        assert names == ["latest", f"step-{step:08d}"]  # the older step folder is gone
        assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(files)
    assert not (tmp_path / "adapter.checkpoint").exists()  # a finished run removes its checkpoints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    _assert_same_run(straight, out)


def test_crash_then_resume_from_the_last_checkpoint(ws, straight, capsys, tmp_path, monkeypatch):
    """A run killed after step 5 (here: an exception) resumes from its step-4 checkpoint, exactly."""
    from aqlm_lora.app import train

    real, calls = train.take_windows, []

    def dies_in_step_6(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt  # as the default SIGINT handler would, outside our handler
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "take_windows", dies_in_step_6)
    out, ckpt = tmp_path / "adapter", tmp_path / "ckpts"
    code, _, err = run(_finetune(ws, out, "--steps", "8", "--save-every", "2", "--checkpoint-dir", ckpt), capsys)
    assert code == 130 and "interrupted" in err
    assert not out.exists()
    assert (ckpt / "latest").read_text().strip() == "step-00000004"
    state = json.loads((ckpt / "step-00000004" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["target_step"] == 8 and len(state["losses"]) == 4
    monkeypatch.setattr(train, "take_windows", real)
    # --resume finds the checkpoint in --checkpoint-dir; with no --steps it runs the 4 steps left.
    code, out_text, err = run(_finetune(ws, out, "--checkpoint-dir", ckpt, "--resume"), capsys)
    assert code == 0, err
    assert "steps 5..8" in out_text
    assert not ckpt.exists()
    _assert_same_run(straight, out)


SLOW_CHILD = """
import sys, time
import aqlm_lora.app.train as train
real = train.take_windows
def slow(*args, **kwargs):  # one step takes >= 0.4 s, so Ctrl-C lands mid-run
    time.sleep(0.2)
    return real(*args, **kwargs)
train.take_windows = slow
from aqlm_lora.app import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(ws, straight, capsys, tmp_path):
    out = tmp_path / "adapter"
    script = tmp_path / "slow_child.py"
    script.write_text(SLOW_CHILD)
    argv = [str(a) for a in _finetune(ws, out, "--steps", "8", "--log-every", "1")]
    child = subprocess.Popen(
        [sys.executable, str(script), *argv], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    lines = []
    try:
        for line in child.stderr:  # progress lines reach a pipe, not only a terminal
            lines.append(line)
            if line.startswith("finetune step 1/8"):
                child.send_signal(signal.SIGINT)
                break
        _, rest = child.communicate(timeout=120)
    finally:
        child.kill()
    lines += rest.splitlines(keepends=True)
    err = "".join(lines)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert "stopping after this step" in err and "checkpoint saved in" in err
    ckpt = tmp_path / "adapter.checkpoint"
    step = int((ckpt / "latest").read_text().strip().removeprefix("step-"))
    assert 1 <= step < 8
    state = json.loads((ckpt / f"step-{step:08d}" / "trainer_state.json").read_text())
    assert state["interrupted"] is True and state["global_step"] == step and state["target_step"] == 8
    assert not out.exists()  # the adapter folder only gets a finished run

    # The same command line with --resume finishes the run (--steps 8 does not mean 8 more here).
    code, stdout, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert f"note: finishing the interrupted run: steps {step + 1}..8" in err
    assert f"steps {step + 1}..8" in stdout
    _assert_same_run(straight, out)
    assert not ckpt.exists()


def test_unfinished_checkpoint_is_not_overwritten_by_a_fresh_run(ws, capsys, tmp_path, monkeypatch):
    from aqlm_lora.app import train

    real, calls = train.take_windows, []

    def dies_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "take_windows", dies_in_step_3)
    out = tmp_path / "adapter"
    assert run(_finetune(ws, out, "--steps", "4", "--save-every", "1"), capsys)[0] == 130
    monkeypatch.setattr(train, "take_windows", real)
    ckpt = tmp_path / "adapter.checkpoint"
    code, _, err = run(_finetune(ws, out, "--steps", "2"), capsys)
    assert_user_error(code, err, "unfinished run (step-00000002)", "--resume", "--overwrite")
    assert (ckpt / "step-00000002").is_dir()
    code, _, err = run(_finetune(ws, out, "--steps", "2", "--overwrite"), capsys)
    assert code == 0, err
    assert not ckpt.exists() and json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_checkpoint_dir_errors(ws, capsys, tmp_path):
    out = tmp_path / "adapter"
    code, _, err = run(_finetune(ws, out, "--checkpoint-dir", out), capsys)
    assert_user_error(code, err, "--checkpoint-dir must differ from --out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run(_finetune(ws, out, "--checkpoint-dir", foreign, "--overwrite"), capsys)
    assert_user_error(code, err, f"checkpoint directory {foreign} holds other files")
    assert (foreign / "notes.txt").read_text() == "mine"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "latest").write_text("step-00000009\n")
    code, _, err = run(_finetune(ws, out, "--resume", broken), capsys)
    assert_user_error(code, err, "names 'step-00000009', which is not a step folder")


def test_resume_with_other_settings_says_so(ws, straight, capsys, tmp_path):
    code, _, err = run(_finetune(ws, tmp_path / "a", "--resume", straight, "--steps", "1", "--lr", "1e-3"), capsys)
    assert code == 0, err
    assert "note: resuming with --lr 0.001 (was 0.003): not an exact continuation" in err


# ---------------------------------------------------------------------------------------------
# Progress lines


def test_finetune_progress_lines(ws, capsys, tmp_path):
    code, _, err = run(_finetune(ws, tmp_path / "a", "--steps", "4", "--log-every", "2"), capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("finetune step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"]
    for line in lines:
        fields = line.split()
        assert fields[3] == "loss" and float(fields[4]) > 0
        assert fields[6] == "tokens/s" and fields[7] == "ETA" and fields[8].count(":") == 2
    code, _, err = run(_finetune(ws, tmp_path / "b", "--steps", "2", "--log-every", "0"), capsys)
    assert code == 0 and "finetune step" not in err


def test_eval_progress_lines(ws, capsys):
    argv = ["eval", ws["aqlm"], "--data", ws["data"], "--seq", "16", "--batch", "4", "--max-windows", "12"]
    code, out, err = run([*argv, "--log-every", "1"], capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("eval batch")]
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("ppl" in line and "tokens/s" in line and "ETA" in line for line in lines)
    final = float(lines[-1].split()[4])
    assert final == pytest.approx(float(out.split()[1]), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# --seq, --version, help, closed pipe


def test_seq_longer_than_the_model_is_refused(ws, capsys, tmp_path):
    code, _, err = run(_finetune(ws, tmp_path / "a", "--seq", "64"), capsys)
    assert_user_error(code, err, "--seq 64 is longer than the 32 positions", "max_position_embeddings")
    code, _, err = run(["eval", ws["aqlm"], "--data", ws["data"], "--seq", "33"], capsys)
    assert_user_error(code, err, "--seq 33", "max_position_embeddings")
    code, out, err = run(["eval", ws["aqlm"], "--data", ws["data"], "--max-windows", "2", "--log-every", "0"], capsys)
    assert code == 0 and "windows of 32 tokens" in out  # the default fits the model


@pytest.mark.parametrize("argv", [["finetune", "M", "--data", "D", "--out", "O"], ["eval", "M", "--data", "D"]])
def test_seq_of_one_is_refused(argv, capsys):
    """A 1-token window has no next token (eval divided by zero, finetune called the NaN loss divergence)."""
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--seq", "1"])
    assert info.value.code == 2
    assert_user_error(2, capsys.readouterr().err, "argument --seq:")


def test_version(capsys):
    from aqlm_lora import __version__

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"aqlm-lora {__version__}"


def test_every_argument_has_help():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    missing = []
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.help or not action.help.strip():
                missing.append(f"{name} {action.option_strings or action.dest}")
    assert not missing


def test_closed_pipe_is_quiet(ws):
    """``aqlm-lora eval ... | head -1`` where head is gone before the line: no traceback, exit 141."""
    proc = subprocess.Popen(
        cli_command("eval", ws["aqlm"], "--data", ws["data"], "--max-windows", "2", "--log-every", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    proc.stdout.close()  # the reader is gone before anything is written
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 141, err
    assert err.decode() == ""
