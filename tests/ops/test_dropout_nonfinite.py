"""Dropout of Inf/NaN inputs: a dropped Inf or NaN gives NaN (x * 0), as torch's dropout and the
reference compute it, on every path (mask op, fused forward, the backward's dx dropout), not a
silent 0 that would hide a NaN in the LoRA branch."""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import ops
from aqlm_lora import reference as ref
from tests.support.weights import SCHEMES, devices, random_weight

SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _same_specials(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    assert torch.equal(actual.isposinf(), expected.isposinf())
    assert torch.equal(actual.isneginf(), expected.isneginf())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rows", [1, 3, 9, 40], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("special", list(SPECIALS))
def test_dropped_special_propagates_like_the_reference(device, rows, special):
    w = random_weight(SCHEMES[1], 16, 32, device=device)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 32, generator=g)
    x[rows // 2, 5] = SPECIALS[special]  # the element of the last row; its mask decides per seed
    x = x.to(device)
    lora_A = torch.randn(4, 32, generator=g).to(device)
    lora_B = torch.randn(16, 4, generator=g).to(device)
    dropped_seen = kept_seen = False
    for seed in range(8):
        keep = ops.dropout_mask(x, 0.5, seed)
        dropped_seen |= not bool(keep[rows // 2, 5])
        kept_seen |= bool(keep[rows // 2, 5])
        args = (*w.args(), None, lora_A, lora_B, None, 2.0, 0.5, seed, 0)
        out, xa = ops.lora_forward(x, *args)
        ref_out, ref_xa = ref.lora_forward(x, *args)
        _same_specials(xa, ref_xa)
        _same_specials(out, ref_out)
    assert dropped_seen and kept_seen  # both cases were exercised


@pytest.mark.parametrize("device", devices())
def test_backward_dropout_of_a_nonfinite_gradient(device):
    """dx's LoRA term is dropout(g B A): an Inf in grad meets dropped positions too."""
    w = random_weight(SCHEMES[1], 16, 32, device=device)
    x = torch.randn(5, 32, device=device)
    grad = torch.randn(5, 16, device=device)
    grad[2, 3] = float("inf")
    lora_A, lora_B = torch.randn(4, 32, device=device), torch.randn(16, 4, device=device)
    for seed in range(4):
        _, xa = ops.lora_forward(x, *w.args(), None, lora_A, lora_B, None, 2.0, 0.5, seed, 0)
        args = (grad, x, xa, *w.args(), lora_A, lora_B, 2.0, 0.5, seed, 0, True)
        ours = ops.lora_backward(*args)
        theirs = ref.lora_backward(*args)
        for a, b in zip(ours, theirs):
            _same_specials(a, b)
