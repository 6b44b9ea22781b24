"""AqlmLoraLinear against PEFT's own AqlmLoraLinear (the semantics) and reference.py (the dropout math)."""

import os

# aqlm's numba CPU kernel races across threads; numba reads this once, at import (conftest sets it too).
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import copy  # noqa: E402
import warnings  # noqa: E402

import aqlm  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402
from torch import nn  # noqa: E402

from aqlm_lora import AqlmLoraLinear, ops, reference  # noqa: E402
from aqlm_lora.lora.layer import canonical_codes  # noqa: E402
from tests.support.layers import (  # noqa: E402
    DTYPE_IDS,
    DTYPES,
    IN_FEATURES,
    OUT_FEATURES,
    SCHEME_IDS,
    SCHEMES,
    Scheme,
    adapter_params,
    assert_close_fp32,
    assert_low_precision_ok,
    dense_weight,
    lora_config,
    make_quantized_linear,
    peft_twin,
    run_with_grads,
)

MODES = ["single", "rslora_bias", "multi", "mixed", "disabled"]
MIXED_NAMES = ["b", "a", "__base__", "b"]


def build(scheme: Scheme, mode: str, dtype: torch.dtype = torch.float32, bias: bool = True) -> AqlmLoraLinear:
    base = make_quantized_linear(scheme, bias=bias)
    special = mode == "rslora_bias"
    layer = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=lora_config(use_rslora=special, lora_bias=special))
    if mode in ("multi", "mixed"):
        layer.update_layer("b", 6, lora_alpha=3, config=lora_config(r=6, lora_alpha=3, lora_bias=True))
        with torch.no_grad():
            layer.lora_B["b"].bias.normal_()
    if special:
        with torch.no_grad():
            layer.lora_B["a"].bias.normal_()
    if mode == "multi":
        layer.set_adapter(["a", "b"])
    if mode == "disabled":
        layer.enable_adapters(False)
    return layer.to(dtype)


def oracle(ours: AqlmLoraLinear, x, grad_out, dtype, mode: str):
    """PEFT's layer (dense base in ``dtype``) with ours' weights; mixed batches row by row."""
    twin = peft_twin(ours, dtype=dtype)
    x = x.to(dtype)
    if mode != "mixed":
        return run_with_grads(twin, x, grad_out)
    outs, x_grads = [], []
    params = adapter_params(twin)
    for p in params.values():
        p.grad = None
    for i, name in enumerate(MIXED_NAMES):
        twin.enable_adapters(name != "__base__")
        if name != "__base__":
            twin.set_adapter(name)
        for p in params.values():
            p.requires_grad_(True)
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        out = twin(xi)
        out.backward(grad_out[i : i + 1].to(out.dtype))
        outs.append(out.detach())
        x_grads.append(xi.grad)
    grads = {"input": torch.cat(x_grads)}
    grads.update({n: p.grad for n, p in params.items()})
    return torch.cat(outs), grads


@pytest.mark.parametrize("tokens", [1, 8], ids=["decode", "prefill"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_matches_peft(scheme, dtype, mode, tokens):
    """4 x tokens rows: few rows take the kernels' decode path, many their blocked GEMM path."""
    ours = build(scheme, mode, dtype)
    x = torch.randn(4, tokens, IN_FEATURES)
    grad_out = torch.randn(4, tokens, OUT_FEATURES)
    kwargs = {"adapter_names": MIXED_NAMES} if mode == "mixed" else {}
    out, grads = run_with_grads(ours, x.to(dtype), grad_out, **kwargs)
    exact_out, exact_grads = oracle(ours, x, grad_out, torch.float32, mode)
    assert out.dtype == dtype
    assert grads.keys() == exact_grads.keys()
    if mode == "disabled":
        assert all(g is None for n, g in grads.items() if n != "input")
    if dtype == torch.float32:
        assert_close_fp32(out, exact_out, what="output")
        for name, grad in grads.items():
            assert_close_fp32(grad, exact_grads[name], what=name)
        return
    plain_out, plain_grads = oracle(ours, x, grad_out, dtype, mode)
    assert plain_out.dtype == dtype
    assert_low_precision_ok(out, plain_out, exact_out, what="output")
    for name, grad in grads.items():
        if exact_grads[name] is None:
            assert grad is None and plain_grads[name] is None, name
            continue
        assert grad.dtype == dtype, name
        assert_low_precision_ok(grad, plain_grads[name], exact_grads[name], what=name)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.out_group_size == 1], ids=str)
