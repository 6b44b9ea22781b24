"""The counter-based dropout generator: known answers, kernel == reference, statistics."""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import ops
from aqlm_lora import reference as ref
from tests.support.weights import devices

# Known-answer vectors of Philox4x32-10 (Random123): (counter words, key words) -> output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_reference_philox_known_answers(counter, key, expected):
    words = ref.philox4x32_10(counter[0] | (counter[1] << 32), counter[2] | (counter[3] << 32), key[0] | (key[1] << 32))
    assert [int(w) for w in words] == list(expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 129), (2, 3, 11)], ids=str)
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 17, 3), (2**62 - 1, 2**33 + 5)], ids=str)
def test_kernel_mask_equals_reference(shape, seed, offset, device):
    x = torch.empty(shape, device=device)
    mask = ops.dropout_mask(x, 0.3, seed, offset)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    torch.testing.assert_close(mask.cpu(), ref.dropout_mask(x.cpu(), 0.3, seed, offset), rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_rate_matches_p(p):
    mask = ops.dropout_mask(torch.empty(200_000), p, seed=123, offset=0)
    keep = mask.float().mean().item()
    assert abs(keep - (1 - p)) < 4 * ((p * (1 - p)) / mask.numel()) ** 0.5 + 1e-4


def test_seeds_and_offsets_give_different_masks():
    x = torch.empty(4096)
    base = ops.dropout_mask(x, 0.5, 1, 0)
    assert not torch.equal(base, ops.dropout_mask(x, 0.5, 2, 0))
    assert not torch.equal(base, ops.dropout_mask(x, 0.5, 1, 1))
    torch.testing.assert_close(base, ops.dropout_mask(x, 0.5, 1, 0), rtol=0, atol=0)


def test_zero_p_keeps_everything():
    assert ops.dropout_mask(torch.empty(1000), 0.0, 5, 0).all()


def test_float64_dropout_scale_is_float64():
    """The keep test uses p as a float, the 1 / (1 - p) scale must not: p = 0.1 rounded to float32
    put a 1.7e-9 relative error into every float64 output that passes through the mask."""
    from aqlm_lora import ops
    from aqlm_lora import reference as ref
    from tests.support.weights import SCHEMES, random_weight

    w = random_weight(SCHEMES[1], 16, 32, torch.float64)
    x = torch.randn(5, 32, dtype=torch.float64)
    lora_A, lora_B = torch.randn(4, 32, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    args = (*w.args(), None, lora_A, lora_B, None, 0.5, 0.1, 7, 0)
    for got, want in zip(ops.lora_forward(x, *args), ref.lora_forward(x, *args)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
