"""lora_mixed_forward (many adapters in one batch): values against the reference, opcheck, bad input
(C++ and fake kernels with the same words), thread counts, and gradients (gradcheck in float64,
against autograd through the reference)."""

from __future__ import annotations

import inspect

import pytest
import torch

from aqlm_lora import ops, reference
from tests.support.tolerances import FP64_RTOL, assert_close_fp32, assert_low_precision_ok
from tests.support.weights import SCHEMES, devices, random_weight


def mixed_args(w, n, k=3, r=4, dtype=torch.float32, lora_bias=True, row_scale=True, device="cpu", seed=0, lead=()):
    """Inputs of one lora_mixed_forward call: n rows (shaped lead + [n, in]) over k adapters + base rows."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = rnd(*lead, n, w.in_features)
    lora_A = rnd(k, r, w.in_features, scale=w.in_features**-0.5)
    lora_B_t = rnd(k, r, w.out_features)
    lora_B_t[0, r // 2 :] = 0  # adapter 0 has a smaller rank, zero-padded
    bias_stack = rnd(k, w.out_features) if lora_bias else None
    scale_stack = (1.0 + 0.2 * torch.randn(k, w.out_features, generator=g)).to(dtype).to(device) if row_scale else None
    scalings = torch.tensor([0.5, 2.0, -1.0, 0.25][:k] + [1.0] * max(0, k - 4), dtype=dtype, device=device)
    rows = n * (torch.Size(lead).numel() if lead else 1)
    indices = torch.randint(-1, k, (rows,), generator=g).to(device)
    return x, lora_A, lora_B_t, bias_stack, scalings, scale_stack, indices


def call(impl, w, x, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices, bias=True):
    return impl.lora_mixed_forward(
        x, *w.args(), w.bias if bias else None, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices
    )


CASES = [
    (scheme, n, device)
    for scheme in (SCHEMES[0], SCHEMES[1], SCHEMES[4], SCHEMES[5])
    for n in (0, 1, 3, 8, 9, 40)
    for device in devices()
]


@pytest.mark.parametrize("scheme,n,device", CASES, ids=[f"{s}-N{n}-{d}" for s, n, d in CASES])
@pytest.mark.parametrize("extras", [True, False], ids=["bias+dora", "plain"])
def test_matches_reference_fp32(scheme, n, device, extras):
    w = random_weight(scheme, 48, 64, device=device, bias=extras)
    args = mixed_args(w, n, lora_bias=extras, row_scale=extras, device=device)
    got = call(ops, w, *args, bias=extras)
    want = call(reference, w, *args, bias=extras)
    assert_close_fp32(got, want)


@pytest.mark.parametrize("device", devices())
def test_float64_and_leading_dims(device):
    w = random_weight(SCHEMES[1], 48, 64, dtype=torch.float64, device=device, bias=True)
    args = mixed_args(w, 5, dtype=torch.float64, device=device, lead=(2,))
    got = call(ops, w, *args)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float64
    assert_close_fp32(got, call(reference, w, *args), rtol=FP64_RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [2, 40])
def test_low_precision(dtype, n):
    w = random_weight(SCHEMES[1], 48, 64, dtype=dtype, bias=True)
    args = mixed_args(w, n, dtype=dtype)
    got = call(ops, w, *args)
    assert got.dtype == dtype
    exact_args = [a.double() if a is not None and a.is_floating_point() else a for a in args]
    w64 = random_weight(SCHEMES[1], 48, 64, dtype=torch.float64, bias=True)
    w64.codes, w64.codebooks, w64.scales, w64.bias = w.codes, w.codebooks.double(), w.scales.double(), w.bias.double()
    exact = call(reference, w64, *exact_args)
    assert_low_precision_ok(got, _plain_low(w, args, dtype), exact.to(torch.float32))


def _plain_low(w, args, dtype):
    """The op's math in plain PyTorch at ``dtype`` (what a user of that dtype would get)."""
    x, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices = args
    weight = reference.dequantize(*w.args()).to(dtype)
    out = x @ weight.T
    rows = []
    for i in range(x.shape[0]):
        a = int(indices[i])
        y = out[i]
        if a >= 0:
            y = (y + scalings[a] * ((x[i] @ lora_A[a].T) @ lora_B_t[a] + lora_bias[a])) * row_scale[a]
        rows.append(y + w.bias)
    return torch.stack(rows)


