"""``aqlm-lora demo --size medium``, shrunk to a tiny model through the same code path: its BPE
tokenizer, both schemes with LoRA, the tables, and every step-time contender measured or failing."""

from __future__ import annotations

import json

import pytest

from aqlm_lora.app import cli, cmd_demo
from aqlm_lora.app.bpe import train_bpe
from aqlm_lora.app.demo_medium import MediumConfig, SchemeRun, run_medium_demo
from aqlm_lora.app.demo_report import perplexity_table, step_table
from tests.support.cli import TINY_RUN

TINY_MEDIUM = MediumConfig(
    vocab_size=300,
    hidden=32,
    intermediate=64,
    **TINY_RUN,
    schemes=(SchemeRun("2x8", rounds=1, kmeans_iters=2), SchemeRun("1x16", rounds=0, kmeans_iters=0)),
    timed_steps=1,
    timing_budget_s=10,
    timing_timeout_s=600,
)
CONTENDERS = [("2x8", "ours"), ("2x8", "stock"), ("1x16", "ours"), ("1x16", "stock"), ("dense", "dense")]


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    out = tmp_path_factory.mktemp("medium") / "demo"
    assert run_medium_demo(str(out), progress=False, config=TINY_MEDIUM) == 0
    return out


def test_medium_outputs(medium):
    for name in ("dense", "aqlm-2x8", "aqlm-1x16"):
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (medium / name / file).is_file(), f"{name}/{file}"
    for name in ("adapter-2x8", "adapter-1x16"):
        for file in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
            assert (medium / name / file).is_file(), f"{name}/{file}"
        config = json.loads((medium / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(medium / name.replace("adapter", "aqlm"))
    results = json.loads((medium / "results.json").read_text())
    assert set(results["perplexity"]) == {"dense", "aqlm_2x8", "aqlm_2x8_lora", "aqlm_1x16", "aqlm_1x16_lora"}
    assert all(1.0 < v < 1000 for v in results["perplexity"].values())
    for scheme in ("2x8", "1x16"):
        assert results["schemes"][scheme]["stored_bits_per_weight"] > 0
        assert results["schemes"][scheme]["kl_to_dense"] >= 0 and results["schemes"][scheme]["kl_to_dense_lora"] >= 0
    assert results["machine"]["load_average_at_start"] and results["machine"]["load_average_at_end"]


def test_medium_tokenizer_round_trip(medium):
    """The saved BPE tokenizer loads with AutoTokenizer, fits the model, and gives the text back."""
    from transformers import AutoConfig, AutoTokenizer

    text = (medium / "data" / "valid.txt").read_text()
    for name in ("dense", "aqlm-2x8"):
        tokenizer = AutoTokenizer.from_pretrained(medium / name)
        assert len(tokenizer) == TINY_MEDIUM.vocab_size == AutoConfig.from_pretrained(medium / name).vocab_size
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) < len(text)  # merges were learned
        assert tokenizer.decode(ids) == text


def test_medium_tables(medium):
    tables = (medium / "results.md").read_text()
    rows = [line for line in tables.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert names[1:6] == [
        "dense fp32",
        "AQLM 2x8",
        "AQLM 2x8 + LoRA r=16 (3 steps, distilled)",
        "AQLM 1x16",
        "AQLM 1x16 + LoRA r=16 (3 steps, distilled)",
    ]
    step_rows = rows[7:]
    assert len(step_rows) == len(CONTENDERS)
    assert [row.split(" | ")[1] for row in step_rows] == [
        "AQLM 2x8",
        "AQLM 2x8",
        "AQLM 1x16",
        "AQLM 1x16",
        "dense fp32",
    ]


def test_medium_every_contender_measured_or_failing(medium):
    timings = json.loads((medium / "results.json").read_text())["step_timing"]
    assert [(t["base"], t["kind"]) for t in timings] == CONTENDERS
    for t in timings:
        if "error" in t:
            assert t["kind"] == "stock", t  # only PEFT's stock layer may fail (aqlm's 2x8 CPU backward)
            assert t["error"]
        else:
            assert t["step_seconds"] > 0
            assert t["steps_peak_rss_above_loaded_bytes"] >= 0 and t["process_peak_rss_bytes"] > 0
    ours = [t for t in timings if t["kind"] == "ours"]
    assert len(ours) == 2 and all("step_seconds" in t for t in ours)
    assert "step_seconds" in timings[-1]  # dense PEFT LoRA


def test_medium_adapter_evaluates_with_the_cli(medium, capsys):
    results = json.loads((medium / "results.json").read_text())
    argv = ["eval", medium / "aqlm-1x16", "--adapter", medium / "adapter-1x16", "--data", medium / "data" / "valid.txt"]
    assert cli.main([str(a) for a in argv] + ["--seq", "32", "--no-progress"]) == 0
    ppl = float(capsys.readouterr().out.split()[1])
    assert ppl == pytest.approx(results["perplexity"]["aqlm_1x16_lora"], rel=1e-4)


@pytest.mark.parametrize("size, expected", [("small", "run_demo"), ("medium", "run_medium_demo")])
def test_demo_size_flag(monkeypatch, size, expected):
    calls = []
    for name in ("run_demo", "run_medium_demo"):
        monkeypatch.setattr(cmd_demo, name, lambda out, _name=name, **kw: calls.append((_name, out, kw)) or 0)
    assert cli.main(["demo", "--size", size, "--no-progress"]) == 0
    assert calls == [(expected, cmd_demo.DEMO_OUT[size], {"overwrite": False, "seed": 0, "progress": False})]
    calls.clear()
    assert cli.main(["demo", "--size", size, "--out", "elsewhere", "--seed", "3"]) == 0
    assert calls == [(expected, "elsewhere", {"overwrite": False, "seed": 3, "progress": True})]


def test_demo_size_must_be_known(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--size", "large"])
    assert info.value.code == 2
    assert "argument --size: invalid choice: 'large'" in capsys.readouterr().err


def test_bpe_round_trip_of_any_text():
    tokenizer = train_bpe("def f(x):\n    return x + 1\n" * 50, vocab_size=270)
    assert len(tokenizer) == 270
    text = "naïve café ✓ 🐍\n\tmixed\r\nlines\x00"  # bytes it never saw, control characters
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe("abc", vocab_size=100)


def test_tables_name_failures_and_gaps():
    cfg = TINY_MEDIUM
    per_scheme = {
        "2x8": {"perplexity": 12.0, "perplexity_lora": 11.0, "stored_bits_per_weight": 2.5},
        "1x16": {"perplexity": 10.01, "perplexity_lora": 10.0, "stored_bits_per_weight": 66.0},
    }
    per_scheme["2x8"].update(kl_to_dense=0.2, kl_to_dense_lora=0.05)
    per_scheme["1x16"].update(kl_to_dense=0.01, kl_to_dense_lora=0.01)
    per_scheme["2x8"]["recovered_fraction_of_log_ppl_gap"] = 0.48
    per_scheme["1x16"]["recovered_fraction_of_log_ppl_gap"] = 1.0
    table = perplexity_table("test", 10.0, per_scheme, cfg)
    assert "| AQLM 2x8 | 2.50 | 12.000 | 0.2000 |" in table
    assert "| 11.000 (recovers 48% of the log-perplexity lost) | 0.0500 (75% less) |" in table
    assert "| 10.000 (AQLM 1x16 lost +0.10% perplexity: nothing to recover) | 0.0100 (0% less) |" in table
    timings = [
        {"base": "2x8", "kind": "ours", "layer": "AqlmLoraLinear", "step_seconds": 0.5},
        {"base": "2x8", "kind": "stock", "layer": "AqlmLoraLinear", "error": "RuntimeError: boom"},
        {"base": "1x16", "kind": "stock", "layer": "AqlmLoraLinear", "step_seconds": 1.0},
        {"base": "dense", "kind": "dense", "layer": "Linear", "step_seconds": 0.4},
    ]
    table = step_table(timings, cfg)
    assert "| fails: RuntimeError: boom | - |" in table
    assert "1.000 s (128 tokens/s) |" in table  # no ours on 1x16 here: no ratio
    assert "| PEFT LoRA, peft.tuners.lora.Linear over nn.Linear | dense fp32 | 0.400 s (320 tokens/s) |" in table
