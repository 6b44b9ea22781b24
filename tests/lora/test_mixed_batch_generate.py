"""``model.generate(..., adapter_names=[...])`` on a PEFT model of our layers: a tiny AQLM Llama with
three adapters (plain r=4, rsLoRA r=8 with lora_bias, DoRA r=4) and base rows. Greedy: each row's
tokens equal generating that row alone with its adapter active. Sampling: each row's tokens equal
those of the same batch generated with that row's adapter active for every row, under the same
seed (the same random draws: sampling one row alone would consume the generator differently)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import aqlm_lora
from tests.support.layers import SCHEMES, TINY_LLAMA, edit_adapters, tiny_aqlm_llama

NAMES = ["a", "__base__", "b", "c", "a", "__base__", "c"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model():
    peft_model = get_peft_model(
        tiny_aqlm_llama(SCHEMES[1]),
        aqlm_lora.register(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
        adapter_name="a",
    )
    peft_model.add_adapter(
        "b",
        aqlm_lora.register(
            LoraConfig(
                r=8, lora_alpha=8, use_rslora=True, lora_bias=True, target_modules="all-linear", init_lora_weights=False
            )
        ),
    )
    peft_model.add_adapter(
        "c",
        aqlm_lora.register(
            LoraConfig(
                r=4,
                lora_alpha=4,
                use_dora=True,
                target_modules=["q_proj", "k_proj", "down_proj"],
                init_lora_weights=False,
            )
        ),
    )
    torch.manual_seed(1)
    edit_adapters(peft_model, lambda p: p.normal_(0, 0.2), lambda p: p.mul_(1.2))
    peft_model.eval()
    return peft_model


def _prompts():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, TINY_LLAMA["vocab_size"], (len(NAMES), 6), generator=g)


def _generate(model, ids, name=None, **kwargs):
    """generate() with adapter ``name`` active for all rows (``"__base__"``: adapters disabled)."""
    args = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
        **kwargs,
    )
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return model.generate(**args)
        if name is not None:
            model.set_adapter(name)
        return model.generate(**args)


def test_adapters_differ(model):
    ids = _prompts()[:1]
    outs = {name: _generate(model, ids, name, do_sample=False) for name in ("a", "b", "c", "__base__")}
    assert len({tuple(t[0].tolist()) for t in outs.values()}) == 4, "each adapter changes the greedy tokens"


def test_greedy_rows_equal_each_row_alone(model):
    ids = _prompts()
    mixed = _generate(model, ids, adapter_names=NAMES, do_sample=False)
    assert mixed.shape == (len(NAMES), ids.shape[1] + NEW_TOKENS)
    for i, name in enumerate(NAMES):
        alone = _generate(model, ids[i : i + 1], name, do_sample=False)
        assert torch.equal(mixed[i], alone[0]), f"row {i} ({name})"


def test_sampling_rows_equal_their_adapter_with_the_same_seed(model):
    ids = _prompts()
    sampling = dict(do_sample=True, temperature=1.5, top_k=0)
    torch.manual_seed(123)
    mixed = _generate(model, ids, adapter_names=NAMES, **sampling)
    torch.manual_seed(123)
    assert torch.equal(_generate(model, ids, adapter_names=NAMES, **sampling), mixed), "a fixed seed repeats"
    for name in set(NAMES):
        torch.manual_seed(123)
        same = _generate(model, ids, name, **sampling)
        rows = [i for i, n in enumerate(NAMES) if n == name]
        assert torch.equal(mixed[rows], same[rows]), name
