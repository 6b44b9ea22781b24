"""The ``merge`` command (aqlm_lora/app/cmd_merge.py), through its own parser: --dense, --requantize,
and what it refuses without writing anything."""

import argparse
import warnings
from pathlib import Path

import aqlm
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import aqlm_lora
from aqlm_lora.app import cmd_merge
from aqlm_lora.app.errors import UserError
from tests.support.layers import TINY_LLAMA, edit_adapters
from tests.support.tolerances import assert_close_fp32

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aqlm-lora")
    sub = parser.add_subparsers(dest="command")
    cmd_merge.add_parser(sub)
    return parser.parse_args(["merge", *map(str, argv)])


def merge(*argv) -> int:
    return cmd_merge.run(parse(*argv))


def _tiny(hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "hidden_size": hidden}))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _save_adapter(model_dir: Path, out: Path, **config) -> torch.Tensor:
    """Train-free adapter with non-zero B (and m) on the AQLM model; returns the unmerged logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    aqlm_lora.use_fused_kernels(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **config)
    peft_model = get_peft_model(model, aqlm_lora.register(config))
    edit_adapters(peft_model, lambda p: p.normal_(0, 0.05), lambda p: p.mul_(1.05))
    peft_model.save_pretrained(str(out))
    return _logits(peft_model.eval())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_cli")
    model = _tiny()
    model.save_pretrained(str(root / "dense"))
    aqlm_lora.quantize_model(model, "2x8", progress=False, rounds=1, kmeans_iters=2)
    model.save_pretrained(str(root / "aqlm"))
    expected = {
        "lora": _save_adapter(root / "aqlm", root / "lora"),
        "dora": _save_adapter(root / "aqlm", root / "dora", use_dora=True),
    }
    _save_adapter(root / "aqlm", root / "biased", lora_bias=True)
    other = _tiny(hidden=32)
    aqlm_lora.quantize_model(other, "2x8", progress=False, rounds=0, kmeans_iters=1)
    other.save_pretrained(str(root / "other_aqlm"))
    _save_adapter(root / "other_aqlm", root / "other_adapter")
    return root, expected


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    aqlm_lora.use_fused_kernels(model)
    return model.eval()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_dense_merge_writes_a_plain_checkpoint_with_the_adapter_outputs(files, kind, capsys):
    root, expected = files
    out = root / f"out_dense_{kind}"
    assert merge(root / "aqlm", "--adapter", root / kind, "--out", out) == 0
    printed = capsys.readouterr().out
    assert f"merged 6 adapted layers ({6 if kind == 'dora' else 0} DoRA); every layer is now dense" in printed
    model = _load(out)
    assert not any(isinstance(m, aqlm.QuantizedLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("k_proj", "q_proj")))
    assert getattr(model.config, "quantization_config", None) is None
    assert_close_fp32(_logits(model), expected[kind], what=f"dense merged {kind}")


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_requantize_writes_an_aqlm_checkpoint_close_to_the_adapter(files, kind, capsys):
    root, expected = files
    out = root / f"out_requantized_{kind}"
    assert merge(root / "aqlm", "--adapter", root / kind, "--out", out, "--requantize", "--rounds", 1) == 0
    assert "relative error to the merged weights" in capsys.readouterr().out
    model = _load(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, aqlm.QuantizedLinear)
    base = _logits(_load(root / "aqlm"))
    ours = _logits(model)
    # closer to the adapted model than the AQLM model it started from
    assert (ours - expected[kind]).norm() < (base - expected[kind]).norm()
    requantized = model.model.layers[0].self_attn.q_proj.codes
    original = _load(root / "aqlm").model.layers[0].self_attn.q_proj.codes
    assert requantized.shape == original.shape and requantized.dtype == original.dtype


def _nothing_written(root: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(f".{out.name}.")], "a staging folder was left"


@pytest.mark.parametrize(
    "adapter, model, match",
    [
        ("other_adapter", "aqlm", "does not fit this model"),
        # the merge command's own refusal (test_lora_bias_without_a_base_bias_is_refused)
        ("biased", "aqlm", "does not fit this model|has a LoRA bias .* no checkpoint of it can hold"),
        ("missing", "aqlm", "adapter directory .*missing does not exist"),
        ("lora", "dense", "has no AQLM layers"),
    ],
)
@pytest.mark.parametrize("mode", ["--dense", "--requantize"])
def test_refusals_write_nothing(files, adapter, model, match, mode):
    root, _ = files
    out = root / f"refused_{adapter}_{model}_{mode.strip('-')}"
    with pytest.raises(UserError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merge(root / model, "--adapter", root / adapter, "--out", out, mode)
    _nothing_written(root, out)


def test_lora_bias_without_a_base_bias_is_refused(files):
    from aqlm_lora import AqlmLoraLinear

    root, _ = files
    peft_model = get_peft_model(_load(root / "aqlm"), aqlm_lora.register(LoraConfig(r=2, target_modules=["q_proj"])))
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, AqlmLoraLinear)}
    cmd_merge._refuse_unholdable_bias(layers, root / "adapter")  # no LoRA bias: fine
    name = "model.layers.0.self_attn.q_proj"
    layers[name].lora_bias["default"] = True
    with pytest.raises(UserError, match=f"has a LoRA bias .* on {name}, which has no bias"):
        cmd_merge._refuse_unholdable_bias(layers, root / "adapter")


def test_existing_output_needs_overwrite(files):
    root, expected = files
    out = root / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty .*--overwrite"):
        merge(root / "aqlm", "--adapter", root / "lora", "--out", out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="must differ"):
        merge(root / "aqlm", "--adapter", root / "lora", "--out", root / "aqlm", "--overwrite")
    assert merge(root / "aqlm", "--adapter", root / "lora", "--out", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists()
    assert_close_fp32(_logits(_load(out)), expected["lora"], what="overwritten")


def test_parser_rejects_both_modes_and_bad_numbers(capsys):
    for argv in (["--dense", "--requantize"], ["--requantize", "--rounds", "-1"], ["--beam", "0"]):
        with pytest.raises(SystemExit):
            parse("m", "--adapter", "a", "--out", "o", *argv)
    assert parse("m", "--adapter", "a", "--out", "o").mode == "dense"
    assert parse("m", "--adapter", "a", "--out", "o", "--requantize").mode == "requantize"


@pytest.fixture(scope="module")
def byte_files(tmp_path_factory):
    """A tiny AQLM model with the demo's byte tokenizer, an adapter on it and a calibration text."""
    from aqlm_lora.app.text import ByteTokenizer

    root = tmp_path_factory.mktemp("merge_cli_bytes")
    tokenizer = ByteTokenizer()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "vocab_size": tokenizer.vocab_size}))
    aqlm_lora.quantize_model(model, "2x8", progress=False, rounds=0, kmeans_iters=2)
    model.save_pretrained(str(root / "aqlm"))
    tokenizer.save(root / "aqlm")
    _save_adapter(root / "aqlm", root / "lora")
    (root / "calibration.txt").write_text("def add(a, b):\n    return a + b\n" * 40)
    return root


