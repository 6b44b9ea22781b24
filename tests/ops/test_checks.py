"""Bad input gets a clear error naming the argument, the expected and the actual value."""

from __future__ import annotations

import pytest
import torch

from aqlm_lora import ops
from tests.support.weights import SCHEMES, random_weight


@pytest.fixture
def w():
    return random_weight(SCHEMES[1], 16, 32, bias=True)


def lora(w, r=4):
    return torch.randn(r, w.in_features), torch.randn(w.out_features, r)


def test_codes_dtype(w):
    with pytest.raises(RuntimeError, match="codes must be int8 or int16, got Float"):
        ops.aqlm_gemm(torch.randn(2, 32), w.codes.float(), w.codebooks, w.scales, None)


def test_codes_rank(w):
    with pytest.raises(RuntimeError, match=r"codes must be 3-D .* got shape \[16, 8\]"):
        ops.dequantize(w.codes.reshape(16, 8), w.codebooks, w.scales)


def test_codebooks_rank(w):
    with pytest.raises(RuntimeError, match="codebooks must be 4-D"):
        ops.dequantize(w.codes, w.codebooks[0], w.scales)


def test_codebook_count_mismatch(w):
    with pytest.raises(RuntimeError, match=r"codebooks.shape\[0\] must equal codes.shape\[2\] = 2 .* got 1"):
        ops.dequantize(w.codes, w.codebooks[:1], w.scales)


def test_codebook_size_not_power_of_two(w):
    with pytest.raises(RuntimeError, match=r"codebooks.shape\[1\] must be 2\*\*nbits .* got 200"):
        ops.dequantize(w.codes, w.codebooks[:, :200], w.scales)


def test_int8_codes_for_16_bit_codebooks():
    w16 = random_weight(SCHEMES[0], 16, 32)
    with pytest.raises(RuntimeError, match="hold at most 8 bits, but codebooks have 2\\*\\*16 entries"):
        ops.dequantize(w16.codes.to(torch.int8), w16.codebooks, w16.scales)


def test_scales_shape(w):
    with pytest.raises(RuntimeError, match=r"scales must have shape \[16, 1, 1, 1\] .* got \[8, 1, 1, 1\]"):
        ops.dequantize(w.codes, w.codebooks, w.scales[:8])


def test_codebooks_dtype(w):
    with pytest.raises(RuntimeError, match="codebooks must be float32, float16, bfloat16 or float64, got Int"):
        ops.dequantize(w.codes, w.codebooks.int(), w.scales)


def test_input_features(w):
    with pytest.raises(RuntimeError, match=r"input must have last dimension 32, got shape \[2, 31\]"):
        ops.aqlm_gemm(torch.randn(2, 31), *w.args(), None)


def test_input_dtype(w):
    with pytest.raises(RuntimeError, match="input must be float32, float16, bfloat16 or float64, got Long"):
        ops.aqlm_gemm(torch.ones(2, 32, dtype=torch.long), *w.args(), None)


def test_grad_features(w):
    with pytest.raises(RuntimeError, match=r"grad must have last dimension 16, got shape \[2, 32\]"):
        ops.aqlm_gemm_t(torch.randn(2, 32), *w.args())


def test_bias_shape(w):
    with pytest.raises(RuntimeError, match=r"bias must have shape \[16\], got \[15\]"):
        ops.aqlm_gemm(torch.randn(2, 32), *w.args(), torch.randn(15))


def test_lora_A_shape(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"lora_A must have shape \[r, 32\], got \[4, 30\]"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a[:, :30], b, None, 1.0, 0.0, 0, 0)