def test_matches_peft_with_aqlm_own_forward(scheme):
    """Outputs of PEFT's layer running aqlm's real CPU kernels (numba on one thread for 8-bit codebooks).

    Outputs only: PEFT's layer cannot backpropagate through aqlm's CPU kernels (they return a view
    and PEFT's in-place ``result += output`` then raises "Output 0 of _QuantizedMatmul is a view and
    is being modified inplace"); gradients are compared on the dense base in test_matches_peft.
    """
    numba = pytest.importorskip("numba")
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        ours = build(scheme, "multi")
        twin = peft_twin(ours, dense_base=False)
        x = torch.randn(2, 5, IN_FEATURES)
        with torch.no_grad():
            for rows in (x[:1, :3], x):  # aqlm's gemv path (<= 6 rows) and its gemm path
                assert_close_fp32(ours(rows), twin(rows), rtol=1e-4, what=f"{tuple(rows.shape)}")
    finally:
        numba.set_num_threads(threads)


def test_peft_layer_cannot_train_on_aqlm_cpu_kernels():
    """Why the test above compares outputs only (fails if PEFT or aqlm fix it: then compare gradients)."""
    twin = peft_twin(build(SCHEMES[0], "single"), dense_base=False)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        twin(torch.randn(2, 3, IN_FEATURES, requires_grad=True))


def test_bf16_base_with_fp32_adapters():
    """PEFT's usual setup: bf16 model, adapters kept in fp32 (PEFT casts x for the LoRA branch)."""
    ours = build(SCHEMES[1], "rslora_bias")
    ours.get_base_layer().to(torch.bfloat16)
    x, grad_out = torch.randn(3, IN_FEATURES), torch.randn(3, OUT_FEATURES)
    out, grads = run_with_grads(ours, x.to(torch.bfloat16), grad_out)
    twin = peft_twin(ours)
    twin.get_base_layer().to(torch.bfloat16)
    twin.base_layer.forward = peft_twin(ours, dtype=torch.bfloat16).base_layer.forward
    plain_out, plain_grads = run_with_grads(twin, x.to(torch.bfloat16), grad_out)
    exact_out, exact_grads = run_with_grads(peft_twin(ours, dtype=torch.float32), x, grad_out)
    assert out.dtype == plain_out.dtype == torch.bfloat16
    assert_low_precision_ok(out, plain_out, exact_out, what="output")
    for name, grad in grads.items():
        assert grad.dtype == plain_grads[name].dtype, name
        assert_low_precision_ok(grad, plain_grads[name], exact_grads[name], what=name)