def test_one_adapter_for_all_rows_equals_lora_forward():
    w = random_weight(SCHEMES[1], 48, 64, bias=True)
    x, lora_A, lora_B_t, lora_bias, scalings, _, _ = mixed_args(w, 6)
    indices = torch.full((6,), 1, dtype=torch.int64)
    got = call(ops, w, x, lora_A, lora_B_t, lora_bias, scalings, None, indices)
    want, _ = ops.lora_forward(
        x, *w.args(), w.bias, lora_A[1], lora_B_t[1].T, lora_bias[1], float(scalings[1]), 0.0, 0, 0
    )
    assert_close_fp32(got, want)
    base = ops.aqlm_gemm(x, *w.args(), w.bias)
    got_base = call(ops, w, x, lora_A, lora_B_t, lora_bias, scalings, None, torch.full((6,), -1))
    assert torch.equal(got_base, base)


@pytest.mark.parametrize("n", [1, 8, 33, 300])
def test_thread_count_does_not_change_bits(n):
    w = random_weight(SCHEMES[1], 1024, 512, bias=True)
    args = mixed_args(w, n, k=5, r=16)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(call(ops, w, *args))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


OPCHECK_CASES = [(SCHEMES[1], torch.float32), (SCHEMES[0], torch.float64), (SCHEMES[5], torch.float32)]


@pytest.mark.parametrize("scheme,dtype", OPCHECK_CASES, ids=[f"{s}-{str(t)[6:]}" for s, t in OPCHECK_CASES])
def test_opcheck(scheme, dtype):
    w = random_weight(scheme, 16, 32, dtype=dtype, bias=True)
    x, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices = mixed_args(w, 6, dtype=dtype, lead=(2,))
    for t in (x, lora_A, lora_B_t, lora_bias, row_scale):
        t.requires_grad_()
    strided = torch.randn(6, 2 * w.in_features, dtype=dtype)[:, ::2]  # a non-contiguous input
    samples = [
        (x, *w.args(), w.bias, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices),
        (strided, *w.args(), None, lora_A.detach(), lora_B_t.detach(), None, scalings, None, indices[:6]),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.aqlm_lora.lora_mixed_forward.default, args)


def test_gradcheck_float64():
    w = random_weight(SCHEMES[1], 8, 16, dtype=torch.float64, bias=True)
    x, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices = mixed_args(w, 5, dtype=torch.float64)
    indices = torch.tensor([0, -1, 2, 0, 1])
    bias = w.bias.clone()
    leaves = [x, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale]
    for t in leaves:
        t.requires_grad_()

    def f(x, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale):
        return ops.lora_mixed_forward(x, *w.args(), bias, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices)

    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_gradients_match_reference_autograd():
    w = random_weight(SCHEMES[0], 48, 64, bias=True)
    args = list(mixed_args(w, 12, lead=(2,)))
    bias = w.bias.clone().requires_grad_()
    for i in (0, 1, 2, 3, 4, 5):
        args[i] = args[i].clone().requires_grad_()
    grads = []
    for impl in (ops, reference):
        out = impl.lora_mixed_forward(args[0], *w.args(), bias, *args[1:])
        torch.manual_seed(1)
        grads.append(torch.autograd.grad(out, [args[0], bias, *args[1:6]], torch.randn_like(out)))
    names = ["input", "bias", "lora_A", "lora_B_t", "lora_bias", "scalings", "row_scale"]
    for got, want, name in zip(*grads, names):
        assert_close_fp32(got, want, what=name)


@pytest.mark.parametrize("frozen", ["codebooks", "scales"])
def test_weight_gradients_are_refused(frozen):
    """Gradients to codebooks or scales are not computed: asking for them is an error, not a None."""
    w = random_weight(SCHEMES[1], 8, 16, bias=False)
    x, lora_A, lora_B_t, _, scalings, _, indices = mixed_args(w, 3)
    weight = dict(zip(["codes", "codebooks", "scales"], w.args()))
    weight[frozen] = weight[frozen].clone().requires_grad_()
    with pytest.raises(ValueError, match="codebooks or scales are not supported"):
        ops.lora_mixed_forward(x, *weight.values(), None, lora_A, lora_B_t, None, scalings, None, indices)


def test_double_backward_is_refused():
    w = random_weight(SCHEMES[1], 8, 16, bias=False)
    x, lora_A, lora_B_t, _, scalings, _, indices = mixed_args(w, 3)
    x.requires_grad_()
    out = ops.lora_mixed_forward(x, *w.args(), None, lora_A, lora_B_t, None, scalings, None, indices)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


# ------------------------------------------------------------------------------------------------
# Bad input: one RuntimeError naming the argument; the fake kernel says the same.


