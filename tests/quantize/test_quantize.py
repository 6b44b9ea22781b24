"""The quantizer: scheme strings, code storage, valid AQLM tensors, error per round, checkpoints."""

from __future__ import annotations

import aqlm
import pytest
import torch
import torch.nn.functional as F
from aqlm.utils import _dequantize_weight, pack_int_data, unpack_int_data
from torch import nn

from aqlm_lora import ops, reference
from aqlm_lora import quantize as q
from aqlm_lora.quantize import clustering
from tests.support.cli import byte_model

# (scheme, weight shape [out, in]): small enough that k-means is quick, big enough to matter.
SCHEMES = [
    ("1x16", (16, 64)),
    ("1x16g16", (16, 64)),
    ("2x8", (64, 128)),
    ("1x8", (64, 128)),
    ("4x8", (32, 64)),
    ("2x8o2", (64, 128)),
]


def _aqlm_weight(layer: nn.Module) -> torch.Tensor:
    return _dequantize_weight(unpack_int_data(layer.codes, layer.nbits_per_codebook), layer.codebooks, layer.scales)


# ---------------------------------------------------------------------------------------------
# Scheme strings


@pytest.mark.parametrize(
    "text, expect",
    [
        ("2x8", (2, 8, 8, 1)),
        ("1x16", (1, 16, 8, 1)),
        ("1x8", (1, 8, 8, 1)),
        ("4x8", (4, 8, 8, 1)),
        ("1x16g16", (1, 16, 16, 1)),
        ("2x8g8o2", (2, 8, 8, 2)),
        ("2x8o2", (2, 8, 8, 2)),
        (" 2X8G4 ", (2, 8, 4, 1)),
    ],
)
def test_parse_scheme(text, expect):
    scheme = q.parse_scheme(text)
    assert (scheme.num_codebooks, scheme.nbits, scheme.in_group_size, scheme.out_group_size) == expect
    assert q.parse_scheme(str(scheme)) == scheme  # str() is canonical and parses back


@pytest.mark.parametrize("text", ["", "2", "2x", "x8", "2x8g", "2x8o2g8", "2x8x", "0x8", "2x0", "2x17", "2x8g0", "a"])
def test_parse_scheme_rejects(text):
    with pytest.raises(ValueError, match="scheme"):
        q.parse_scheme(text)


def test_scheme_properties():
    scheme = q.parse_scheme("2x8")
    assert scheme.codebook_size == 256 and scheme.code_dtype == torch.int8 and scheme.bits_per_weight == 2.0
    assert q.parse_scheme("1x16").code_dtype == torch.int16
    assert str(q.parse_scheme("2x8g8o1")) == "2x8"


# ---------------------------------------------------------------------------------------------
# Code storage


@pytest.mark.parametrize("nbits", [1, 4, 8, 12, 16])
def test_pack_codes_round_trip(nbits):
    values = torch.arange(2**nbits)
    packed = q.pack_codes(values, nbits)
    assert packed.dtype == (torch.int8 if nbits <= 8 else torch.int16)
    half = 2 ** (nbits - 1)
    assert torch.equal(packed[:half].long(), values[:half])  # low half stored as is
    assert torch.equal(packed[half:].long(), values[half:] - 2**nbits)  # high half stored negative
    assert torch.equal(q.unpack_codes(packed, nbits), values)
    assert torch.equal(packed, pack_int_data(values.clone(), nbits))  # aqlm's own convention
    assert torch.equal(unpack_int_data(packed, nbits), values)


def test_pack_codes_rejects_out_of_range():
    with pytest.raises(ValueError):
        q.pack_codes(torch.tensor([256]), 8)
    with pytest.raises(ValueError):
        q.pack_codes(torch.tensor([-1]), 8)


# ---------------------------------------------------------------------------------------------
# k-means pieces


def test_nearest_chunked_matches_brute_force(monkeypatch):
    points, centers = torch.randn(500, 8), torch.randn(300, 8)
    expect = torch.cdist(points, centers).argmin(1)
    monkeypatch.setattr(clustering, "_CHUNK_ELEMENTS", 1000)  # forces chunks of 3 rows
    index, dist = q.nearest(points, centers)
    assert torch.equal(index, expect)
    torch.testing.assert_close(dist, (points - centers[index]).pow(2).sum(1), rtol=1e-4, atol=1e-4)


