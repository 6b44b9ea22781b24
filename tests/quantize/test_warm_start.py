"""quantize_weight(..., warm_start=...): start from given codes, codebooks and scales instead of k-means."""

import pytest
import torch

from aqlm_lora.quantize import QuantizedWeight, quantize_weight
from aqlm_lora.quantize import weight as weight_module
from aqlm_lora.scheme import parse_scheme

SCHEMES = ["2x8", "1x8", "2x8g8o2", "1x16g16"]


def _weight(out_features: int = 64, in_features: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * (torch.rand(out_features, 1, generator=g) + 0.5)


def _no_kmeans(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a warm start must not run k-means")

    monkeypatch.setattr(weight_module, "kmeans", refuse)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_warm_start_from_its_own_quantization_reproduces_it(scheme, monkeypatch):
    w = _weight()
    start = quantize_weight(w, scheme, rounds=2, kmeans_iters=4)
    target = start.dequantize()
    _no_kmeans(monkeypatch)
    again = quantize_weight(target, scheme, rounds=0, warm_start=start)
    assert torch.equal(again.codes, start.codes)
    assert again.errors[0] < 1e-6
    torch.testing.assert_close(again.dequantize(), target, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["2x8", "1x8"])
def test_row_rescaling_is_absorbed_by_the_scales(scheme, monkeypatch):
    """DoRA's merged weight rescales rows: one scale per row holds that exactly, no round needed."""
    start = quantize_weight(_weight(), scheme, rounds=1, kmeans_iters=4)
    rows = torch.rand(64, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    _no_kmeans(monkeypatch)
    for factor in (1.0, 1e6, 1e-6):  # and in any magnitude
        rescaled = quantize_weight(start.dequantize() * rows * factor, scheme, rounds=0, warm_start=start)
        assert rescaled.errors[0] < 1e-6, factor
        assert torch.equal(rescaled.codes, start.codes)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_warm_start_on_a_nearby_weight_refines_without_kmeans(scheme, monkeypatch):
    """A quantized weight plus a small low-rank change (a merged adapter): the error to the new weight
    never rises over the rounds, and ends no worse than a fresh quantization's."""
    w = _weight()
    start = quantize_weight(w, scheme, rounds=2, kmeans_iters=4)
    g = torch.Generator().manual_seed(1)
    delta = 0.05 * torch.randn(64, 4, generator=g) @ torch.randn(4, 64, generator=g)
    merged = start.dequantize() + delta
    fresh = quantize_weight(merged, scheme, rounds=2, kmeans_iters=4)
    _no_kmeans(monkeypatch)
    warm = quantize_weight(merged, scheme, rounds=2, warm_start=start)
    assert all(b <= a + 1e-7 for a, b in zip(warm.errors, warm.errors[1:])), warm.errors
    assert warm.errors[-1] <= fresh.errors[-1] + 1e-6, (warm.errors, fresh.errors)
    before = float((start.dequantize() - merged).norm() / merged.norm())
    assert warm.errors[-1] <= before


def test_warm_start_of_another_shape_or_scheme_is_refused():
    start = quantize_weight(_weight(), "2x8", rounds=0, kmeans_iters=1)
    with pytest.raises(ValueError, match=r"layer x: warm start codes have shape \[64, 8, 2\], expected \[32, 8, 2\]"):
        quantize_weight(_weight(32, 64), "2x8", warm_start=start, name="layer x")
    with pytest.raises(ValueError, match="warm start codes have shape"):
        quantize_weight(_weight(), "1x8", warm_start=start)
    scheme = parse_scheme("2x8")
    wrong = QuantizedWeight(start.codes, start.codebooks[:, :128], start.scales, scheme)
    with pytest.raises(ValueError, match="warm start codebooks have shape"):
        quantize_weight(_weight(), "2x8", warm_start=wrong)
