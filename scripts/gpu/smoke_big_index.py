"""The GPU smoke test's checks past 2**31 / 2**32 element indices: dropout masks and LoRA dropout
over tensors with more elements than ``limit``, compared against the reference's Philox words on
windows around the indices where 32-bit arithmetic would break."""

from __future__ import annotations

import math
from typing import Callable

import torch
from smoke_cases import TOL
from smoke_session import Smoke, max_errors
from torch import Tensor

from aqlm_lora import reference as ref


def ref_keep(indices: Tensor, p: float, seed: int, offset: int) -> Tensor:
    """The reference keep-mask of arbitrary element indices (int64 tensor, CPU): Philox words of
    counter (index // 4, offset), word index % 4, top 24 bits as a float32 uniform, kept if >= p."""
    words = torch.stack(ref.philox4x32_10(indices >> 2, offset, seed), dim=-1)
    word = words.gather(1, (indices & 3).unsqueeze(1)).squeeze(1)
    u = (word >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return u >= torch.tensor(p, dtype=torch.float32)


def windows(numel: int, limit: int, width: int = 4096) -> list[tuple[int, int]]:
    """Index ranges [a, b) to check: around limit / 2, around limit, and the tail of `numel`."""
    spots = [(limit // 2 - width, limit // 2 + width), (limit - width, limit + width), (numel - 2 * width - 3, numel)]
    return [(max(a, 0), min(b, numel)) for a, b in spots if a < numel]


def big_sections(s: Smoke, limit: int) -> list[tuple[str, float, Callable[[], None]]]:
    """(title, bytes of device memory it needs, run) of each large-index section: about 4.3, 25 and
    40 GB at limit 2**32 (2**31 for the two LoRA ones)."""
    lora_limit = min(limit, 2**31)
    return [
        (f"dropout_mask over > {limit} elements", limit * 1.1, lambda: check_big_mask(s, limit)),
        (
            f"tiled LoRA dropout over > {lora_limit} elements",
            lora_limit * 12,
            lambda: check_big_tiled_lora(s, lora_limit, chunk_rows=2**22),
        ),
        (
            f"decode LoRA shrink with indices > {lora_limit}",
            lora_limit * 19,
            lambda: check_big_decode_lora(s, lora_limit, chunk_cols=2**24),
        ),
    ]


def check_big_mask(s: Smoke, limit: int) -> None:
    """dropout_mask over more than `limit` elements (input is a stride-0 view: no memory)."""
    p, seed, offset = 0.3, 2**40 + 3, 5
    cols = 4099  # odd row length: the last Philox quadruple is partial
    rows = limit // cols + 2
    numel = rows * cols
    s.log(f"   mask of {rows} x {cols} = {numel} elements (> {limit})")
    x = torch.zeros((), device=s.dev).expand(rows, cols)
    mask = s.ops.dropout_mask(x, p, seed, offset).reshape(-1)
    for a, b in windows(numel, limit) + [(limit // 4 - 4096, limit // 4 + 4096)]:
        want = ref_keep(torch.arange(a, b, dtype=torch.int64), p, seed, offset)
        s.equal(f"dropout_mask elements [{a}, {b}) of {numel}", mask[a:b].cpu(), want)
    kept = float(mask.sum(dtype=torch.int64)) / numel
    slack = 6 * math.sqrt(p * (1 - p) / numel) + 1e-6  # six standard deviations
    s.record(
        f"dropout_mask keep fraction over {numel} elements",
        abs(kept - (1 - p)) <= slack,
        f"{kept:.6f}, want {1 - p} +- {slack:.1e}",
    )


def check_big_tiled_lora(s: Smoke, limit: int, chunk_rows: int) -> None:
    """lora_forward / lora_backward on the tiled path with an input of more than `limit`
    elements: the dropout of x (forward, grad_A) and of the input gradient uses element indices
    above `limit`. Compared in row chunks against float32 torch math with the op's own mask,
    which is itself checked against the reference on windows above `limit`."""
    p, seed, offset, scaling, r = 0.3, 2**40 + 3, 5, 0.5, 4
    in_f, out_f = 64, 16
    n = limit // in_f + 37
    dtype = torch.float16
    codes, books, scales = s.weight("2x8", out_f, in_f, dtype)
    s.log(f"   x [{n}, {in_f}] = {n * in_f} elements (> {limit})")
    # Magnitudes keep the sums over ~2**25 rows (grad_A, grad_B) far inside float16's range: with
    # unit-scale g and B, grad_A's largest entries would pass 65504.
    x = torch.randn(n, in_f, device=s.dev, dtype=dtype)
    A = s.randn(r, in_f, dtype=dtype, scale=1 / 8)
    B = s.randn(out_f, r, dtype=dtype, scale=1 / 2)
    bias, lb = s.randn(out_f, dtype=dtype), s.randn(out_f, dtype=dtype)
    mask = s.ops.dropout_mask(x, p, seed, offset)
    for a, b in windows(n * in_f, limit):
        want = ref_keep(torch.arange(a, b, dtype=torch.int64), p, seed, offset)
        s.equal(f"dropout_mask of x, elements [{a}, {b})", mask.reshape(-1)[a:b].cpu(), want)
    y, xa = s.ops.lora_forward(x, codes, books, scales, bias, A, B, lb, scaling, p, seed, offset)
    g = torch.randn(n, out_f, device=s.dev, dtype=dtype) / 100
    gx, gA, gB = s.ops.lora_backward(g, x, xa, codes, books, scales, A, B, scaling, p, seed, offset, True)

    Af, Bf = A.float(), B.float()
    err = {k: [0.0, 0.0, True] for k in ("out", "xa", "grad_input")}
    gA_want = torch.zeros(r, in_f, device=s.dev)
    gB_want = torch.zeros(out_f, r, device=s.dev)

    def acc(key: str, got: Tensor, want: Tensor) -> None:
        e, m = max_errors(got, want)
        err[key][0] = max(err[key][0], e)
        err[key][1] = max(err[key][1], m)
        err[key][2] = err[key][2] and bool(torch.isfinite(got).all())

    for r0 in range(0, n, chunk_rows):
        sl = slice(r0, min(n, r0 + chunk_rows))
        xd = x[sl].float() * mask[sl] / (1 - p)
        xa_w = xd @ Af.T
        y_w = ref.aqlm_gemm(x[sl].float(), codes, books, scales, bias.float()) + scaling * (xa_w @ Bf.T + lb.float())
        acc("out", y[sl], y_w.to(dtype))
        acc("xa", xa[sl], xa_w.to(dtype))
        gf = g[sl].float()
        gb = gf @ Bf
        gx_w = ref.aqlm_gemm_t(gf, codes, books, scales) + scaling * (gb @ Af) * mask[sl] / (1 - p)
        acc("grad_input", gx[sl], gx_w.to(dtype))
        gA_want += scaling * (gb.T @ xd)
        gB_want += scaling * (gf.T @ xa[sl].float())
    for key, (e, m, finite) in err.items():
        name = "lora_forward." + key if key != "grad_input" else "lora_backward.grad_input"
        s.close_errors(f"{name} over {n * in_f} elements", e, m, finite, TOL[dtype])
    s.close(f"lora_backward.grad_A over {n * in_f} elements", gA, gA_want.to(dtype), TOL[dtype])
    s.close(f"lora_backward.grad_B over {n * in_f} elements", gB, gB_want.to(dtype), TOL[dtype])


def check_big_decode_lora(s: Smoke, limit: int, chunk_cols: int) -> None:
    """lora_forward on the decode path (8 tokens: GEMV + the fused LoRA shrink, which draws the
    dropout mask itself) with in_features so large that the last token's element indices pass
    `limit`; compared in column chunks against float32 torch math with dropout_mask's mask."""
    p, seed, offset, scaling, r, tokens = 0.3, 2**40 + 3, 5, 0.5, 2, 8
    in_f = (limit // (tokens - 1) // 8 + 16) * 8  # token 7 starts past `limit`
    out_f = 4
    dtype = torch.float16
    codes, books, scales = s.weight("2x8", out_f, in_f, dtype)
    s.log(f"   x [{tokens}, {in_f}] = {tokens * in_f} elements (token {tokens - 1} starts at {(tokens - 1) * in_f})")
    x = torch.randn(tokens, in_f, device=s.dev, dtype=dtype) / 16  # |y| ~ 400: sums over 3e8 columns
    A = torch.randn(r, in_f, device=s.dev, dtype=dtype) / math.sqrt(in_f)
    B = s.randn(out_f, r, dtype=dtype)
    bias = s.randn(out_f, dtype=dtype)
    y, xa = s.ops.lora_forward(x, codes, books, scales, bias, A, B, None, scaling, p, seed, offset)
    mask = s.ops.dropout_mask(x, p, seed, offset)
    a = (tokens - 1) * in_f
    want = ref_keep(torch.arange(a, a + 8192, dtype=torch.int64), p, seed, offset)
    s.equal(f"dropout_mask of x, elements [{a}, {a + 8192})", mask.reshape(-1)[a : a + 8192].cpu(), want)
    y_w = torch.zeros(tokens, out_f, device=s.dev)
    xa_w = torch.zeros(tokens, r, device=s.dev)
    groups = chunk_cols // 8
    for g0 in range(0, in_f // 8, groups):
        g1 = min(in_f // 8, g0 + groups)
        cols = slice(g0 * 8, g1 * 8)
        xf = x[:, cols].float()
        y_w += ref.aqlm_gemm(xf, codes[:, g0:g1].contiguous(), books, scales, None)
        xa_w += (xf * mask[:, cols] / (1 - p)) @ A[:, cols].float().T
    y_w += bias.float() + scaling * (xa_w @ B.float().T)
    s.close(f"lora_forward.xa decode, {tokens * in_f} elements", xa, xa_w.to(dtype), TOL[dtype])
    s.close(f"lora_forward.out decode, {tokens * in_f} elements", y, y_w.to(dtype), TOL[dtype])
