"""``aqlm-lora merge``: reachable from the main command line; adapters of layers the checkpoint keeps
dense (``quantize --skip``) are kept; a LoRA bias the checkpoint cannot hold is refused in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from aqlm_lora.app import cli
from tests.support.cli import assert_user_error, make_workspace, run

DENSE = "model.layers.0.mlp.down_proj"  # left dense by quantize --skip, adapted as finetune does


@pytest.fixture(scope="module")
def skip_ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("skip"), "--skip", "lm_head,down_proj", "--rounds", "1")


def _adapter(model_dir, out, **config) -> dict[str, torch.Tensor]:
    """A saved adapter with non-zero B on q_proj (AQLM) and down_proj; returns its tensors."""
    from peft import LoraConfig, get_peft_model

    import aqlm_lora
    from aqlm_lora.app.models import load_causal_lm
    from tests.support.layers import edit_adapters

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], **config)
    peft_model = get_peft_model(load_causal_lm(model_dir), aqlm_lora.register(config))
    edit_adapters(peft_model, lambda p: p.normal_(0, 0.5))
    peft_model.save_pretrained(out)
    return load_file(out / "adapter_model.safetensors")


def test_requantize_keeps_the_adapter_of_dense_layers(skip_ws, capsys, tmp_path):
    lora = _adapter(skip_ws["aqlm"], tmp_path / "adapter")
    out = tmp_path / "merged"
    code, _, err = run(
        ["merge", skip_ws["aqlm"], "--adapter", tmp_path / "adapter", "--out", out, "--requantize"], capsys
    )
    assert code == 0, err
    before, after = load_file(skip_ws["aqlm"] / "model.safetensors"), load_file(out / "model.safetensors")
    A, B = (lora[f"base_model.model.{DENSE}.lora_{k}.weight"] for k in "AB")
    expect = before[f"{DENSE}.weight"] + (8 / 4) * B @ A
    torch.testing.assert_close(after[f"{DENSE}.weight"], expect, rtol=1e-5, atol=1e-5)
    assert not torch.equal(after[f"{DENSE}.weight"], before[f"{DENSE}.weight"])  # the delta is not negligible
    assert "model.layers.0.self_attn.q_proj.codes" in after  # the AQLM layers stay AQLM


def test_lora_bias_adapter_loads_but_merge_refuses_it(workspace, capsys, tmp_path, recwarn):
    """The adapter check takes lora_B.bias for what it is (eval runs); merge then refuses it in one line."""
    _adapter(workspace["aqlm"], tmp_path / "biased", lora_bias=True)
    code, _, err = run(
        [
            "eval",
            workspace["aqlm"],
            "--adapter",
            tmp_path / "biased",
            "--data",
            workspace["data"],
            "--seq",
            "16",
            "--max-windows",
            "2",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    recwarn.clear()
    for mode in ("--dense", "--requantize"):
        code, _, err = run(
            ["merge", workspace["aqlm"], "--adapter", tmp_path / "biased", "--out", tmp_path / "m", mode], capsys
        )
        assert_user_error(code, err, "has a LoRA bias", "model.layers.0.self_attn.q_proj")
    assert not [w for w in recwarn if "lora_bias" in str(w.message)]  # PEFT's own lines (stderr outside pytest)
    assert not (tmp_path / "m").exists()


def test_merge_is_a_command(capsys, tmp_path):
    code = cli.main(["merge", str(tmp_path / "missing"), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("aqlm-lora: error:") and "missing" in err
    assert not (tmp_path / "o").exists()  # nothing written for a refused call


def test_merge_and_quantize_is_exported():
    import aqlm_lora
    from aqlm_lora.lora.requantize import merge_and_quantize

    assert aqlm_lora.merge_and_quantize is merge_and_quantize
    assert "merge_and_quantize" in dir(aqlm_lora)
