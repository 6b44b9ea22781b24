"""DoRA (``use_dora=True``) on AqlmLoraLinear against PEFT's DoRA on a dense nn.Linear holding the
dequantized weight: outputs and every gradient (x, A, B, m), over the schemes, fp32 and bf16, with
several adapters, mixed batches, rsLoRA and dropout (same mask); float64 gradcheck; the norms."""

from typing import Optional

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import Tensor, nn

from aqlm_lora import AqlmLoraLinear, functional, ops
from aqlm_lora.lora import dora
from aqlm_lora.reference import dropout_scaled
from tests.support.layers import (
    DTYPE_IDS,
    DTYPES,
    IN_FEATURES,
    OUT_FEATURES,
    SCHEME_IDS,
    SCHEMES,
    adapter_params,
    dense_peft_twin,
    dense_weight,
    make_quantized_linear,
    mixed_rows_oracle,
    mixed_rows_output,
    run_with_grads,
)
from tests.support.tolerances import assert_close_fp32, assert_low_precision_ok, assert_outputs_and_grads_ok

MODES = ["single", "rslora", "multi", "plain_first", "mixed", "disabled"]
MIXED_NAMES = ["b", "a", "__base__", "p"]


def dora_config(**kwargs) -> LoraConfig:
    defaults = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    defaults.update(kwargs)
    return LoraConfig(**defaults)


def _randomize(layer: AqlmLoraLinear, generator: torch.Generator) -> None:
    """Magnitudes away from the norms (else m / ||W + sBA|| = 1 and DoRA's extra terms vanish)."""
    with torch.no_grad():
        for module in layer.lora_magnitude_vector.values():
            module.weight.mul_(torch.rand(module.weight.shape, generator=generator) + 0.5)


def build(scheme, mode: str = "single", dtype: torch.dtype = torch.float32, dropout: float = 0.0) -> AqlmLoraLinear:
    base = make_quantized_linear(scheme)
    layer = AqlmLoraLinear(
        base, "a", r=4, lora_alpha=8, config=dora_config(use_rslora=mode == "rslora", lora_dropout=dropout)
    )
    if mode in ("multi", "plain_first", "mixed"):
        layer.update_layer("b", 6, lora_alpha=3, config=dora_config(r=6, lora_alpha=3, lora_dropout=dropout))
        layer.update_layer("p", 3, lora_alpha=5, config=LoraConfig(r=3, lora_alpha=5, init_lora_weights=False))
    _randomize(layer, torch.Generator().manual_seed(1))
    if mode == "multi":
        layer.set_adapter(["a", "p", "b"])  # DoRA first (fused), plain LoRA after it, DoRA on the sum
    if mode == "plain_first":
        layer.set_adapter(["p", "a"])
    if mode == "disabled":
        layer.enable_adapters(False)
    return layer.to(dtype)


def trainable(layer: nn.Module) -> dict[str, Tensor]:
    return adapter_params(layer)


def run(layer: nn.Module, x: Tensor, grad_out: Tensor, **kwargs) -> tuple[Tensor, dict[str, Optional[Tensor]]]:
    return run_with_grads(layer, x, grad_out, **kwargs)