def test_autocast_matches_peft():
    ours = build(SCHEMES[0], "single")
    x, grad_out = torch.randn(3, IN_FEATURES), torch.randn(3, OUT_FEATURES)
    exact_out, exact_grads = run_with_grads(peft_twin(ours), x, grad_out)
    twin = peft_twin(ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_with_grads(ours, x, grad_out)
        plain_out, plain_grads = run_with_grads(twin, x, grad_out)
    assert out.dtype == plain_out.dtype == torch.bfloat16
    assert_low_precision_ok(out, plain_out, exact_out, what="output")
    for name, grad in grads.items():
        assert grad.dtype == plain_grads[name].dtype, name
        assert_low_precision_ok(grad, plain_grads[name], exact_grads[name], what=name)


def test_state_dict_keys_match_peft():
    ours = build(SCHEMES[1], "multi")
    twin = peft_twin(ours)
    assert list(ours.state_dict()) == list(twin.state_dict())
    assert "lora_B.b.bias" in ours.state_dict() and "lora_B.a.bias" not in ours.state_dict()
    assert ours.scaling == twin.scaling == {"a": 2.0, "b": 0.5}
    rs = build(SCHEMES[1], "rslora_bias")
    assert rs.scaling["a"] == pytest.approx(8 / 2.0)
    assert repr(ours).startswith("lora.AqlmLoraLinear(")


def test_set_and_delete_adapter():
    ours = build(SCHEMES[0], "multi")
    x = torch.randn(5, IN_FEATURES)
    both = ours(x)
    ours.set_adapter("b")
    assert ours.active_adapters == ["b"]
    only_b = ours(x)
    twin = peft_twin(ours)
    assert_close_fp32(only_b, twin(x), what="only b")
    ours.set_adapter(["a", "b"])
    assert_close_fp32(ours(x), both, what="both again")
    ours.delete_adapter("a")
    assert list(ours.lora_A) == ["b"] and ours.active_adapters == ["b"]
    assert not any(".a." in k for k in ours.state_dict())
    assert_close_fp32(ours(x), only_b, what="after delete")
    ours.enable_adapters(False)
    base = ours.get_base_layer()
    expected = F.linear(x, dense_weight(base), base.bias)
    assert_close_fp32(ours(x), expected, what="disabled")


def test_inactive_or_missing_adapters_give_base_output():
    ours = build(SCHEMES[0], "single")
    base = ours.get_base_layer()
    x = torch.randn(3, IN_FEATURES)
    expected = F.linear(x, dense_weight(base), base.bias)
    ours.set_adapter("not_here")
    assert_close_fp32(ours(x), expected, what="unknown active adapter")
    ours.set_adapter("a")
    out = ours(x.unsqueeze(1), adapter_names=["nope", "__base__", "a"])
    assert_close_fp32(out[:2, 0], expected[:2], what="unknown/base rows")
    assert_close_fp32(out[2:, 0], ours(x[2:]), what="adapter row")
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        ours(x, adapter_names=["a"])


# ---------------------------------------------------------------------------------------------
# The base layer: read, never run, never written; aqlm's in-place code permutation.


def test_never_calls_or_mutates_base_layer():
    ours = build(SCHEMES[1], "multi")
    base = ours.get_base_layer()

    def refuse(*args, **kwargs):
        raise AssertionError("the base layer's forward was called")

    base.forward = refuse
    before = {k: (v.data_ptr(), v.clone()) for k, v in base.state_dict().items()}
    x = torch.randn(7, IN_FEATURES, requires_grad=True)
    ours(x).sum().backward()
    ours(x.unsqueeze(1), adapter_names=["a", "__base__", "b", "a", "b", "a", "a"]).sum().backward()
    for key, value in base.state_dict().items():
        assert value.data_ptr() == before[key][0], key
        assert torch.equal(value, before[key][1]), key
        assert value.grad is None, key


@pytest.mark.parametrize("out_features", [OUT_FEATURES, 8], ids=["rect", "square_groups"])
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.nbits == 8], ids=str)
def test_codes_permuted_by_aqlm_forward(scheme, out_features):
    """aqlm's CPU forward permutes 8-bit codes in place; ours reads them through a view."""
    pristine = make_quantized_linear(scheme, out_features=out_features)
    expected_codes = pristine.codes.clone()
    ran = copy.deepcopy(pristine)
    if scheme == SCHEMES[1] and out_features == OUT_FEATURES:
        with torch.no_grad():
            ran(torch.randn(2, IN_FEATURES))  # aqlm's own forward, which calls prepare_matmul_op
    else:
        ran.prepare_matmul_op(torch.randn(2, IN_FEATURES))  # the same, without compiling more numba kernels
    num_out, num_in = out_features // scheme.out_group_size, IN_FEATURES // scheme.in_group_size
    assert ran.gemv_op is not None
    assert tuple(ran.codes.shape) == (num_in, num_out, scheme.num_codebooks)
    assert torch.equal(ran.codes.permute(1, 0, 2), expected_codes)
    stored = ran.codes.data.clone()
    assert torch.equal(canonical_codes(ran), expected_codes)

    torch.manual_seed(1)
    ours = AqlmLoraLinear(ran, "a", r=4, lora_alpha=8, config=lora_config())
    torch.manual_seed(1)
    ref = AqlmLoraLinear(pristine, "a", r=4, lora_alpha=8, config=lora_config())
    x, grad_out = torch.randn(3, IN_FEATURES), torch.randn(3, out_features)
    out, grads = run_with_grads(ours, x, grad_out)
    ref_out, ref_grads = run_with_grads(ref, x, grad_out)
    assert torch.equal(out, ref_out)
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    assert torch.equal(ran.codes, stored), "the stored codes were modified"


def test_codes_of_wrong_shape_are_refused():
    layer = make_quantized_linear(SCHEMES[0])
    layer.codes.data = layer.codes.data[:, :-1].contiguous()
    ours = AqlmLoraLinear(layer, "a", r=2, config=lora_config(r=2))
    expected = rf"codes have shape \[{OUT_FEATURES}, 7, 1\], expected \[{OUT_FEATURES}, 8, 1\]"
    with pytest.raises(ValueError, match=expected):
        ours(torch.randn(2, IN_FEATURES))


