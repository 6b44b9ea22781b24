"""Mistakes every command reports as one line naming the flag or file, with nothing written: usage and
number flags, non-empty outputs, missing paths, and broken configs, weights, adapters, optimizer and trainer state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aqlm_lora.app import cli
from aqlm_lora.app.text import TOKENIZER_FILE
from tests.support.cli import (
    TRAIN,
    assert_user_error,
    bpe_model_dir,
    byte_model_dir,
    copy_dir,
    edit_json,
    run,
    tree,
    truncate,
    words_text,
)


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
    code, _, err = run(argv, capsys)
    assert_user_error(code, err, "not empty", "--overwrite")
    assert tree(out) == {"precious.txt": b"keep me"}


def test_error_missing_data_file(workspace, capsys, tmp_path):
    code, _, err = run(
        ["finetune", workspace["aqlm"], "--data", tmp_path / "none.txt", "--out", tmp_path / "a"], capsys
    )
    assert_user_error(code, err, "none.txt", "does not exist")
    code, _, err = run(["eval", workspace["aqlm"], "--data", tmp_path / "none.txt"], capsys)
    assert_user_error(code, err, "does not exist")


def test_error_model_without_tokenizer(capsys, tmp_path, workspace):
    model_dir = byte_model_dir(tmp_path / "m", tokenizer=False)
    code, _, err = run(["eval", model_dir, "--data", workspace["data"]], capsys)
    assert_user_error(code, err, TOKENIZER_FILE)


def test_error_adapter_dir_is_not_an_adapter(workspace, capsys, tmp_path):
    code, _, err = run(
        ["eval", workspace["aqlm"], "--adapter", workspace["dense"], "--data", workspace["data"]], capsys
    )
    assert_user_error(code, err, "adapter_config.json")
    code, _, err = run(["eval", workspace["aqlm"], "--adapter", tmp_path / "x", "--data", workspace["data"]], capsys)
    assert_user_error(code, err, "does not exist")


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
        assert_user_error(2, err)


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
    assert_user_error(2, capsys.readouterr().err, f"argument {argv[-2]}:")


@pytest.fixture(scope="module")
def adapter(workspace):
    out = workspace["root"] / "adapter"
    assert (
        cli.main(["finetune", str(workspace["aqlm"]), "--data", str(workspace["data"]), "--out", str(out), *TRAIN]) == 0
    )
    return out


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
    model_dir = copy_dir(workspace["dense"], tmp_path / "model")
    edit_json(model_dir / "config.json", **{field: value})
    for argv in _quantize_eval_finetune(model_dir, workspace, tmp_path):
        code, _, err = run(argv, capsys)
        assert_user_error(code, err, str(model_dir / "config.json"), field)
        assert not (tmp_path / "out").exists()


def test_error_model_config_not_json(workspace, capsys, tmp_path):
    model_dir = copy_dir(workspace["dense"], tmp_path / "model")
    (model_dir / "config.json").write_text('{"model_type": "llama", ')
    code, _, err = run(["quantize", model_dir, tmp_path / "out", "--no-progress"], capsys)
    assert_user_error(code, err, str(model_dir / "config.json"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_error_truncated_model_weights(workspace, capsys, tmp_path, keep):
    for name in ("dense", "aqlm"):
        model_dir = copy_dir(workspace[name], tmp_path / name)
        truncate(model_dir / "model.safetensors", keep)
        for argv in _quantize_eval_finetune(model_dir, workspace, tmp_path):
            code, _, err = run(argv, capsys)
            if name == "aqlm" and argv[0] == "quantize":
                continue  # refused as already quantized or as unreadable: either way one line
            assert_user_error(code, err, str(model_dir / "model.safetensors"))
            assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.9, 0.0001])
def test_error_truncated_adapter(workspace, adapter, capsys, tmp_path, keep):
    broken = copy_dir(adapter, tmp_path / "adapter")
    truncate(broken / "adapter_model.safetensors", keep)
    code, _, err = run(["eval", workspace["aqlm"], "--adapter", broken, "--data", workspace["data"]], capsys)
    assert_user_error(code, err, str(broken / "adapter_model.safetensors"))
    before = tree(broken)
    code, _, err = run(
        ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", broken, "--resume", *TRAIN], capsys
    )
    assert_user_error(code, err, str(broken / "adapter_model.safetensors"))
    assert tree(broken) == before


@pytest.mark.parametrize("field, value", [("r", "16"), ("lora_alpha", "x"), ("lora_dropout", 2.0), ("r", 0)])
def test_error_wrong_typed_adapter_config(workspace, adapter, capsys, tmp_path, field, value):
    broken = copy_dir(adapter, tmp_path / "adapter")
    edit_json(broken / "adapter_config.json", **{field: value})
    code, _, err = run(["eval", workspace["aqlm"], "--adapter", broken, "--data", workspace["data"]], capsys)
    assert_user_error(code, err, str(broken / "adapter_config.json"), field)


def _corrupt_optimizer(path: Path, how: str) -> None:
    if how == "truncated":
        truncate(path)
    elif how == "garbage":
        path.write_bytes(b"not a torch file\n")
    elif how == "list":
        torch.save([1, 2], path)
    else:  # a dict of the wrong shape
        torch.save({"state": {}, "param_groups": [{"params": "x"}]}, path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "list", "wrong_groups"])
def test_error_corrupt_optimizer_on_resume(workspace, adapter, capsys, tmp_path, how):
    broken = copy_dir(adapter, tmp_path / "adapter")
    _corrupt_optimizer(broken / "optimizer.pt", how)
    before = tree(broken)
    for out in (broken, tmp_path / "elsewhere"):
        code, _, err = run(
            ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", out, "--resume", broken, *TRAIN],
            capsys,
        )
        assert_user_error(code, err, str(broken / "optimizer.pt"))
    assert tree(broken) == before and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    "changes", [{"losses": 5}, {"losses": ["a"]}, {"global_step": "2"}, {"global_step": 2.5}, {"global_step": -1}]
)
def test_error_wrong_typed_trainer_state(workspace, adapter, capsys, tmp_path, changes):
    broken = copy_dir(adapter, tmp_path / "adapter")
    edit_json(broken / "trainer_state.json", **changes)
    before = tree(broken)
    code, _, err = run(
        ["finetune", workspace["aqlm"], "--data", workspace["data"], "--out", broken, "--resume", *TRAIN], capsys
    )
    assert_user_error(code, err, str(broken / "trainer_state.json"), next(iter(changes)))
    assert tree(broken) == before


@pytest.mark.parametrize("content", ["[1, 2]", '{"type": 3', b"\xff\xfe"])
def test_error_bad_tokenizer_file(workspace, capsys, tmp_path, content):
    model_dir = copy_dir(workspace["dense"], tmp_path / "model")
    path = model_dir / TOKENIZER_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run(["eval", model_dir, "--data", workspace["data"]], capsys)
    assert_user_error(code, err, str(path))


@pytest.fixture(scope="module")
def other_vocab(workspace):
    """The workspace's layer sizes with a BPE vocabulary (not the byte tokenizer's 259 tokens), quantized to AQLM."""
    root = workspace["root"]
    bpe_model_dir(root / "bpe_dense", words_text())
    argv = ["quantize", root / "bpe_dense", root / "bpe_aqlm", "--rounds", "0", "--kmeans-iters", "1", "--no-progress"]
    assert cli.main([str(a) for a in argv]) == 0
    return root / "bpe_aqlm"


@pytest.mark.parametrize("kind", ["modules_to_save", "embedding"])
def test_error_adapter_of_another_vocabulary(workspace, other_vocab, capsys, tmp_path, kind):
    """Tensors sized by the vocabulary (a saved lm_head copy, LoRA on the embeddings) are checked too, not
    left to PEFT's size-mismatch traceback."""
    from peft import LoraConfig, get_peft_model

    import aqlm_lora
    from aqlm_lora.app.models import load_causal_lm

    extra = {"modules_to_save": ["lm_head"]} if kind == "modules_to_save" else {}
    targets = ["q_proj"] if kind == "modules_to_save" else ["q_proj", "embed_tokens"]
    config = aqlm_lora.register(LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    adapter = tmp_path / "adapter"
    get_peft_model(load_causal_lm(workspace["aqlm"]), config).save_pretrained(adapter, save_embedding_layers=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def", "adapter": "a"}\n')
    for argv in (
        ["eval", other_vocab, "--adapter", adapter, "--data", workspace["data"], "--seq", "16", "--no-progress"],
        ["merge", other_vocab, "--adapter", adapter, "--out", tmp_path / "merged"],
        ["generate", other_vocab, "--adapter", f"a={adapter}", "--prompts", prompts, "--no-progress"],
    ):
        code, _, err = run(argv, capsys)
        assert_user_error(code, err, "does not fit this model", "lm_head" if kind == "modules_to_save" else "embed")
    assert not (tmp_path / "merged").exists()
