"""One fuzz example end to end (tests/ops/test_fuzz.py): the float64 oracle of a drawn case, then
every op, fake kernel, reference function and autograd entry point checked against it.

``STATS`` counts the examples each property ran and the CPU kernel paths they took."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import assume, event
from torch import Tensor

from aqlm_lora import ops
from aqlm_lora import reference as ref
from tests.support import fuzz_oracle as oracle
from tests.support.fuzz_cases import Geometry, LayerCase, NonFiniteCase, make_tensors
from tests.support.fuzz_checks import (
    check_close,
    check_fake,
    check_mask,
    check_nonfinite,
    check_plain_rule,
    fail,
    overflows,
)

# The reference is slow on purpose (Python Philox, a [O, I, C, og, ig] gather): it is checked on
# the examples whose weight has at most this many codebook terms and, with dropout, whose input
# has at most REFERENCE_DROPOUT_NUMEL elements; the ops are checked on every example.
REFERENCE_MAX_TERMS = 1 << 16
REFERENCE_DROPOUT_NUMEL = 1 << 14

STATS: dict[str, Counter] = {"layer": Counter(), "nonfinite": Counter()}


def record(prop: str, case: Geometry) -> None:
    """Count one example of property ``prop`` (run to its checks) and its kernel path."""
    STATS[prop]["examples"] += 1
    STATS[prop][case.path] += 1


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


# With native bf16 dot products the CPU kernels run bf16 many-row GEMMs in bf16 (W rounded to
# bf16, as plain bf16 PyTorch does): one more bf16 rounding of the base layer's terms.
NATIVE_BF16 = _cpu_has_native_bf16()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _rows(t: Tensor, features: int) -> np.ndarray:
    return oracle.f64(t).reshape(-1, features)


def run_layer_case(case: LayerCase) -> None:
    """Every op, fake kernel, reference function and autograd entry point on one layer case."""
    t = make_tensors(case)
    n, fin, fout = case.n, case.in_features, case.out_features
    in_shape, out_shape = t.x.shape, t.grad.shape
    dt, acc = case.input_dtype, compute_dtype(case.input_dtype)
    s, p = case.scaling, case.dropout_p
    seed_, offset = case.seed, case.offset

    # The float64 oracle, first: examples whose exact fp16 outputs overflow are not valid.
    w = oracle.dequantize(*t.weight())
    if w.exact.size <= 64:
        np.testing.assert_allclose(w.exact, oracle.dequantize_by_element(*t.weight()), rtol=1e-13, atol=1e-300)
    x, g = _rows(t.x, fin), _rows(t.grad, fout)
    keep = ops.dropout_mask(t.x, p, seed_, offset) if p > 0 else None
    keep_np = None if keep is None else keep.numpy().reshape(n, fin)
    fwd = oracle.forward(x, w, t.bias, t.lora_A, t.lora_B, t.lora_bias, s, keep_np, p)
    bwd = oracle.backward(g, fwd, w, t.lora_A, t.lora_B, s, keep_np, p)
    base = oracle.forward(x, w, t.bias, None, None, None, 0.0, None, 0.0).out
    gemm_t = oracle.base_backward(g, w)
    assume(not overflows(w.exact, case.codebook_dtype))
    for value in (fwd.out.exact, base.exact, gemm_t.exact, bwd.dx.exact):
        assume(not overflows(value, dt))
    assume(not overflows(bwd.dbias.exact, case.bias_dtype))
    assume(not overflows(bwd.dlora_bias.exact, case.lora_bias_dtype))

    record("layer", case)
    event(f"path={case.path}")
    event(f"input={dt}")

    # One more bf16 rounding of the base layer's terms on the bf16-GEMM path (see NATIVE_BF16).
    bf16_gemm = NATIVE_BF16 and dt == torch.bfloat16 and case.path == "blocked"
    base_extra = eps(torch.bfloat16) * fwd.base.mag if bf16_gemm else None
    base_t_extra = eps(torch.bfloat16) * gemm_t.mag if bf16_gemm else None
    w_acc = compute_dtype(case.codebook_dtype)

    # dequantize
    out = ops.dequantize(*t.weight())
    check_close("dequantize", out, w, case.codebook_dtype, (fout, fin), w_acc)
    check_fake("fake.dequantize", ops.dequantize, t.weight(), (out,))
    small_weight = fout * fin * case.num_codebooks <= REFERENCE_MAX_TERMS
    check_reference = small_weight and (p == 0 or n * fin <= REFERENCE_DROPOUT_NUMEL)
    STATS["layer"]["with-reference"] += check_reference
    if small_weight:
        check_close("reference.dequantize", ref.dequantize(*t.weight()), w, case.codebook_dtype, (fout, fin), w_acc)

    # dropout_mask (the reference's Philox in Python is slow: large masks are checked at sampled elements)
    if keep is not None:
        check_mask(keep, t.x, p, seed_, offset)
        check_fake("fake.dropout_mask", ops.dropout_mask, (t.x, p, seed_, offset), (keep,))

    # W-dense plain PyTorch at the input dtype, for the project's low-precision rule.
    w_dt = torch.from_numpy(w.exact).to(dt)
    bias_dt = None if t.bias is None else t.bias.to(dt)

    # aqlm_gemm
    out_base_shape = (*in_shape[:-1], fout)
    args = (t.x, *t.weight(), t.bias)
    out = ops.aqlm_gemm(*args)
    check_close("aqlm_gemm", out, base, dt, out_base_shape, acc, base_extra)
    check_plain_rule("aqlm_gemm.plain_rule", out, F.linear(t.x, w_dt, bias_dt), base)
    check_fake("fake.aqlm_gemm", ops.aqlm_gemm, args, (out,))
    if small_weight:
        check_close("reference.aqlm_gemm", ref.aqlm_gemm(*args), base, dt, out_base_shape, acc)

    # aqlm_gemm_t
    args = (t.grad, *t.weight())
    out = ops.aqlm_gemm_t(*args)
    check_close("aqlm_gemm_t", out, gemm_t, dt, (*out_shape[:-1], fin), acc, base_t_extra)
    check_plain_rule("aqlm_gemm_t.plain_rule", out, t.grad @ w_dt, gemm_t)
    check_fake("fake.aqlm_gemm_t", ops.aqlm_gemm_t, args, (out,))
    if small_weight:
        check_close("reference.aqlm_gemm_t", ref.aqlm_gemm_t(*args), gemm_t, dt, (*out_shape[:-1], fin), acc)

    # lora_forward
    la, lb_dt = case.lora_dtype, case.lora_bias_dtype
    args = (t.x, *t.weight(), t.bias, t.lora_A, t.lora_B, t.lora_bias, s, p, seed_, offset)
    out, xa = ops.lora_forward(*args)
    check_close("lora_forward.out", out, fwd.out, dt, out_shape, acc, base_extra)
    check_close("lora_forward.xa", xa, fwd.xa, la, (n, case.rank), acc)
    xd = t.x if keep is None else t.x * keep.to(dt) / (1.0 - p)
    plain = F.linear(t.x, w_dt, bias_dt) + F.linear(F.linear(xd, t.lora_A.to(dt)), t.lora_B.to(dt)) * s
    if t.lora_bias is not None:
        plain = plain + t.lora_bias.to(dt) * s
    check_plain_rule("lora_forward.plain_rule", out, plain, fwd.out)
    check_fake("fake.lora_forward", ops.lora_forward, args, (out, xa))
    if check_reference:
        r_out, r_xa = ref.lora_forward(*args)
        check_close("reference.lora_forward.out", r_out, fwd.out, dt, out_shape, acc)
        check_close("reference.lora_forward.xa", r_xa, fwd.xa, la, (n, case.rank), acc)

    # lora_backward, given the op's own (rounded) xa
    bwd_xa = oracle.backward(g, fwd, w, t.lora_A, t.lora_B, s, keep_np, p, xa=oracle.f64(xa))
    tail = (*t.weight(), t.lora_A, t.lora_B, s, p, seed_, offset)
    args = (t.grad, t.x, xa, *tail, True)
    dx, da, db = ops.lora_backward(*args)
    check_close("lora_backward.dx", dx, bwd_xa.dx, dt, in_shape, acc, base_t_extra)
    check_close("lora_backward.dA", da, bwd_xa.dA, la, (case.rank, fin), acc)
    check_close("lora_backward.dB", db, bwd_xa.dB, la, (fout, case.rank), acc)
    check_fake("fake.lora_backward", ops.lora_backward, args, (dx, da, db))
    skipped, da2, db2 = ops.lora_backward(*args[:-1], False)
    if skipped.shape != (0,) or not torch.equal(da2, da) or not torch.equal(db2, db):
        fail("lora_backward.no_input_grad", f"grad_input {tuple(skipped.shape)}, or dA/dB differ from input_grad=True")
    check_fake("fake.lora_backward.no_input_grad", ops.lora_backward, (*args[:-1], False), (skipped, da2, db2))
    if check_reference:
        r_dx, r_da, r_db = ref.lora_backward(*args)
        check_close("reference.lora_backward.dx", r_dx, bwd_xa.dx, dt, in_shape, acc)
        check_close("reference.lora_backward.dA", r_da, bwd_xa.dA, la, (case.rank, fin), acc)
        check_close("reference.lora_backward.dB", r_db, bwd_xa.dB, la, (fout, case.rank), acc)

    # Autograd: aqlm_lora_linear. Output and parameter gradients; xa is saved in lora_A's dtype
    # (one rounding in dB), bias gradients may be summed in the output gradient's dtype (one
    # rounding each, as plain PyTorch does when bias is cast to the activations' dtype).
    x_leaf = t.x.detach().requires_grad_()
    leaves = {"x": x_leaf, "lora_A": t.lora_A.detach().requires_grad_(), "lora_B": t.lora_B.detach().requires_grad_()}
    if t.bias is not None:
        leaves["bias"] = t.bias.detach().requires_grad_()
    if t.lora_bias is not None:
        leaves["lora_bias"] = t.lora_bias.detach().requires_grad_()
    y = ops.aqlm_lora_linear(
        x_leaf, *t.weight(), leaves.get("bias"), leaves["lora_A"], leaves["lora_B"], s, p, leaves.get("lora_bias"),
        training=True, seed=seed_, offset=offset,
    )  # fmt: skip
    check_close("aqlm_lora_linear.out", y, fwd.out, dt, out_shape, acc, base_extra)
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), t.grad)))
    check_close("aqlm_lora_linear.dx", grads["x"], bwd.dx, dt, in_shape, acc, base_t_extra)
    check_close("aqlm_lora_linear.dA", grads["lora_A"], bwd.dA, la, (case.rank, fin), acc)
    check_close("aqlm_lora_linear.dB", grads["lora_B"], bwd.dB, la, (fout, case.rank), acc, eps(la) * bwd.dB.mag)
    if "bias" in grads:
        extra = eps(dt) * np.abs(bwd.dbias.exact)
        check_close("aqlm_lora_linear.dbias", grads["bias"], bwd.dbias, case.bias_dtype, (fout,), acc, extra)
    if "lora_bias" in grads:
        extra = 2 * eps(dt) * np.abs(bwd.dlora_bias.exact)
        check_close("aqlm_lora_linear.dlora_bias", grads["lora_bias"], bwd.dlora_bias, lb_dt, (fout,), acc, extra)

    # Autograd: aqlm_linear (base layer only).
    x_leaf = t.x.detach().requires_grad_()
    base_leaves = [x_leaf] + ([leaves["bias"]] if t.bias is not None else [])
    y = ops.aqlm_linear(x_leaf, *t.weight(), base_leaves[1] if t.bias is not None else None)
    check_close("aqlm_linear.out", y, base, dt, out_base_shape, acc, base_extra)
    base_grads = torch.autograd.grad(y, base_leaves, t.grad)
    check_close("aqlm_linear.dx", base_grads[0], gemm_t, dt, in_shape, acc, base_t_extra)
    if t.bias is not None:
        extra = eps(dt) * np.abs(bwd.dbias.exact)
        check_close("aqlm_linear.dbias", base_grads[1], bwd.dbias, case.bias_dtype, (fout,), acc, extra)


def run_nonfinite_case(case: NonFiniteCase) -> None:
    """NaN/±Inf in x and grad come out where F.linear on the dequantized weight (float64) puts them."""
    g = torch.Generator().manual_seed(case.data_seed)
    code_dtype = torch.int16 if case.nbits > 8 else torch.int8
    info = torch.iinfo(code_dtype)
    codes = torch.randint(info.min, info.max + 1, (case.out_groups, case.in_groups, case.num_codebooks), generator=g)
    codes = codes.to(code_dtype)
    cb_shape = (case.num_codebooks, 2**case.nbits, case.out_group, case.in_group)
    codebooks = (torch.randn(cb_shape, generator=g) / math.sqrt(case.in_group)).to(case.codebook_dtype)
    scales = (torch.rand(case.out_groups, 1, 1, 1, generator=g) + 0.5).to(case.codebook_dtype)
    fin, fout = case.in_features, case.out_features
    dt = case.input_dtype
    x = torch.randn(case.n, fin, generator=g, dtype=torch.float64)
    grad = torch.randn(case.n, fout, generator=g, dtype=torch.float64)
    for pos, value in case.specials:
        x.view(-1)[pos % x.numel()] = value
        grad.view(-1)[pos % grad.numel()] = value
    x, grad = x.to(dt), grad.to(dt)
    lora_A = torch.randn(case.rank, fin, generator=g) / math.sqrt(fin)
    lora_B = torch.randn(fout, case.rank, generator=g)
    w = torch.from_numpy(oracle.dequantize(codes, codebooks, scales).exact)

    record("nonfinite", case)

    check_nonfinite("nonfinite.aqlm_gemm", ops.aqlm_gemm(x, codes, codebooks, scales, None), F.linear(x.double(), w))
    check_nonfinite("nonfinite.aqlm_gemm_t", ops.aqlm_gemm_t(grad, codes, codebooks, scales), grad.double() @ w)
    out, _ = ops.lora_forward(x, codes, codebooks, scales, None, lora_A, lora_B, None, 0.5, 0.0, 0, 0)
    xd = x.double()
    plain = F.linear(xd, w) + F.linear(F.linear(xd, lora_A.double()), lora_B.double()) * 0.5
    check_nonfinite("nonfinite.lora_forward", out, plain)
