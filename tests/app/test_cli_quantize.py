"""``aqlm-lora quantize``: the AQLM checkpoint it writes, its errors, and --no-progress."""

from __future__ import annotations

import io
import json
import sys

import aqlm
import pytest
import torch

from aqlm_lora.app import cli
from aqlm_lora.app.demo import build_model
from aqlm_lora.app.text import TOKENIZER_FILE, ByteTokenizer
from tests.support.cli import TINY, assert_user_error, run


def test_quantize_writes_an_aqlm_checkpoint(workspace):
    from transformers import AutoModelForCausalLM

    quantized = workspace["aqlm"]
    assert (quantized / TOKENIZER_FILE).is_file()
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "aqlm" and config["num_codebooks"] == 2 and config["nbits_per_codebook"] == 8
    model = AutoModelForCausalLM.from_pretrained(quantized)
    assert sum(isinstance(m, aqlm.QuantizedLinear) for m in model.modules()) == 2 * 7
    assert not list(quantized.parent.glob(".aqlm.tmp-*"))  # the staging directory is gone


def test_error_missing_model_dir(capsys, tmp_path):
    code, _, err = run(["quantize", tmp_path / "nope", tmp_path / "out"], capsys)
    assert_user_error(code, err, "does not exist")
    assert not (tmp_path / "out").exists()


def test_error_not_a_model_dir(capsys, tmp_path):
    code, _, err = run(["quantize", tmp_path, tmp_path / "out"], capsys)
    assert_user_error(code, err, "config.json")


def test_error_bad_scheme(workspace, capsys, tmp_path):
    code, _, err = run(["quantize", workspace["dense"], tmp_path / "out", "--scheme", "2x8q"], capsys)
    assert_user_error(code, err, "invalid scheme", "2x8q")


def test_error_scheme_does_not_fit(workspace, capsys, tmp_path):
    code, _, err = run(["quantize", workspace["dense"], tmp_path / "out", "--scheme", "2x8g64"], capsys)
    assert_user_error(code, err, "does not split")
    assert not (tmp_path / "out").exists()


def test_error_no_linear_layers(workspace, capsys, tmp_path):
    skip = "lm_head,q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    code, _, err = run(["quantize", workspace["dense"], tmp_path / "out", "--skip", skip], capsys)
    assert_user_error(code, err, "no nn.Linear")


def test_error_already_quantized(workspace, capsys, tmp_path):
    code, _, err = run(["quantize", workspace["aqlm"], tmp_path / "out"], capsys)
    assert_user_error(code, err, "already quantized")


def test_overwrite_replaces_output_dir(workspace, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run(["quantize", workspace["dense"], out, "--overwrite", "--no-progress", "--rounds", "0"], capsys)
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


def test_error_output_is_a_file(workspace, capsys, tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    code, _, err = run(["quantize", workspace["dense"], out], capsys)
    assert_user_error(code, err, "not a directory")
    assert out.read_text() == "x"


def test_error_quantize_nan_weight(capsys, tmp_path):
    """A NaN weight used to quantize to NaN codebooks with exit code 0 (perplexity nan)."""
    model = build_model(TINY, ByteTokenizer(), seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[2, 3] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    code, _, err = run(["quantize", tmp_path / "nan", tmp_path / "out", "--no-progress"], capsys)
    assert_user_error(code, err, "model.layers.1.self_attn.k_proj", "NaN")
    assert not (tmp_path / "out").exists()


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