# ---------------------------------------------------------------------------------------------
# Construction, init and refused options.


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"], ids=str)
def test_init_matches_peft_linear(init):
    base = make_quantized_linear(SCHEMES[0])
    dense = nn.Linear(IN_FEATURES, OUT_FEATURES)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init)
    torch.manual_seed(3)
    ours = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=config)
    torch.manual_seed(3)
    theirs = PeftLinear(dense, "a", r=4, lora_alpha=8, config=config)
    for key in ("lora_A.a.weight", "lora_B.a.weight"):
        mine, peft_value = ours.state_dict()[key], theirs.state_dict()[key]
        assert mine.dtype == peft_value.dtype == torch.float32, key
        assert torch.equal(mine, peft_value), key
    b_is_zero = not ours.lora_B["a"].weight.any()
    assert b_is_zero == (init in (True, "gaussian", "eva"))


def test_constructor_without_config_uses_keywords():
    base = make_quantized_linear(SCHEMES[1])
    layer = AqlmLoraLinear(base, "x", r=8, lora_alpha=4, lora_dropout=0.1, use_rslora=True, lora_bias=True)
    assert layer.r == {"x": 8} and layer.lora_alpha == {"x": 4}
    assert layer.scaling["x"] == pytest.approx(4 / 8**0.5)
    assert isinstance(layer.lora_dropout["x"], nn.Dropout) and layer.lora_dropout["x"].p == 0.1
    assert layer.lora_B["x"].bias is not None and not layer.lora_B["x"].weight.any()
    assert layer.in_features == IN_FEATURES and layer.out_features == OUT_FEATURES
    from_config = AqlmLoraLinear(base, "y", config=LoraConfig(r=2, lora_alpha=6))
    assert from_config.r == {"y": 2} and from_config.scaling == {"y": 3.0}
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        AqlmLoraLinear(base, "z")
    with pytest.raises(TypeError, match="needs an aqlm.QuantizedLinear"):
        AqlmLoraLinear(nn.Linear(4, 4), "z", r=2)


def test_wraps_a_peft_tuner_layer():
    inner = AqlmLoraLinear(make_quantized_linear(SCHEMES[0]), "a", r=2, config=lora_config(r=2))
    outer = AqlmLoraLinear(inner, "b", r=3, config=lora_config(r=3))
    assert outer.get_base_layer() is inner.get_base_layer()
    x = torch.randn(2, IN_FEATURES)
    base = inner.get_base_layer()
    delta = (x @ outer.lora_A["b"].weight.T) @ outer.lora_B["b"].weight.T * outer.scaling["b"]
    assert_close_fp32(outer(x), F.linear(x, dense_weight(base), base.bias) + delta, what="nested")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"use_dora": True}, "does not support DoRA"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*dense base weight"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'.*dense base weight"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'.*dense base weight"),
        ({"init_lora_weights": "corda"}, "init_lora_weights='corda'.*dense base weight"),
        (
            {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}},
            "init_lora_weights='loftq'.*dense base weight",
        ),
        ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga'.*dense base weight"),
        ({"init_lora_weights": "mica"}, "init_lora_weights='mica'.*dense base weight"),
        ({"alora_invocation_tokens": [1, 2]}, "plain LoRA only"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, dict) else None,
)
def test_refused_options(kwargs, match):
    base = make_quantized_linear(SCHEMES[0])
    before = copy.deepcopy(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=4, **kwargs)
    with pytest.raises(ValueError, match=match):
        AqlmLoraLinear(base, "a", r=4, config=config)
    plain = AqlmLoraLinear(base, "a", r=4, config=LoraConfig(r=4))
    with pytest.raises(ValueError, match=match):  # adding an adapter to an existing layer (PEFT's path)
        plain.update_layer("b", 4, lora_alpha=8, config=config)
    if "use_dora" in kwargs:
        with pytest.raises(ValueError, match=match):
            AqlmLoraLinear(base, "a", r=4, use_dora=True)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_merge_refused_and_unmerge_warns():
    ours = build(SCHEMES[1], "single")
    with pytest.raises(NotImplementedError, match="not representable in the ~2-bit codes.*inexact"):
        ours.merge()
    with pytest.raises(NotImplementedError, match="inexact"):
        ours.merge(safe_merge=True, adapter_names=["a"])
    assert ours.merged_adapters == [] and not ours.merged
    with pytest.warns(UserWarning, match="nothing to unmerge"):
        ours.unmerge()


def test_forward_rejects_extra_arguments():
    ours = build(SCHEMES[0], "single")
    with pytest.raises(TypeError, match="takes the input and `adapter_names` only"):
        ours(torch.randn(2, IN_FEATURES), torch.randn(2))
    with pytest.raises(ValueError, match="does not support `alora_offsets`"):
        ours(torch.randn(2, IN_FEATURES), alora_offsets=[1, 1])


