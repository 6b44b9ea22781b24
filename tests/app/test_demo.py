"""``aqlm-lora demo``, shrunk: every phase runs, the outputs work with the other commands."""

from __future__ import annotations

import json

import pytest

from aqlm_lora.app import cli
from aqlm_lora.app.demo import run_demo
from aqlm_lora.app.text import TOKENIZER_FILE
from tests.support.cli import TINY_DEMO


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_demo(str(out), progress=False, config=TINY_DEMO) == 0
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
