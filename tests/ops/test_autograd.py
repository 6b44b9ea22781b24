"""The differentiable entry points: gradcheck in float64 (with dropout), agreement with the
reference autograd graph, what is saved for backward, and torch.compile."""

from __future__ import annotations

import pytest
import torch

import aqlm_lora
from aqlm_lora import ops
from aqlm_lora import reference as ref
from tests.support.tolerances import assert_close_fp32
from tests.support.weights import SCHEME_IDS, SCHEMES, devices, random_weight

device_p = pytest.mark.parametrize("device", devices())


def _lora_inputs(scheme, device, dtype=torch.float64, rows=(3, 2), r=3):
    w = random_weight(scheme, 16, 32, dtype, device, bias=True)
    x = torch.randn(*rows, w.in_features, dtype=dtype, device=device, requires_grad=True)
    lora_A = (torch.randn(r, w.in_features, dtype=dtype, device=device) / 4).requires_grad_()
    lora_B = torch.randn(w.out_features, r, dtype=dtype, device=device).requires_grad_()
    lora_bias = torch.randn(w.out_features, dtype=dtype, device=device).requires_grad_()
    bias = w.bias.clone().requires_grad_()
    return w, x, bias, lora_A, lora_B, lora_bias


@device_p
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_gradcheck_lora_linear(scheme, dropout_p, device):
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(scheme, device)

    def fn(x, bias, lora_A, lora_B, lora_bias):
        return aqlm_lora.aqlm_lora_linear(
            x, *w.args(), bias, lora_A, lora_B, 0.75, dropout_p, lora_bias, training=True, seed=5
        )

    assert torch.autograd.gradcheck(fn, (x, bias, lora_A, lora_B, lora_bias))


@device_p
@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=SCHEME_IDS[:2])
def test_gradcheck_aqlm_linear(scheme, device):
    w, x, bias, *_ = _lora_inputs(scheme, device)
    assert torch.autograd.gradcheck(lambda x, b: aqlm_lora.aqlm_linear(x, *w.args(), b), (x, bias))


@device_p
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_grads_match_reference_graph(scheme, device):
    """fp32 gradients of the fused path equal autograd through reference.lora_linear (dropout on)."""
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(scheme, device, torch.float32, rows=(5, 7))
    leaves = (x, bias, lora_A, lora_B, lora_bias)
    g = torch.randn(5, 7, w.out_features, device=device)
    ours = aqlm_lora.aqlm_lora_linear(x, *w.args(), bias, lora_A, lora_B, 2.0, 0.2, lora_bias, seed=11, offset=4)
    ours_grads = torch.autograd.grad(ours, leaves, g)
    theirs = ref.lora_linear(x, *w.args(), bias, lora_A, lora_B, 2.0, 0.2, lora_bias, seed=11, offset=4)
    their_grads = torch.autograd.grad(theirs, leaves, g)
    assert_close_fp32(ours, theirs)
    for a, b in zip(ours_grads, their_grads):
        assert_close_fp32(a, b)


def test_eval_mode_has_no_dropout():
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], "cpu", torch.float32)
    args = (x, *w.args(), bias, lora_A, lora_B, 1.0, 0.5, lora_bias)
    eval_out = aqlm_lora.aqlm_lora_linear(*args, training=False)
    no_drop = aqlm_lora.aqlm_lora_linear(*args[:-2], 0.0, lora_bias)
    torch.testing.assert_close(eval_out, no_drop, rtol=0, atol=0)
    assert not torch.equal(aqlm_lora.aqlm_lora_linear(*args, training=True, seed=1), eval_out)


def test_seed_is_drawn_from_torch_generator():
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], "cpu", torch.float32)
    args = (x, *w.args(), bias, lora_A, lora_B, 1.0, 0.5, lora_bias)
    torch.manual_seed(3)
    first = aqlm_lora.aqlm_lora_linear(*args)
    second = aqlm_lora.aqlm_lora_linear(*args)
    torch.manual_seed(3)
    again = aqlm_lora.aqlm_lora_linear(*args)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_saves_only_input_and_xa():
    """Nothing of size N x in is saved for backward except x itself."""
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], "cpu", torch.float32, rows=(64,), r=2)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        aqlm_lora.aqlm_lora_linear(x, *w.args(), bias, lora_A, lora_B, 1.0, 0.1, lora_bias, seed=2)
    weight = (w.codes, w.codebooks, w.scales)  # references to the frozen weight, not copies
    big = [t for t in saved if t.numel() >= x.numel() and not any(t is p for p in weight)]
    assert len(big) == 1 and big[0] is x, [tuple(t.shape) for t in big]


def test_no_grad_saves_nothing():
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], "cpu", torch.float32)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = aqlm_lora.aqlm_lora_linear(x, *w.args(), bias, lora_A, lora_B, 1.0, 0.1, lora_bias, seed=2)
    assert saved == [] and out.grad_fn is None