def test_lora_B_rank_mismatch(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[16, 4\] \(r from lora_A\), got \[16, 3\]"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b[:, :3], None, 1.0, 0.0, 0, 0)


def test_lora_dtype_mismatch(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match="lora_A and lora_B must share a dtype, got Float and Double"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b.double(), None, 1.0, 0.0, 0, 0)


def test_lora_bias_shape(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"lora_bias must have shape \[16\], got \[2, 8\]"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b, torch.randn(2, 8), 1.0, 0.0, 0, 0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_range(w, p):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=f"dropout_p must be in \\[0, 1\\), got {p:g}"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b, None, 1.0, p, 0, 0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        ops.dropout_mask(torch.randn(3), p, 0, 0)


def test_backward_xa_shape(w):
    a, b = lora(w)
    x, g = torch.randn(2, 32), torch.randn(2, 16)
    with pytest.raises(RuntimeError, match=r"xa must have shape \[2, 4\], got \[3, 4\]"):
        ops.lora_backward(g, x, torch.randn(3, 4), *w.args(), a, b, 1.0, 0.0, 0, 0, True)


def test_backward_grad_rows(w):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"grad must have 2 rows like input, got shape \[3, 16\]"):
        ops.lora_backward(
            torch.randn(3, 16), torch.randn(2, 32), torch.randn(2, 4), *w.args(), a, b, 1.0, 0.0, 0, 0, True
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to mix devices")
def test_device_mix(w):
    with pytest.raises(RuntimeError, match="input must be on cpu"):
        ops.aqlm_gemm(torch.randn(2, 32, device="cuda"), *w.args(), None)


# ---------------------------------------------------------------------------------------------
# The same refusals from the fake kernels (torch.compile, meta tensors) as from the C++ kernels.


def _bad_calls(w):
    a, b = lora(w)
    x, g, xa = torch.randn(2, 32), torch.randn(2, 16), torch.randn(2, 4)
    return {
        "codes_dtype": lambda: ops.aqlm_gemm(x, w.codes.float(), w.codebooks, w.scales, None),
        "codes_rank": lambda: ops.dequantize(w.codes.reshape(16, 8), w.codebooks, w.scales),
        "codebooks_rank": lambda: ops.dequantize(w.codes, w.codebooks[0], w.scales),
        "codebook_count": lambda: ops.dequantize(w.codes, w.codebooks[:1], w.scales),
        "codebook_size": lambda: ops.dequantize(w.codes, w.codebooks[:, :200], w.scales),
        "scales_shape": lambda: ops.dequantize(w.codes, w.codebooks, w.scales[:8]),
        "codebooks_dtype": lambda: ops.dequantize(w.codes, w.codebooks.int(), w.scales),
        "input_features": lambda: ops.aqlm_gemm(torch.randn(2, 31), *w.args(), None),
        "input_dtype": lambda: ops.aqlm_gemm(torch.ones(2, 32, dtype=torch.long), *w.args(), None),
        "grad_features": lambda: ops.aqlm_gemm_t(torch.randn(2, 32), *w.args()),
        "bias_shape": lambda: ops.aqlm_gemm(x, *w.args(), torch.randn(15)),
        "lora_A_shape": lambda: ops.lora_forward(x, *w.args(), None, a[:, :30], b, None, 1.0, 0.0, 0, 0),
        "lora_B_rank": lambda: ops.lora_forward(x, *w.args(), None, a, b[:, :3], None, 1.0, 0.0, 0, 0),
        "lora_dtypes": lambda: ops.lora_forward(x, *w.args(), None, a, b.double(), None, 1.0, 0.0, 0, 0),
        "lora_bias_shape": lambda: ops.lora_forward(x, *w.args(), None, a, b, torch.randn(2, 8), 1.0, 0.0, 0, 0),
        "dropout_range": lambda: ops.lora_forward(x, *w.args(), None, a, b, None, 1.0, 1.5, 0, 0),
        "dropout_nan": lambda: ops.dropout_mask(x, float("nan"), 0, 0),
        "scaling_inf": lambda: ops.lora_forward(x, *w.args(), None, a, b, None, float("inf"), 0.0, 0, 0),
        "scaling_nan_backward": lambda: ops.lora_backward(g, x, xa, *w.args(), a, b, float("nan"), 0.0, 0, 0, True),
        "xa_shape": lambda: ops.lora_backward(g, x, torch.randn(3, 4), *w.args(), a, b, 1.0, 0.0, 0, 0, True),
        "grad_rows": lambda: ops.lora_backward(torch.randn(3, 16), x, xa, *w.args(), a, b, 1.0, 0.0, 0, 0, True),
        "seed_negative": lambda: ops.lora_forward(x, *w.args(), None, a, b, None, 1.0, 0.1, -1, 0),
        "offset_negative": lambda: ops.dropout_mask(x, 0.1, 0, -5),
    }


BAD_CALLS = list(_bad_calls(random_weight(SCHEMES[1], 16, 32)))


@pytest.mark.parametrize("case", BAD_CALLS)
def test_fake_kernels_refuse_with_the_cpp_message(w, case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    call = _bad_calls(w)[case]
    with pytest.raises(RuntimeError) as real:
        call()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError) as fake:
            call()
    assert str(fake.value).splitlines()[0] == str(real.value).splitlines()[0]


@pytest.mark.parametrize("seed,offset,name", [(2**63, 0, "seed"), (0, 2**64, "offset"), (-3, 0, "seed")])
def test_seed_and_offset_out_of_int64_are_refused_clearly(w, seed, offset, name):
    a, b = lora(w)
    x = torch.randn(2, 32)
    match = rf"{name} must be an integer in \[0, 2\*\*63 - 1\], got {seed if name == 'seed' else offset}"
    with pytest.raises(RuntimeError, match=match):
        ops.lora_forward(x, *w.args(), None, a, b, None, 1.0, 0.1, seed, offset)
    with pytest.raises(RuntimeError, match=match):
        ops.dropout_mask(x, 0.1, seed, offset)
    with pytest.raises(RuntimeError, match=match):
        ops.lora_backward(torch.randn(2, 16), x, torch.randn(2, 4), *w.args(), a, b, 1.0, 0.1, seed, offset, True)


@pytest.mark.parametrize("scaling", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_scaling_is_refused(w, scaling):
    a, b = lora(w)
    with pytest.raises(RuntimeError, match="scaling must be finite, got"):
        ops.lora_forward(torch.randn(2, 32), *w.args(), None, a, b, None, scaling, 0.0, 0, 0)


def _on_meta(t):
    return t.to("meta")


@pytest.mark.parametrize("which", ["input", "codes", "codebooks", "scales", "bias", "lora_A", "lora_B", "lora_bias"])
def test_one_meta_argument_among_cpu_ones_is_refused(w, which):
    """A meta tensor among CPU tensors dispatches to the fake kernel, which used to return an
    uninitialized CPU tensor; it must refuse the device mix like the C++ kernels do."""
    a, b = lora(w)
    args = dict(
        input=torch.randn(2, 32), codes=w.codes, codebooks=w.codebooks, scales=w.scales, bias=torch.randn(16),
        lora_A=a, lora_B=b, lora_bias=torch.randn(16),
    )
    args[which] = _on_meta(args[which])
    with pytest.raises(RuntimeError, match=r"must be on (cpu|meta) \(the device of codes\), got (meta|cpu)"):
        ops.lora_forward(
            args["input"], args["codes"], args["codebooks"], args["scales"], args["bias"], args["lora_A"],
            args["lora_B"], args["lora_bias"], 1.0, 0.0, 0, 0,
        )
    if which in ("input", "codes", "codebooks", "scales", "bias"):
        with pytest.raises(RuntimeError, match=r"must be on (cpu|meta) \(the device of codes\), got (meta|cpu)"):
            ops.aqlm_gemm(args["input"], args["codes"], args["codebooks"], args["scales"], args["bias"])


def test_all_meta_arguments_give_meta_shapes(w):
    a, b = lora(w)
    meta = [_on_meta(t) for t in (torch.randn(2, 3, 32), w.codes, w.codebooks, w.scales, a, b)]
    out, xa = ops.lora_forward(meta[0], *meta[1:4], None, meta[4], meta[5], None, 1.0, 0.1, 0, 0)
    assert out.device.type == "meta" and out.shape == (2, 3, 16) and xa.shape == (6, 4)


def test_raw_ops_refuse_negative_seed_and_offset(w):
    """The C++ kernels check too: the raw ops skip the Python wrappers."""
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\], got -1"):
        torch.ops.aqlm_lora.dropout_mask(x, 0.1, -1, 0)
    a, b = lora(w)
    with pytest.raises(RuntimeError, match=r"offset must be an integer in \[0, 2\*\*63 - 1\], got -2"):
        torch.ops.aqlm_lora.lora_forward(x, *w.args(), None, a, b, None, 1.0, 0.1, 0, -2)