def test_kmeans_recovers_separated_clusters():
    centers = torch.randn(8, 4) * 10
    points = centers.repeat_interleave(50, 0) + 0.01 * torch.randn(400, 4)
    found = q.kmeans(points, 8, iters=10, generator=torch.Generator().manual_seed(1))
    assert torch.cdist(centers, found).min(1).values.max() < 0.1


# ---------------------------------------------------------------------------------------------
# One layer


@pytest.mark.parametrize("scheme_text, shape", SCHEMES, ids=[s for s, _ in SCHEMES])
def test_quantize_linear_valid_tensors(scheme_text, shape):
    scheme = q.parse_scheme(scheme_text)
    out_f, in_f = shape
    linear = nn.Linear(in_f, out_f)
    layer, errors = q.quantize_linear(linear, scheme, rounds=2, kmeans_iters=4)

    assert isinstance(layer, aqlm.QuantizedLinear)
    og, ig, c = scheme.out_group_size, scheme.in_group_size, scheme.num_codebooks
    assert layer.codes.shape == (out_f // og, in_f // ig, c)
    assert layer.codes.dtype == scheme.code_dtype
    assert layer.codebooks.shape == (c, 2**scheme.nbits, og, ig) and layer.codebooks.dtype == torch.float32
    assert layer.scales.shape == (out_f // og, 1, 1, 1)
    assert torch.equal(layer.bias, linear.bias.detach())
    assert not any(p.requires_grad for p in layer.parameters())
    assert len(errors) == 3

    # The reported error is the error of the stored tensors, read through aqlm's own decoder.
    weight = _aqlm_weight(layer)
    rel = float((weight - linear.weight.detach()).norm() / linear.weight.detach().norm())
    assert rel == pytest.approx(errors[-1], rel=1e-4, abs=1e-6)
    assert rel < 0.75
    # ... and through our kernels and the reference.
    torch.testing.assert_close(ops.dequantize(layer.codes, layer.codebooks, layer.scales), weight)
    torch.testing.assert_close(reference.dequantize(layer.codes, layer.codebooks, layer.scales), weight)


@pytest.mark.parametrize("scheme", ["1x16", "2x6o2"])
def test_quantize_linear_aqlm_forward_matches(scheme):
    """aqlm's own CPU forward (dequantize + GEMM path) on our tensors equals F.linear with W_q.

    (8-bit codebooks take aqlm's numba path below; aqlm permutes their codes in place on CPU even
    when out_group > 1 and its fallback then fails, so "2x8o2" cannot run through aqlm's forward.)
    """
    linear = nn.Linear(64, 32)
    layer, _ = q.quantize_linear(linear, scheme, rounds=1, kmeans_iters=4)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, _aqlm_weight(layer), layer.bias))


def test_quantize_linear_aqlm_numba_forward_matches():
    """aqlm's CPU 2x8 kernel (numba LUT, permutes codes in place) agrees with our codes."""
    linear = nn.Linear(32, 16, bias=False)
    layer, _ = q.quantize_linear(linear, "2x8", rounds=1)
    weight = _aqlm_weight(layer)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_rounds_lower_the_error():
    weight = torch.randn(128, 256)
    result = q.quantize_weight(weight, "2x8", rounds=4)
    errors = result.errors
    assert len(errors) == 5
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-6), errors
    assert errors[-1] < 0.98 * errors[0], errors
    assert 0.1 < errors[-1] < 0.4  # 2 bits per weight of Gaussian data: rate-distortion bound 0.25


@pytest.mark.parametrize("scheme", ["1x8", "4x8", "2x8o2"])
def test_rounds_monotone_other_schemes(scheme):
    errors = q.quantize_weight(torch.randn(64, 128), scheme, rounds=3, kmeans_iters=4).errors
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-6), errors