def test_weight_gradients_are_refused():
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], "cpu", torch.float32)
    codebooks = w.codebooks.clone().requires_grad_()
    with pytest.raises(ValueError, match="codebooks or scales are not supported"):
        aqlm_lora.aqlm_lora_linear(x, w.codes, codebooks, w.scales, bias, lora_A, lora_B, 1.0)
    with pytest.raises(ValueError, match="codebooks or scales are not supported"):
        aqlm_lora.aqlm_linear(x, w.codes, codebooks, w.scales, bias)
    scales = w.scales.clone().requires_grad_()  # the ops themselves refuse too, not only the functional API
    for call in (
        lambda: ops.aqlm_gemm(x, w.codes, w.codebooks, scales, None),
        lambda: ops.aqlm_gemm_t(torch.ones(3, w.out_features), w.codes, codebooks, w.scales),
        lambda: ops.lora_forward(x, w.codes, codebooks, w.scales, None, lora_A, lora_B, None, 1.0, 0.0, 0, 0),
    ):
        with pytest.raises(ValueError, match="codebooks or scales are not supported"):
            call()


@device_p
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_torch_compile_fullgraph(dropout_p, layout, device):
    torch._dynamo.reset()
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], device, torch.float32, rows=(4, 5))
    if layout == "transposed":  # non-contiguous LoRA weights and input: the fake kernels' strides must match
        lora_A = lora_A.detach().t().contiguous().t().requires_grad_()
        lora_B = lora_B.detach().t().contiguous().t().requires_grad_()
        x = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()

    def step(x, lora_A, lora_B):
        y = ops.aqlm_lora_linear(x, *w.args(), w.bias, lora_A, lora_B, 0.5, dropout_p, None, seed=7)
        return y.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(x, lora_A, lora_B)
    eager_grads = torch.autograd.grad(eager_loss, (x, lora_A, lora_B))
    loss = compiled(x, lora_A, lora_B)
    grads = torch.autograd.grad(loss, (x, lora_A, lora_B))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_draws_dropout_seeds():
    """Training with dropout and no seed (what the layer does): the seed drawn inside the graph is a
    symbolic int (the ops' seed/offset are SymInt), each call draws a new mask, and the compiled step
    equals the eager one drawn from the same generator state."""
    torch._dynamo.reset()
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], "cpu", torch.float32, rows=(4, 5))

    def step(x, lora_A, lora_B):
        y = aqlm_lora.aqlm_lora_linear(x, *w.args(), w.bias, lora_A, lora_B, 0.5, 0.3)
        return y.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        eager_loss = step(x, lora_A, lora_B)
        eager_grads = torch.autograd.grad(eager_loss, (x, lora_A, lora_B))
        torch.manual_seed(seed)
        loss = compiled(x, lora_A, lora_B)
        grads = torch.autograd.grad(loss, (x, lora_A, lora_B))
        torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        losses.append(loss.item())
    assert losses[0] != losses[1], "two seeds drew the same dropout mask"


@pytest.mark.parametrize("threads", [1, 2])
def test_grad_mode_on_gemm_path_with_threads(threads):
    """Worker threads must not record autograd (they do not inherit the caller's dispatch state)."""
    w = random_weight(SCHEMES[0], 256, 64, bias=True)  # several row blocks, GEMM path
    x = torch.randn(48, 64, requires_grad=True)
    lora_A = torch.randn(4, 64, requires_grad=True)
    lora_B = torch.randn(256, 4, requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = aqlm_lora.aqlm_lora_linear(x, *w.args(), w.bias, lora_A, lora_B, 0.5)
        out.sum().backward()
        base = aqlm_lora.aqlm_linear(x, *w.args(), w.bias)
    finally:
        torch.set_num_threads(before)
    assert_close_fp32(base, ref.aqlm_gemm(x.detach(), *w.args(), w.bias))
    assert x.grad is not None and lora_A.grad is not None and lora_B.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ops_ignore_autocast(dtype):
    """Under autocast the ops compute in their inputs' dtypes, exactly as without it."""
    w = random_weight(SCHEMES[1], 64, 64, bias=True)
    x = torch.randn(20, 64, requires_grad=True)
    lora_A = torch.randn(4, 64, requires_grad=True)
    lora_B = torch.randn(64, 4, requires_grad=True)
    plain = aqlm_lora.aqlm_lora_linear(x, *w.args(), w.bias, lora_A, lora_B, 0.5)
    with torch.autocast("cpu", dtype=dtype):
        auto = aqlm_lora.aqlm_lora_linear(x, *w.args(), w.bias, lora_A, lora_B, 0.5)
        auto.sum().backward()
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)
    assert lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_bias_grads_accumulate_in_fp32(dtype):
    """lora_bias / bias gradients are row sums: in fp16 8000 rows of 20 overflow (160000 > 65504)
    and bf16 loses digits; they must be summed in fp32 like the rest of the op."""
    w = random_weight(SCHEMES[1], 16, 32, dtype, bias=True)
    rows = 8000
    x = torch.randn(rows, w.in_features, dtype=dtype)
    lora_A = torch.zeros(4, w.in_features, requires_grad=True)
    lora_B = torch.zeros(w.out_features, 4, requires_grad=True)
    lora_bias = torch.zeros(w.out_features, requires_grad=True)  # fp32, as PEFT keeps LoRA weights
    bias = w.bias.float().requires_grad_()
    out = aqlm_lora.aqlm_lora_linear(x, *w.args(), bias, lora_A.to(dtype), lora_B.to(dtype), 2.0, 0.0, lora_bias)
    grad = torch.full_like(out, 20.0)
    grad[::3] = 20.0 + 1 / 64  # digits that a bf16 running sum loses
    out.backward(grad)
    exact = grad.double().sum(0)
    torch.testing.assert_close(lora_bias.grad.double(), 2.0 * exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(bias.grad.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("with_lora", [False, True], ids=["lora_forward", "lora_forward_no_lora_grad"])
def test_double_backward_through_lora_is_refused(with_lora):
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], "cpu")
    if not with_lora:
        lora_A.requires_grad_(False), lora_B.requires_grad_(False)
    out = aqlm_lora.aqlm_lora_linear(x, *w.args(), bias, lora_A, lora_B, 0.5, 0.0, lora_bias)
    with pytest.raises(NotImplementedError, match="double backward .* through lora_forward is not supported"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_first_order_backward_with_grad_mode_on_still_works():
    """A plain backward() never runs the backward in grad mode: nothing to refuse."""
    w, x, bias, lora_A, lora_B, lora_bias = _lora_inputs(SCHEMES[1], "cpu")
    aqlm_lora.aqlm_lora_linear(x, *w.args(), bias, lora_A, lora_B, 0.5, 0.0, lora_bias).sum().backward()
    assert x.grad is not None and lora_A.grad is not None


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=SCHEME_IDS[:2])
def test_gradgradcheck_aqlm_linear(scheme):
    """The base layer is linear in x: its second-order gradients exist and are exact."""
    w = random_weight(scheme, 16, 32, torch.float64, bias=True)
    x = torch.randn(3, w.in_features, dtype=torch.float64, requires_grad=True)
    bias = w.bias.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, b: aqlm_lora.aqlm_linear(x, *w.args(), b), (x, bias))


