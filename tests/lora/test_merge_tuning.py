"""merge_and_quantize(..., calibration=...): codebooks and scales tuned to the adapted model's outputs."""

import aqlm
import torch
import torch.nn.functional as F

from aqlm_lora.lora.codebook_tuning import teacher_log_probs, tune_codebooks
from aqlm_lora.lora.fused_base import canonical_codes, on_fused_kernels
from aqlm_lora.lora.requantize import merge_and_quantize
from tests.lora.test_merge import tiny_model

CALIBRATION = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _kl(model, targets: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    return float(F.kl_div(log_p.flatten(0, -2), targets.flatten(0, -2), log_target=True, reduction="batchmean"))


def test_tuning_brings_the_requantized_model_closer_to_the_adapted_one():
    teacher = tiny_model(dora=True)
    held_out = teacher_log_probs(teacher, HELD_OUT)
    plain = merge_and_quantize(tiny_model(dora=True), rounds=1)
    losses = []
    tuned = merge_and_quantize(teacher, rounds=1, calibration=CALIBRATION, tune_steps=30, tune_lr=1e-3, losses=losses)
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert _kl(tuned, held_out, HELD_OUT) < _kl(plain, held_out, HELD_OUT)
    q_proj = tuned.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, aqlm.QuantizedLinear) and on_fused_kernels(q_proj)
    assert not any(p.requires_grad for p in tuned.parameters())
    plain_q = plain.model.layers[0].self_attn.q_proj
    assert torch.equal(canonical_codes(q_proj), canonical_codes(plain_q)), "tuning changes no code"
    assert not torch.equal(q_proj.codebooks, plain_q.codebooks)


def test_tune_codebooks_restores_the_layers_and_flags():
    model = merge_and_quantize(tiny_model(dora=False), rounds=0)
    layers = [m for m in model.modules() if isinstance(m, aqlm.QuantizedLinear)][:2]
    model.lm_head.weight.requires_grad_(True)
    forwards = [vars(layer).get("forward") for layer in layers]
    targets = teacher_log_probs(model, CALIBRATION[:4])
    losses = tune_codebooks(model, layers, CALIBRATION[:4], targets, steps=2, lr=1e-3, batch=2)
    assert len(losses) == 2 and losses[0] < 1e-6  # the model is its own teacher
    assert [vars(layer).get("forward") for layer in layers] == forwards
    assert model.lm_head.weight.requires_grad and not any(layer.codebooks.requires_grad for layer in layers)