def oracle(ours: AqlmLoraLinear, x: Tensor, grad_out: Tensor, dtype: torch.dtype, mode: str):
    """PEFT's dense layer; mixed batches (which PEFT refuses with DoRA) one row at a time."""
    twin = dense_peft_twin(ours, dtype)
    x = x.to(dtype)
    if mode != "mixed":
        return run(twin, x, grad_out)
    return mixed_rows_oracle(twin, x, grad_out, MIXED_NAMES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_matches_peft_dora(scheme, dtype, mode):
    ours = build(scheme, mode, dtype)
    x = torch.randn(4, 3, IN_FEATURES)
    grad_out = torch.randn(4, 3, OUT_FEATURES)
    kwargs = {"adapter_names": MIXED_NAMES} if mode == "mixed" else {}
    out, grads = run(ours, x.to(dtype), grad_out, **kwargs)
    if mode == "disabled":
        assert all(g is None for n, g in grads.items() if n != "input")
    exact = oracle(ours, x, grad_out, torch.float32, mode)
    assert_outputs_and_grads_ok(out, grads, exact, lambda: oracle(ours, x, grad_out, dtype, mode), dtype)


def _twin_output(ours: AqlmLoraLinear, x: Tensor, dtype: torch.dtype, mode: str) -> Tensor:
    twin = dense_peft_twin(ours, dtype)
    x = x.to(dtype)
    return mixed_rows_output(twin, x, MIXED_NAMES) if mode == "mixed" else twin(x)


@pytest.mark.parametrize("mode", ["single", "multi", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_inference_matches_peft_dora(scheme, dtype, mode):
    """eval() under no_grad: the cached norms, and the first adapter's rescaling folded into the
    scales and B (schemes with one output row per scale)."""
    ours = build(scheme, mode, dtype).eval()
    x = torch.randn(4, 3, IN_FEATURES)
    kwargs = {"adapter_names": MIXED_NAMES} if mode == "mixed" else {}
    with torch.no_grad():
        out = ours(x.to(dtype), **kwargs)
        assert torch.equal(ours(x.to(dtype), **kwargs), out), "the cached norms changed the output"
        exact = _twin_output(ours, x, torch.float32, mode)
        plain = _twin_output(ours, x, dtype, mode)
    if dtype == torch.float32:
        assert_close_fp32(out, exact, what="output")
    else:
        assert_low_precision_ok(out, plain, exact, what="output")


def _masked_twin(twin: PeftLinear, masks: dict[str, Tensor], p: float) -> None:
    """Give the twin's dropout modules our Philox masks (PEFT's nn.Dropout would draw its own)."""

    class SameMask(nn.Module):
        def __init__(self, keep: Tensor) -> None:
            super().__init__()
            self.keep = keep

        def forward(self, x: Tensor) -> Tensor:
            return dropout_scaled(x, self.keep, p)

    for name, keep in masks.items():
        twin.lora_dropout[name] = SameMask(keep)


@pytest.mark.parametrize("multi", [False, True], ids=["single", "two_dora"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_dropout_matches_peft_with_same_mask(scheme, dtype, multi):
    """While training, PEFT recomputes the base on the dropped input for the DoRA term; so do we."""
    p = 0.25
    ours = build(scheme, "multi" if multi else "single", dtype, dropout=p).train()
    if multi:
        ours.set_adapter(["a", "b"])
    x = torch.randn(4, 3, IN_FEATURES)
    grad_out = torch.randn(4, 3, OUT_FEATURES)
    names = list(ours.active_adapters)
    torch.manual_seed(5)
    masks = {name: ops.dropout_mask(x, p, functional.draw_seed()) for name in names}  # one draw per adapter, in order
    torch.manual_seed(5)
    out, grads = run(ours, x.to(dtype), grad_out)
    results = []
    for twin_dtype in (torch.float32, dtype):
        twin = dense_peft_twin(ours, twin_dtype)
        _masked_twin(twin, masks, p)
        results.append(run(twin, x.to(twin_dtype), grad_out))
    assert_outputs_and_grads_ok(out, grads, results[0], lambda: results[1], dtype)
    ours.eval()
    assert (ours(x.to(dtype)) - out).abs().max() > 1e-3, "dropout had no effect while training"


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("scheme", [SCHEMES[1], SCHEMES[5]], ids=str)
def test_gradcheck_float64(scheme, dropout):
    """First-order gradients of x, A, B and m in float64, the norm held constant (PEFT detaches it)."""
    ours = build(scheme, "multi", dropout=dropout).to(torch.float64).train()
    ours.set_adapter(["a", "p", "b"])
    params = trainable(ours)
    names = [n for n in params if n.split(".")[1] in ("a", "b", "p")]
    fixed = {}
    for name in ("a", "b"):
        fixed[name] = ours.dora_norms.row_norms(name, ours.quantized_weight(), *_ab(ours, name), cache=False)
    ours.dora_norms.row_norms = lambda name, *args, **kwargs: fixed[name]

    def f(x, *tensors):
        torch.manual_seed(3)  # the same dropout masks at every evaluation
        return torch.func.functional_call(ours, dict(zip(names, tensors)), (x,))

    x = torch.randn(3, IN_FEATURES, dtype=torch.float64, requires_grad=True)
    inputs = [x] + [params[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def _ab(layer: AqlmLoraLinear, name: str) -> tuple[Tensor, Tensor, float]:
    return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_norms_equal_dense_norms_in_float64(scheme):
    ours = build(scheme, "rslora").to(torch.float64)
    weight = dense_weight(ours.get_base_layer(), torch.float64)
    lora_A, lora_B, scaling = _ab(ours, "a")
    expected = torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)
    norms = ours.dora_norms.row_norms("a", ours.quantized_weight(), lora_A, lora_B, scaling, cache=False)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("keep", [1e-1, 1e-3], ids=lambda k: f"keep{k:g}")
def test_norms_stay_accurate_where_the_adapter_cancels_a_row(keep):
    """The expansion's terms are as large as ||W_o||^2 and cancel when B A nearly cancels row 0:
    float32 norms must still be no worse than twice PEFT's direct float32 norm."""
    ours = build(SCHEMES[1], "single")
    weight = dense_weight(ours.get_base_layer(), torch.float64)
    lora_A = torch.zeros(4, weight.shape[1], dtype=torch.float64)
    lora_B = torch.zeros(weight.shape[0], 4, dtype=torch.float64)
    lora_A[0], lora_B[0, 0] = weight[0], -(1.0 - keep)  # row 0 of W + B A is about keep * W_0
    lora_A, lora_B = lora_A.float(), lora_B.float()  # the inputs both sides get; the truth in float64
    exact = torch.linalg.norm(weight + lora_B.double() @ lora_A.double(), dim=1)
    dense32 = torch.linalg.norm(weight.float() + lora_B @ lora_A, dim=1).double()
    norms = ours.dora_norms.row_norms("a", ours.quantized_weight(), lora_A, lora_B, 1.0, cache=False)
    ours_error, peft_error = (norms[0].double() / exact[0] - 1).abs(), (dense32[0] / exact[0] - 1).abs()
    assert norms.dtype == torch.float32 and ours_error <= 2 * peft_error + 1e-7, (ours_error, peft_error)


@pytest.mark.parametrize("init", [False, True, "gaussian", "orthogonal"], ids=str)
def test_magnitude_starts_as_peft_does(init):
    """m = ||W + s B A|| per row for the adapter's initial A and B, whatever the init."""
    base = make_quantized_linear(SCHEMES[0])
    layer = AqlmLoraLinear(base, "a", r=4, lora_alpha=8, config=dora_config(init_lora_weights=init))
    lora_A, lora_B, scaling = _ab(layer, "a")
    weight = dense_weight(base)
    expected = torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)
    assert_close_fp32(layer.lora_magnitude_vector["a"].weight.detach(), expected.detach(), what="m")
    assert layer.lora_magnitude_vector["a"].weight.requires_grad


def dequantize_sizes(monkeypatch, block_elements: int) -> list[int]:
    """Sets dora's block size; the returned list collects the size of every weight dora dequantizes."""
    seen: list[int] = []
    dequantize = ops.dequantize

    def recording(codes, codebooks, scales):
        out = dequantize(codes, codebooks, scales)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(dora, "_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(dora.ops, "dequantize", recording)
    return seen


def test_weight_norms_never_hold_more_than_one_block(monkeypatch):
    base = make_quantized_linear(SCHEMES[5], in_features=64, out_features=160)
    layer = AqlmLoraLinear(base, "a", r=4, config=dora_config())
    seen = dequantize_sizes(monkeypatch, block_elements=64 * 20)
    layer.dora_norms.clear()
    sq = layer.dora_norms.weight_sq(*layer.quantized_weight())
    assert seen and max(seen) <= 64 * 20 and sum(seen) == 64 * 160
    assert sq.dtype == torch.float64  # the norm's terms cancel: see dora._NORM_DTYPE
    torch.testing.assert_close(sq, dense_weight(base, torch.float64).pow(2).sum(1), rtol=1e-12, atol=1e-12)


def test_cancelling_rows_are_recomputed_one_block_at_a_time(monkeypatch):
    """Every row cancelling (contrived) dequantized the whole weight in float64 at once."""
    base = make_quantized_linear(SCHEMES[5], in_features=64, out_features=160)
    weight = dense_weight(base, torch.float64)
    layer = AqlmLoraLinear(base, "a", r=64, config=dora_config(r=64))
    lora_A = weight.float()[:64].clone()  # B A = -0.999 W on the first 64 rows: their terms cancel
    lora_B = torch.zeros(160, 64)
    lora_B[:64] = -0.999 * torch.eye(64)
    weight_sq = layer.dora_norms.weight_sq(*layer.quantized_weight())
    seen = dequantize_sizes(monkeypatch, block_elements=64 * 20)
    norms = dora.lora_row_norms(*layer.quantized_weight(), weight_sq, lora_A, lora_B, 1.0)
    assert len(seen) > 2 and max(seen) <= 64 * 20, seen  # the gemm of W A^T dequantizes nothing here
    exact = torch.linalg.norm(weight + lora_B.double() @ lora_A.double(), dim=1)
    torch.testing.assert_close(norms.double(), exact, rtol=1e-5, atol=0)


def test_norm_caches(monkeypatch):
    """||W||^2 once per layer (again when the codebooks change); adapter norms cached in eval only."""
    layer = build(SCHEMES[1]).eval()
    calls = {"weight": 0, "adapter": 0}
    weight_sq, row_norms = dora.weight_row_sq_norms, dora.lora_row_norms

    def count(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(dora, "weight_row_sq_norms", count("weight", weight_sq))
    monkeypatch.setattr(dora, "lora_row_norms", count("adapter", row_norms))
    layer.dora_norms.clear()
    x = torch.randn(5, IN_FEATURES)
    first = layer(x)
    assert torch.equal(layer(x), first)
    assert calls == {"weight": 1, "adapter": 1}
    with torch.no_grad():
        layer.lora_B["a"].weight.mul_(2.0)  # an in-place change (an optimizer step) invalidates the adapter norms
    changed = layer(x)
    assert calls == {"weight": 1, "adapter": 2}
    assert_close_fp32(changed, dense_peft_twin(layer, torch.float32)(x).detach(), what="after B changed")
    with torch.no_grad():
        layer.get_base_layer().codebooks.mul_(0.5)
    layer(x)
    assert calls == {"weight": 2, "adapter": 3}
    layer.train()
    layer(x)
    layer(x)
    assert calls == {"weight": 2, "adapter": 5}, "training recomputes the adapter norms every step"


def test_lora_bias_with_dora_is_refused():
    base = make_quantized_linear(SCHEMES[0])
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        LoraConfig(r=4, use_dora=True, lora_bias=True)
    config = dora_config()
    config.lora_bias = True  # edited after the config's own check
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        AqlmLoraLinear(base, "a", r=4, config=config)


def test_dora_state_dict_keys_are_peft_keys():
    ours = build(SCHEMES[0], "multi")
    twin = dense_peft_twin(ours, torch.float32)
    ours_keys = {k for k in ours.state_dict() if not k.startswith("base_layer.")}
    twin_keys = {k for k in twin.state_dict() if not k.startswith("base_layer.")}
    assert ours_keys == twin_keys
    assert "lora_magnitude_vector.a.weight" in ours_keys and "lora_magnitude_vector.p.weight" not in ours_keys


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile_matches_eager_and_follows_updates(training):
    """The caches run outside the graph (torch.compiler.disable): no guard on data pointers or versions
    (which recompiled every step), and an in-place update between calls is still seen."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ours = build(SCHEMES[1], "single").train(training)
    compiled = torch.compile(ours, backend="aot_eager")
    x = torch.randn(5, ours.in_features)
    for step in range(3):
        with torch.no_grad():
            assert torch.equal(compiled(x), ours(x)), step
            ours.lora_B["a"].weight.add_(0.01)  # what an optimizer step does
    breaks = [reason for reason in counters["graph_break"] if "disable" not in reason]
    assert not breaks, breaks