# ---------------------------------------------------------------------------------------------
# Dropout: the op's Philox mask, p read from lora_dropout, only while training.


def _weights(layer, name="a"):
    base = layer.get_base_layer()
    return (
        (canonical_codes(base), base.codebooks, base.scales, base.bias),
        layer.lora_A[name].weight,
        layer.lora_B[name],
    )


def _dropout_layer(p: float, lora_bias: bool = True) -> AqlmLoraLinear:
    layer = AqlmLoraLinear(
        make_quantized_linear(SCHEMES[1]),
        "a",
        r=4,
        lora_alpha=8,
        config=lora_config(lora_dropout=p, lora_bias=lora_bias),
    )
    with torch.no_grad():
        layer.lora_B["a"].bias.normal_()
    return layer


def test_dropout_matches_reference_with_same_seed():
    layer = _dropout_layer(0.25).train()
    x = torch.randn(3, 4, IN_FEATURES)
    grad_out = torch.randn(3, 4, OUT_FEATURES)
    torch.manual_seed(11)
    seed = ops.draw_seed()
    torch.manual_seed(11)
    out, grads = run_with_grads(layer, x, grad_out)
    (codes, codebooks, scales, bias), A, B = _weights(layer)
    xr = x.clone().requires_grad_(True)
    params = [A, B.weight, B.bias]
    for p in params:
        p.grad = None
    ref = reference.lora_linear(xr, codes, codebooks, scales, bias, A, B.weight, 2.0, 0.25, B.bias, seed=seed)
    ref.backward(grad_out)
    assert_close_fp32(out, ref.detach(), what="output")
    assert_close_fp32(grads["input"], xr.grad, what="input")
    for name, p in zip(("lora_A.a.weight", "lora_B.a.weight", "lora_B.a.bias"), params):
        assert_close_fp32(grads[name], p.grad, what=name)
    no_dropout = reference.lora_linear(x, codes, codebooks, scales, bias, A, B.weight, 2.0, 0.0, B.bias)
    assert (out - no_dropout).abs().max() > 1e-3, "dropout had no effect while training"


def test_dropout_only_while_training():
    layer = _dropout_layer(0.5)
    x = torch.randn(6, IN_FEATURES)
    layer.eval()
    eval_out = layer(x)
    (codes, codebooks, scales, bias), A, B = _weights(layer)
    expected = reference.lora_linear(x, codes, codebooks, scales, bias, A, B.weight, 2.0, 0.0, B.bias)
    assert_close_fp32(eval_out, expected, what="eval")
    layer.train()
    first, second = layer(x), layer(x)
    assert (first - second).abs().max() > 1e-3, "two training steps drew the same mask"


def test_dropout_statistics():
    """With A = I and B = [I; 0] the LoRA term exposes the mask: keep rate 1 - p, kept values x / (1 - p)."""
    p, n_rows, n_in = 0.3, 64, 48
    base = make_quantized_linear(SCHEMES[1], in_features=n_in, out_features=64, bias=False)
    layer = AqlmLoraLinear(
        base, "a", r=n_in, lora_alpha=n_in, config=lora_config(r=n_in, lora_alpha=n_in, lora_dropout=p)
    )
    with torch.no_grad():
        layer.lora_A["a"].weight.copy_(torch.eye(n_in))
        layer.lora_B["a"].weight.copy_(torch.cat([torch.eye(n_in), torch.zeros(64 - n_in, n_in)]))
    x = torch.rand(n_rows, n_in) + 0.5
    layer.eval()
    base_out = layer(x) - torch.cat([x, torch.zeros(n_rows, 64 - n_in)], dim=1)
    layer.train()
    delta = (layer(x) - base_out)[:, :n_in]
    kept = delta.abs() > 1e-3
    assert abs(kept.float().mean().item() - (1 - p)) < 0.04
    assert_close_fp32(delta[kept], (x / (1 - p))[kept], rtol=1e-5, what="kept values")