def _forward_ad_calls(w, x, lora_A, lora_B):
    """(name, function of one tensor, that tensor) for each entry point, differentiated w.r.t. x or A."""
    k_A, k_B = torch.stack([lora_A, lora_A / 2]), torch.stack([lora_B.T, lora_B.T * 3])
    indices = torch.tensor([0, -1, 1], dtype=torch.int64)
    x2 = x.reshape(-1, w.in_features)[:3]
    return [
        ("aqlm_gemm", lambda t: aqlm_lora.aqlm_linear(t, *w.args(), None), x),
        ("lora_forward", lambda t: aqlm_lora.aqlm_lora_linear(t, *w.args(), None, lora_A, lora_B, 0.5), x),
        ("lora_forward", lambda t: aqlm_lora.aqlm_lora_linear(x, *w.args(), None, t, lora_B, 0.5), lora_A),
        (
            "lora_mixed_forward",
            lambda t: aqlm_lora.aqlm_lora_mixed_linear(
                t, *w.args(), None, k_A, k_B, torch.ones(2, dtype=t.dtype), indices
            ),
            x2,
        ),
        ("dequantize", lambda t: ops.dequantize(w.codes, w.codebooks, t), w.scales),
    ]


@pytest.mark.parametrize("mode", ["func.jvp", "func.jacfwd", "forward_ad"])
def test_forward_mode_ad_is_refused(mode):
    """torch drops forward-mode tangents of torch.library ops silently (a zero or None tangent, where
    the true one is x'W^T + ...): every entry point refuses them instead."""
    import torch.autograd.forward_ad as fwAD

    w, x, _, lora_A, lora_B, _ = _lora_inputs(SCHEMES[0], "cpu")
    x, lora_A, lora_B = x.detach(), lora_A.detach(), lora_B.detach()
    for name, fn, primal in _forward_ad_calls(w, x, lora_A, lora_B):
        with pytest.raises(NotImplementedError, match=rf"aqlm_lora\.{name}: forward-mode AD .* not supported"):
            if mode == "func.jvp":
                torch.func.jvp(fn, (primal,), (torch.ones_like(primal),))
            elif mode == "func.jacfwd":
                torch.func.jacfwd(fn)(primal)
            else:
                with fwAD.dual_level():
                    fn(fwAD.make_dual(primal, torch.ones_like(primal)))
        assert fn(primal).shape  # outside forward mode the same call runs
    # Reverse mode and vmap (torch's per-sample fallback) stay as they were.
    grad = torch.func.grad(lambda t: aqlm_lora.aqlm_linear(t, *w.args()).sum())
    with pytest.raises(RuntimeError):  # torch's own refusal of custom ops under func.grad, unchanged
        grad(x)
    batched = torch.func.vmap(lambda t: aqlm_lora.aqlm_linear(t, *w.args()))(x)
    assert_close_fp32(batched, aqlm_lora.aqlm_linear(x, *w.args()), rtol=1e-12)