def _bad_calls(w):
    x, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices = mixed_args(w, 4)
    good = inspect.signature(ops.lora_mixed_forward).bind(
        x, *w.args(), None, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices
    )

    def mixed(**change):  # the good call with the named arguments changed
        args = {**good.arguments, **change}
        return lambda: ops.lora_mixed_forward(*args.values())

    return {
        "input_features": (mixed(input=torch.randn(4, 31)), r"input must have last dimension 32, got shape \[4, 31\]"),
        "lora_A_rank": (mixed(lora_A=lora_A[0]), r"lora_A must have shape \[num_adapters, r, 32\], got \[4, 32\]"),
        "lora_B_t_shape": (
            mixed(lora_B_t=lora_B_t.transpose(1, 2)),
            r"lora_B_t must have shape \[3, 4, 16\] \(lora_B transposed; num_adapters and r from lora_A\), "
            r"got \[3, 16, 4\]",
        ),
        "lora_dtypes": (
            mixed(lora_B_t=lora_B_t.double()),
            "lora_A and lora_B_t must share a dtype, got Float and Double",
        ),
        "lora_bias_shape": (mixed(lora_bias=lora_bias[:2]), r"lora_bias must have shape \[3, 16\] .* got \[2, 16\]"),
        "row_scale_shape": (mixed(row_scale=row_scale[:, :8]), r"row_scale must have shape \[3, 16\] .* got \[3, 8\]"),
        "scalings_shape": (
            mixed(scalings=scalings[:2]),
            r"scalings must have shape \[3\] \(one per adapter\), got \[2\]",
        ),
        "scalings_dtype": (
            mixed(scalings=scalings.int()),
            "scalings must be float32, float16, bfloat16 or float64, got Int",
        ),
        "indices_dtype": (mixed(indices=indices.int()), "indices must be int64, got Int"),
        "indices_shape": (mixed(indices=indices[:3]), r"indices must have shape \[4\] \(one adapter index per row"),
    }


BAD_CALLS = list(_bad_calls(random_weight(SCHEMES[1], 16, 32)))


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_is_refused_with_the_same_message_by_cpp_and_fake(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    call_, match = _bad_calls(random_weight(SCHEMES[1], 16, 32))[case]
    with pytest.raises(RuntimeError, match=match) as real:
        call_()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError) as fake:
            call_()
    assert str(fake.value).splitlines()[0] == str(real.value).splitlines()[0]


@pytest.mark.parametrize("bad", [3, -2])
def test_index_out_of_range_is_refused_on_cpu(bad):
    w = random_weight(SCHEMES[1], 16, 32)
    x, lora_A, lora_B_t, _, scalings, _, indices = mixed_args(w, 4)
    indices[2] = bad
    with pytest.raises(RuntimeError, match=rf"indices must lie in \[-1, 3\) \(-1: no adapter\), got {bad} at row 2"):
        ops.lora_mixed_forward(x, *w.args(), None, lora_A, lora_B_t, None, scalings, None, indices)


_CUDA_BAD_INDEX = """
import sys, torch
from aqlm_lora import ops
from tests.support.weights import SCHEMES, random_weight
from tests.ops.test_multi_lora import mixed_args
w = random_weight(SCHEMES[1], 16, 32, device="cuda")
x, lora_A, lora_B_t, _, scalings, _, indices = mixed_args(w, 4, device="cuda")
indices[2] = int(sys.argv[1])
try:
    ops.lora_mixed_forward(x, *w.args(), None, lora_A, lora_B_t, None, scalings, None, indices)
    torch.cuda.synchronize()
except RuntimeError as exc:
    print("REFUSED", str(exc).splitlines()[0])
    sys.exit(3)
print("ACCEPTED")
"""


@pytest.mark.cuda
@pytest.mark.parametrize("bad", [3, -2])
def test_index_out_of_range_fails_on_cuda(bad):
    """The CUDA kernels assert on the device (a host check would cost a sync): the call fails, as torch's
    own out-of-range indexing does; in a child process, since such a failure ends the CUDA context."""
    import subprocess
    import sys
    from pathlib import Path

    if "cuda" not in devices():
        pytest.skip("needs a GPU and the CUDA kernels")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _CUDA_BAD_INDEX, str(bad)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert "ACCEPTED" not in done.stdout, done.stdout + done.stderr
    assert done.returncode != 0 and ("REFUSED" in done.stdout or "assert" in done.stderr.lower()), done.stderr[-2000:]


def test_non_finite_scaling_is_refused():
    w = random_weight(SCHEMES[1], 16, 32)
    x, lora_A, lora_B_t, _, scalings, _, indices = mixed_args(w, 4)
    scalings[1] = float("nan")
    with pytest.raises(RuntimeError, match="scalings must be finite, got nan for adapter 1"):
        ops.lora_mixed_forward(x, *w.args(), None, lora_A, lora_B_t, None, scalings, None, indices)


def test_meta_tensors_give_meta_shapes():
    w = random_weight(SCHEMES[1], 16, 32)
    args = mixed_args(w, 4, lead=(3,))
    meta = [a.to("meta") if a is not None else None for a in args]
    out = ops.lora_mixed_forward(meta[0], *(t.to("meta") for t in w.args()), None, *meta[1:])
    assert out.device.type == "meta" and out.shape == (3, 4, 16)