def test_several_adapters_share_one_mask_per_dropout_group():
    base = make_quantized_linear(SCHEMES[0])
    layer = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=lora_config(lora_dropout=0.2, lora_bias=True))
    layer.update_layer("b", 2, lora_alpha=6, config=lora_config(r=2, lora_alpha=6, lora_dropout=0.2))
    layer.update_layer("c", 3, lora_alpha=3, config=lora_config(r=3, lora_alpha=3, lora_dropout=0.5, lora_bias=True))
    with torch.no_grad():
        for name in ("a", "c"):
            layer.lora_B[name].bias.normal_()
    layer.set_adapter(["a", "b", "c"])
    layer.train()
    x, grad_out = torch.randn(5, IN_FEATURES), torch.randn(5, OUT_FEATURES)
    torch.manual_seed(5)
    seed_ab, seed_c = ops.draw_seed(), ops.draw_seed()
    torch.manual_seed(5)
    out, grads = run_with_grads(layer, x, grad_out)

    (codes, codebooks, scales, bias), _, _ = _weights(layer)
    params = adapter_params(layer)
    for p in params.values():
        p.grad = None
    xr = x.clone().requires_grad_(True)
    s = layer.scaling
    A_ab = torch.cat([params["lora_A.a.weight"], params["lora_A.b.weight"]])
    B_ab = torch.cat([params["lora_B.a.weight"] * s["a"], params["lora_B.b.weight"] * s["b"]], dim=1)
    ref = reference.lora_linear(
        xr, codes, codebooks, scales, bias, A_ab, B_ab, 1.0, 0.2, params["lora_B.a.bias"] * s["a"], seed=seed_ab
    )
    xc = reference.apply_dropout(xr, 0.5, seed_c, 0)
    ref = ref + s["c"] * ((xc @ params["lora_A.c.weight"].T) @ params["lora_B.c.weight"].T + params["lora_B.c.bias"])
    ref.backward(grad_out)
    assert_close_fp32(out, ref.detach(), what="output")
    assert_close_fp32(grads["input"], xr.grad, what="input")
    for name, p in params.items():
        assert_close_fp32(grads[name], p.grad, what=name)


def test_dropout_mask_is_replayed_under_checkpointing():
    layer = _dropout_layer(0.4).train()
    x, grad_out = torch.randn(4, IN_FEATURES), torch.randn(4, OUT_FEATURES)
    torch.manual_seed(9)
    out, grads = run_with_grads(layer, x, grad_out)
    for p in adapter_params(layer).values():
        p.grad = None
    torch.manual_seed(9)
    xc = x.clone().requires_grad_(True)
    out_ckpt = torch.utils.checkpoint.checkpoint(layer, xc, use_reentrant=False)
    out_ckpt.backward(grad_out)
    assert torch.equal(out_ckpt.detach(), out)
    assert torch.equal(xc.grad, grads["input"])
    for name, p in adapter_params(layer).items():
        assert torch.equal(p.grad, grads[name]), name


# ---------------------------------------------------------------------------------------------
# Memory: nothing saved without grad; with grad, nothing of size N x in beyond x itself.


class _SavedTensors:
    def __init__(self):
        self.saved = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        self.saved.append(t)
        return t

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_nothing_saved_without_grad(context):
    layer = _dropout_layer(0.3).train()
    x = torch.randn(8, IN_FEATURES, requires_grad=True)
    with context(), _SavedTensors() as tracker:
        out = layer(x)
        mixed = layer(x.unsqueeze(1), adapter_names=["a", "__base__"] * 4)
    assert out.grad_fn is None and mixed.grad_fn is None
    assert tracker.saved == []


def test_training_saves_no_activation_copies():
    layer = build(SCHEMES[0], "multi")
    for name in ("a", "b"):
        layer.lora_dropout[name] = nn.Dropout(0.3)
    layer.train()
    n_rows = 64
    x = torch.randn(n_rows, IN_FEATURES, requires_grad=True)
    base = layer.get_base_layer()
    allowed = {t.data_ptr() for t in (x, base.codes, base.codebooks, base.scales, base.bias)}
    with _SavedTensors() as tracker:
        out = layer(x)
    big = [tuple(t.shape) for t in tracker.saved if t.numel() >= n_rows * IN_FEATURES and t.data_ptr() not in allowed]
    assert (n_rows, 10) in [tuple(t.shape) for t in tracker.saved], "xa = dropout(x) @ A^T [N, r] was not saved"
    assert big == [], f"saved activation-sized tensors besides x: {big}"
    out.sum().backward()
    assert layer.lora_A["b"].weight.grad is not None


def test_canonical_codes_of_fresh_layer_is_the_stored_tensor():
    layer = make_quantized_linear(SCHEMES[1])
    assert canonical_codes(layer) is layer.codes
    assert isinstance(layer, aqlm.QuantizedLinear)