def test_requantize_with_calibration_tunes_toward_the_adapted_model(byte_files, capsys):
    root = byte_files
    text = "class Point:\n    x: int\n    y: int\n" * 4
    ids = torch.tensor([list(text.encode())[:40]])

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    from peft import PeftModel

    adapted = PeftModel.from_pretrained(
        _load(root / "aqlm"),
        str(root / "lora"),
        config=aqlm_lora.register(LoraConfig.from_pretrained(str(root / "lora"))),
    )
    target = logits(adapted.eval())
    args = ["--requantize", "--rounds", 1, "--seq", 32, "--windows", 8]
    assert merge(root / "aqlm", "--adapter", root / "lora", "--out", root / "plain", *args) == 0
    capsys.readouterr()
    tuned_args = [*args, "--calibration", root / "calibration.txt", "--tune-steps", 20, "--tune-lr", 1e-3]
    assert merge(root / "aqlm", "--adapter", root / "lora", "--out", root / "tuned", *tuned_args) == 0
    printed = capsys.readouterr().out
    assert "codebooks and scales tuned on" in printed and "(20 steps): KL to the adapted model" in printed
    plain, tuned = logits(_load(root / "plain")), logits(_load(root / "tuned"))
    assert (tuned - target).norm() < (plain - target).norm()


def test_calibration_needs_requantize_and_a_file(byte_files):
    root = byte_files
    with pytest.raises(UserError, match="--calibration tunes a re-quantized model: it needs --requantize"):
        merge(
            root / "aqlm", "--adapter", root / "lora", "--out", root / "x1", "--calibration", root / "calibration.txt"
        )
    with pytest.raises(UserError, match="calibration file .*nope.txt"):
        merge(
            root / "aqlm",
            "--adapter",
            root / "lora",
            "--out",
            root / "x2",
            "--requantize",
            "--calibration",
            root / "nope.txt",
        )
    for out in ("x1", "x2"):
        _nothing_written(root, root / out)