def test_beam_search_monotone_and_not_worse_than_greedy_round0():
    weight = torch.randn(64, 128)
    greedy = q.quantize_weight(weight, "2x8", rounds=2)
    beam = q.quantize_weight(weight, "2x8", rounds=2, beam_size=4)
    assert beam.errors[0] == greedy.errors[0]  # same init
    for before, after in zip(beam.errors, beam.errors[1:]):
        assert after <= before * (1 + 1e-6)
    assert beam.errors[-1] <= greedy.errors[-1] * 1.01


def test_quantize_weight_is_deterministic_and_seeded():
    weight = torch.randn(32, 64)
    a = q.quantize_weight(weight, "2x8", rounds=1, seed=3)
    b = q.quantize_weight(weight, "2x8", rounds=1, seed=3)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
    assert a.errors == b.errors


def test_quantize_weight_zero_rows_and_dtype():
    weight = torch.randn(16, 32)
    weight[3] = 0
    result = q.quantize_weight(weight, "1x8", rounds=2, dtype=torch.float16)
    assert result.codebooks.dtype == torch.float16 and result.scales.dtype == torch.float16
    dense = result.dequantize()
    assert torch.isfinite(dense).all()
    assert torch.equal(dense[3], torch.zeros(32))


def test_quantize_weight_rejects_bad_shapes():
    with pytest.raises(ValueError, match="groups"):
        q.quantize_weight(torch.randn(16, 12), "2x8")
    with pytest.raises(ValueError, match="groups"):
        q.quantize_weight(torch.randn(15, 16), "2x8o2")
    with pytest.raises(ValueError, match="2-D"):
        q.quantize_weight(torch.randn(16), "2x8")


# ---------------------------------------------------------------------------------------------
# Whole models and checkpoints


def test_quantize_model_replaces_linears_and_sets_config():
    model = byte_model().eval()  # the CLI tests' tiny Llama: hidden 32, MLP 64, 2 layers
    errors = q.quantize_model(model, "2x8", progress=False, rounds=1)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized = [n for n, m in model.named_modules() if isinstance(m, aqlm.QuantizedLinear)]
    assert linears == ["lm_head"]
    assert sorted(quantized) == sorted(errors) and len(quantized) == 2 * 7
    config = model.config.quantization_config
    assert (config.in_group_size, config.out_group_size, config.num_codebooks, config.nbits_per_codebook) == (
        8,
        1,
        2,
        8,
    )
    assert "lm_head.weight" in config.linear_weights_not_to_quantize
    assert "model.embed_tokens.weight" in config.linear_weights_not_to_quantize
    assert config.to_dict()["quant_method"] == "aqlm"


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        q.quantize_model(nn.Sequential(nn.ReLU()), "2x8", progress=False)
    with pytest.raises(ValueError, match="outside skip"):
        q.quantize_model(nn.Sequential(nn.Linear(8, 8)), "2x8", skip=("0",), progress=False)
    with pytest.raises(ValueError, match="layer 1 "):
        q.quantize_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 12)), "2x8o8", progress=False)
    tied = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shares its weight with 0.weight"):
        q.quantize_model(tied, "2x8", skip=(), progress=False)
    assert isinstance(tied[1], nn.Linear)  # nothing was replaced


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "scheme, skip", [("2x8", ("lm_head",)), ("2x8o2", ("lm_head", "model.layers.1.mlp.up_proj")), ("1x16", ())]
)
def test_save_and_reload_through_transformers(tmp_path, scheme, skip):
    """save_pretrained -> AutoModelForCausalLM.from_pretrained (transformers' AQLM loader) -> same model."""
    from transformers import AutoModelForCausalLM

    from aqlm_lora.app.train import use_fused_base

    model = byte_model().eval()
    q.quantize_model(model, scheme, skip=skip, progress=False, rounds=1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

    types = {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, aqlm.QuantizedLinear))}
    loaded_types = {n: type(m) for n, m in loaded.named_modules() if isinstance(m, (nn.Linear, aqlm.QuantizedLinear))}
    assert types == loaded_types
    assert (types["lm_head"] is nn.Linear) == ("lm_head" in skip)
    if len(skip) > 1:
        assert types["model.layers.1.mlp.up_proj"] is nn.Linear and types["model.layers.0.mlp.up_proj"] is not nn.Linear
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert state[key].dtype == loaded_state[key].dtype, key
        assert torch.equal(state[key], loaded_state[key]), key

    ids = torch.randint(0, 64, (2, 12))
    if scheme == "1x16":  # aqlm's own CPU forward (dequantize + GEMM)
        torch.testing.assert_close(_logits(model, ids), _logits(loaded, ids), rtol=0, atol=0)
    use_fused_base(model)
    use_fused_base(loaded)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))


# ---------------------------------------------------------------------------------------------
# Weights the quantizer must refuse or handle (issue 10, item 8)


def _with(value: float) -> torch.Tensor:
    weight = torch.randn(16, 32)
    weight[3, 5] = value
    return weight


@pytest.mark.parametrize(
    "value, what", [(float("nan"), "1 NaN"), (float("inf"), "1 infinite"), (-float("inf"), "1 infinite")]
)
def test_quantize_weight_refuses_non_finite(value, what):
    with pytest.raises(ValueError, match=f"weight \\[16, 32\\] has {what} value"):
        q.quantize_weight(_with(value), "2x8", rounds=1)


@pytest.mark.parametrize("shape", [(0, 16), (8, 0), (0, 0)])
def test_quantize_weight_refuses_empty(shape):
    with pytest.raises(ValueError, match="is empty"):
        q.quantize_weight(torch.zeros(shape), "2x8", rounds=1)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # nn.Linear(0, 8) below
def test_quantize_model_names_the_bad_layer_and_changes_nothing():
    model = byte_model().eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer model.layers.1.mlp.down_proj \\[32, 64\\] has 1 NaN value"):
        q.quantize_model(model, "2x8", progress=False, rounds=1)
    assert not any(isinstance(m, aqlm.QuantizedLinear) for m in model.modules())  # checked before any change
    empty = nn.Sequential(nn.Linear(8, 8), nn.Linear(0, 8))
    with pytest.raises(ValueError, match="layer 1 \\[8, 0\\] is empty"):
        q.quantize_model(empty, "2x8", progress=False)


@pytest.mark.parametrize("exponent", [-100, -60, 66, 120])  # results stay normal floats
def test_quantize_weight_power_of_two_scaling_is_exact(exponent):
    """Per-layer normalisation: W * 2**k gives the same codes and codebooks, scales times 2**k."""
    weight = torch.randn(32, 64)
    base = q.quantize_weight(weight, "2x8", rounds=2)
    scaled = q.quantize_weight(weight * 2.0**exponent, "2x8", rounds=2)
    assert torch.equal(scaled.codes, base.codes) and torch.equal(scaled.codebooks, base.codebooks)
    assert torch.equal(scaled.scales, (base.scales.double() * 2.0**exponent).float())
    assert scaled.errors == base.errors


@pytest.mark.parametrize("factor", [1e-30, 1e20, 1e36])
def test_quantize_weight_tiny_and_huge_magnitudes(factor):
    """1e-30 used to decode to all zeros (scales underflowed), 1e20 to fail inside torch (overflow)."""
    weight = torch.randn(64, 128)  # 1024 groups for 256 entries: a real (non-zero) error
    base = q.quantize_weight(weight, "2x8", rounds=2)
    scaled_weight = weight * factor
    result = q.quantize_weight(scaled_weight, "2x8", rounds=2)
    assert result.errors == pytest.approx(base.errors, rel=1e-3)
    dense = result.dequantize().double()
    assert torch.isfinite(dense).all() and dense.abs().max() > 0
    rel = float((dense - scaled_weight.double()).norm() / scaled_weight.double().norm())
    assert rel == pytest.approx(result.errors[-1], rel=1e-4)


def test_quantize_weight_refuses_scales_the_dtype_cannot_hold():
    weight = torch.randn(16, 32)
    with pytest.raises(ValueError, match="scales overflow float16"):
        q.quantize_weight(weight * 1e20, "1x8", rounds=1, dtype=torch.float16)
    with pytest.raises(ValueError, match="scales underflow float16"):
        q.quantize_weight(weight * 1e-20, "1x8", rounds=1, dtype=torch.float16)
    with pytest.raises(ValueError, match="scales overflow float32"):
        q.quantize_weight(weight.double() * 1e300, "1x8", rounds=1, dtype=torch.float32)
