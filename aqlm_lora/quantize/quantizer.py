"""Dense ``nn.Linear`` -> ``aqlm.QuantizedLinear``: residual k-means, then alternating refinement.

A small, data-free AQLM quantizer (it fits the weights, not the layer outputs): good enough to make
real AQLM checkpoints of small models for tests, demos and benchmarks, in seconds on a CPU.

For a weight ``W [out, in]`` and a scheme ``CxB g<ig> o<og>``:

1. scales: one per output group of ``og`` rows, the RMS of that group (``[out/og, 1, 1, 1]``);
2. the scaled weight ``X = W / scale`` is cut into ``og x ig`` groups (vectors of ``og*ig`` numbers);
3. codebook ``c`` is fitted by (weighted) k-means to the residual ``X - sum_{c' < c} cb_c'[code_c']``
   (k-means++ init for codebooks of up to 1024 entries, a random sample of the groups above),
   and code ``c`` is the residual's nearest entry;
4. ``rounds`` rounds of exact block-coordinate descent on ``||W - W_q||_F``: for each codebook,
   re-assign its codes given the others (nearest neighbour; optionally a joint beam search over all
   codebooks first) and refit its entries as the weighted mean residual of their groups; then refit
   every scale by least squares. Each step minimises the true error over its block, so the relative
   error ``||W - W_q||_F / ||W||_F`` never increases from round to round (it is returned per round).

Distances are computed in chunks of rows, so 65536-entry codebooks need only a few MiB at a time.

Weights it refuses or handles: a weight that is empty or holds NaN/Inf raises ``ValueError`` (naming
the layer in :func:`quantize_model`). Any finite magnitude works: the weight is first divided by one
power of two per layer (so its largest entry lies in [0.5, 1), done in float64, exact for normal
numbers) and the factor is folded back into the scales at the end; squared norms can neither
underflow (``1e-30 * W``) nor overflow (``1e20 * W``), and ``W * 2**k`` gives the same codes and
codebooks as ``W``. The only refusal for size is at the end: scales that the output dtype cannot
hold (``inf``, or 0 for a row that is not zero, e.g. ``1e20 * W`` with ``dtype=torch.float16``).
Codes are stored the AQLM way: ``[out/og, in/ig, C]``, int8 for ``nbits <= 8`` else int16, signed
(a value ``v >= 2**(nbits-1)`` is stored as ``v - 2**nbits``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 20  # at most this many distance entries (4 MiB of fp32) at a time
_KMEANS_PP_MAX_ENTRIES = 1024


# ---------------------------------------------------------------------------------------------
# Schemes


_SCHEME_RE = re.compile(r"^(\d+)x(\d+)(?:g(\d+))?(?:o(\d+))?$")


@dataclass(frozen=True)
class Scheme:
    """An AQLM scheme: ``num_codebooks`` codebooks of ``2**nbits`` entries of ``out_group x in_group``."""

    num_codebooks: int
    nbits: int
    in_group_size: int = 8
    out_group_size: int = 1

    def __post_init__(self):
        for name in ("num_codebooks", "nbits", "in_group_size", "out_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"scheme {name} must be a positive integer, got {value!r}")
        if self.nbits > 16:
            raise ValueError(f"scheme nbits must be 1..16 (codes are int8/int16), got {self.nbits}")
        if self.num_codebooks > 64:
            raise ValueError(f"scheme num_codebooks must be 1..64, got {self.num_codebooks}")

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.nbits <= 8 else torch.int16

    @property
    def bits_per_weight(self) -> float:
        """Bits of codes per weight (scales and codebooks not counted)."""
        return self.num_codebooks * self.nbits / (self.in_group_size * self.out_group_size)

    def __str__(self) -> str:
        text = f"{self.num_codebooks}x{self.nbits}"
        text += f"g{self.in_group_size}" if self.in_group_size != 8 else ""
        return text + (f"o{self.out_group_size}" if self.out_group_size != 1 else "")

    def aqlm_config(self, linear_weights_not_to_quantize: Iterable[str] = ()):
        """The ``transformers.AqlmConfig`` of this scheme."""
        from transformers import AqlmConfig

        return AqlmConfig(
            in_group_size=self.in_group_size,
            out_group_size=self.out_group_size,
            num_codebooks=self.num_codebooks,
            nbits_per_codebook=self.nbits,
            linear_weights_not_to_quantize=list(linear_weights_not_to_quantize),
        )


SCHEME_GRAMMAR = (
    "<codebooks>x<bits>[g<in_group>][o<out_group>], e.g. 2x8, 1x16, 1x16g16, 2x8g8o2 "
    "(in_group defaults to 8, out_group to 1; bits 1..16)"
)


def parse_scheme(text: Union[str, Scheme]) -> Scheme:
    """Parse a scheme string (grammar: :data:`SCHEME_GRAMMAR`; case and spaces ignored).

    ``"2x8"`` -> 2 codebooks of 2**8 entries, groups of 1 x 8; ``"1x16g16"`` -> 1 codebook of
    2**16 entries of 1 x 16; ``"2x8g8o2"`` -> 2 codebooks of 2 x 8 groups. Raises ``ValueError``.
    """
    if isinstance(text, Scheme):
        return text
    if not isinstance(text, str):
        raise ValueError(f"scheme must be a string like '2x8', got {type(text).__name__}")
    match = _SCHEME_RE.match(text.strip().lower().replace(" ", ""))
    if match is None:
        raise ValueError(f"invalid scheme {text!r}: expected {SCHEME_GRAMMAR}")
    codebooks, bits, in_group, out_group = match.groups()
    try:
        return Scheme(
            num_codebooks=int(codebooks),
            nbits=int(bits),
            in_group_size=int(in_group) if in_group else 8,
            out_group_size=int(out_group) if out_group else 1,
        )
    except ValueError as exc:
        raise ValueError(f"invalid scheme {text!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Code storage


def pack_codes(codes: Tensor, nbits: int) -> Tensor:
    """Code values in ``[0, 2**nbits)`` -> AQLM's signed storage (int8 / int16)."""
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**nbits):
        raise ValueError(f"code values must lie in [0, 2**{nbits})")
    signed = torch.where(codes >= 2 ** (nbits - 1), codes - 2**nbits, codes)
    return signed.to(torch.int8 if nbits <= 8 else torch.int16)


def unpack_codes(codes: Tensor, nbits: int) -> Tensor:
    """AQLM's signed storage -> code values in ``[0, 2**nbits)`` (int64)."""
    return codes.to(torch.int64) % (2**nbits)


# ---------------------------------------------------------------------------------------------
# Nearest neighbours and k-means (chunked, vectorised)


def _chunk_rows(num_centers: int, width: int = 1) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, num_centers * width))


def nearest(points: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest center for every point, and the squared distance to it (chunked)."""
    center_sq = centers.pow(2).sum(1)
    index = torch.empty(points.shape[0], dtype=torch.int64)
    dist = torch.empty(points.shape[0], dtype=points.dtype)
    step = _chunk_rows(centers.shape[0])
    for start in range(0, points.shape[0], step):
        block = points[start : start + step]
        scores = torch.addmm(center_sq, block, centers.T, alpha=-2.0)  # ||c||^2 - 2 x.c
        best, idx = scores.min(dim=1)
        index[start : start + step] = idx
        dist[start : start + step] = (best + block.pow(2).sum(1)).clamp_min_(0.0)
    return index, dist


def _weighted_means(points: Tensor, weights: Tensor, index: Tensor, old: Tensor) -> Tensor:
    """Weighted mean of the points assigned to each center; centers with no weight keep ``old``."""
    total = torch.zeros_like(old).index_add_(0, index, points * weights[:, None])
    mass = torch.zeros(old.shape[0], dtype=old.dtype).index_add_(0, index, weights)
    return torch.where(mass[:, None] > 0, total / mass.clamp_min(1e-30)[:, None], old)


def _kmeans_pp(points: Tensor, weights: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 weighting), on at most 64 points per center."""
    if points.shape[0] > 64 * k:
        keep = torch.randperm(points.shape[0], generator=generator)[: 64 * k]
        points, weights = points[keep], weights[keep]
    n = points.shape[0]
    centers = torch.empty(k, points.shape[1], dtype=points.dtype)
    first = torch.multinomial(weights + 1e-12, 1, generator=generator)
    centers[0] = points[first[0]]
    closest = (points - centers[0]).pow(2).sum(1)
    for j in range(1, k):
        prob = closest * weights
        if not bool(prob.sum() > 0):  # every point already is a center: pick any
            pick = torch.randint(n, (1,), generator=generator)
        else:
            pick = torch.multinomial(prob, 1, generator=generator)
        centers[j] = points[pick[0]]
        torch.minimum(closest, (points - centers[j]).pow(2).sum(1), out=closest)
    return centers


def kmeans(
    points: Tensor,
    k: int,
    *,
    weights: Optional[Tensor] = None,
    iters: int = 12,
    init: str = "auto",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Weighted Lloyd k-means; returns ``[k, dim]`` centers. ``init``: auto, kmeans++ or sample."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = points.shape[0]
    weights = torch.ones(n, dtype=points.dtype) if weights is None else weights.to(points.dtype)
    if init == "auto":
        init = "kmeans++" if k <= _KMEANS_PP_MAX_ENTRIES else "sample"
    if init == "kmeans++":
        centers = _kmeans_pp(points, weights, k, generator)
    elif init == "sample":
        order = torch.randperm(n, generator=generator)
        if n >= k:
            centers = points[order[:k]].clone()
        else:  # fewer points than entries: every point is a center (exact), the rest jittered copies
            extra = points[torch.randint(n, (k - n,), generator=generator)]
            noise = torch.randn(extra.shape, generator=generator, dtype=points.dtype)
            return torch.cat([points[order], extra + 1e-3 * points.std() * noise])
    else:
        raise ValueError(f"unknown k-means init {init!r} (auto, kmeans++ or sample)")
    previous = None
    for _ in range(iters):
        index, dist = nearest(points, centers)
        if previous is not None and torch.equal(index, previous):
            break
        previous = index
        centers = _weighted_means(points, weights, index, centers)
        # Re-seed empty centers with the points that are currently worst served.
        used = torch.zeros(k, dtype=torch.bool)
        used[index] = True
        empty = (~used).nonzero().flatten()
        if 0 < empty.numel() and n > k:
            worst = torch.topk(dist * weights, min(empty.numel(), n)).indices
            centers[empty[: worst.numel()]] = points[worst]
    return centers


def _beam_codes(target: Tensor, codebooks: Tensor, beam: int) -> Tensor:
    """Joint codes for all codebooks by beam search (codebooks taken in order). ``[N, C]``."""
    num_codebooks, size, dim = codebooks.shape
    out = torch.empty(target.shape[0], num_codebooks, dtype=torch.int64)
    cb_sq = codebooks.pow(2).sum(-1)  # [C, K]
    step = _chunk_rows(size, beam)
    for start in range(0, target.shape[0], step):
        t = target[start : start + step]  # [n, d]
        n = t.shape[0]
        residual = t[:, None, :]  # [n, b, d]
        paths = torch.empty(n, 1, 0, dtype=torch.int64)
        for c in range(num_codebooks):
            b = residual.shape[1]
            # ||r - e||^2 = ||r||^2 - 2 r.e + ||e||^2, for every beam entry r and codebook entry e.
            scores = residual.pow(2).sum(-1, keepdim=True) - 2 * residual @ codebooks[c].T + cb_sq[c]
            top = torch.topk(scores.reshape(n, b * size), min(beam, b * size), dim=1, largest=False).indices
            parent, entry = top // size, top % size
            paths = torch.cat([paths.gather(1, parent[..., None].expand(-1, -1, paths.shape[2])), entry[..., None]], 2)
            residual = residual.gather(1, parent[..., None].expand(-1, -1, dim)) - codebooks[c][entry]
        out[start : start + step] = paths[:, 0, :]
    return out


# ---------------------------------------------------------------------------------------------
# One weight matrix


@dataclass
class QuantizedWeight:
    """AQLM tensors of one weight and the relative error ``||W - W_q||_F / ||W||_F`` per round."""

    codes: Tensor  # [out/og, in/ig, C], int8/int16, signed
    codebooks: Tensor  # [C, 2**nbits, og, ig]
    scales: Tensor  # [out/og, 1, 1, 1]
    scheme: Scheme
    errors: list[float] = field(default_factory=list)  # round 0 = after residual k-means

    def dequantize(self) -> Tensor:
        """Dense ``[out, in]`` weight (float32), through aqlm's own ``_dequantize_weight``."""
        from aqlm.utils import _dequantize_weight

        return _dequantize_weight(
            unpack_codes(self.codes, self.scheme.nbits), self.codebooks.float(), self.scales.float()
        )


def _decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """``[N, C]`` code values and ``[C, K, d]`` codebooks -> ``[N, d]`` sums."""
    out = codebooks[0][codes[:, 0]]
    for c in range(1, codebooks.shape[0]):
        out = out + codebooks[c][codes[:, c]]
    return out


def check_weight(weight: Tensor, name: str = "weight") -> None:
    """Raise ``ValueError`` (starting with ``name``) for a weight that cannot be quantized.

    It must be 2-D, non-empty and finite: a NaN would spread into the codebooks it touches, an Inf
    into every distance.
    """
    if weight.ndim != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    shape = f"{name} [{weight.shape[0]}, {weight.shape[1]}]"
    if weight.numel() == 0:
        raise ValueError(f"{shape} is empty: there is nothing to quantize")
    if weight.dtype.is_floating_point and not bool(torch.isfinite(weight).all()):
        nan, inf = int(torch.isnan(weight).sum()), int(torch.isinf(weight).sum())
        counts = [f"{n} {what} value{'s' if n > 1 else ''}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n]
        raise ValueError(f"{shape} has {' and '.join(counts)} (of {weight.numel()}); only finite weights quantize")


def _times_power_of_two(x: Tensor, exponent: int) -> Tensor:
    """``x * 2**exponent`` (exact while the result is a normal number), in two factors so neither overflows."""
    half = exponent // 2
    return x * 2.0**half * 2.0 ** (exponent - half)


def _normalized(weight: Tensor) -> tuple[Tensor, int]:
    """``(W / 2**e as float32, e)`` with ``max |W / 2**e|`` in [0.5, 1) (``e = 0`` for a zero weight)."""
    w = weight.detach().to("cpu", torch.float64)
    peak = float(w.abs().max())
    exponent = math.frexp(peak)[1] if peak > 0 else 0
    return _times_power_of_two(w, -exponent).float(), exponent


def _stored_scales(scales: Tensor, exponent: int, dtype: torch.dtype, name: str) -> Tensor:
    """Fold ``2**exponent`` back into the (normalised) scales, in ``dtype``; refuse what it cannot hold."""
    exact = _times_power_of_two(scales.double(), exponent)
    stored = exact.to(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(
            f"{name}: scales overflow {dtype_name} (largest {float(exact.abs().max()):.3g}); "
            "quantize to a wider dtype (e.g. float32)"
        )
    lost = (stored == 0) & (exact != 0)
    if bool(lost.any()):
        raise ValueError(
            f"{name}: scales underflow {dtype_name} in {int(lost.sum())} of {lost.numel()} output groups "
            f"(smallest {float(exact[exact != 0].abs().min()):.3g}); quantize to a wider dtype (e.g. float32)"
        )
    return stored


def quantize_weight(
    weight: Tensor,
    scheme: Union[str, Scheme],
    *,
    rounds: int = 4,
    kmeans_iters: int = 12,
    init: str = "auto",
    beam_size: int = 1,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    name: str = "weight",
) -> QuantizedWeight:
    """Quantize a dense ``[out, in]`` weight to AQLM tensors (see the module docstring).

    ``rounds`` alternating refinement rounds follow the residual k-means; ``beam_size > 1`` adds a
    joint beam search over all codebooks at the start of each round (kept per group only where it
    lowers the error). ``dtype`` is the dtype of codebooks and scales (default: the weight's).
    ``ValueError`` (its message starts with ``name``) for an empty or non-finite weight, a shape the
    scheme does not split, or scales that ``dtype`` cannot hold; any finite magnitude is handled.
    """
    scheme = parse_scheme(scheme)
    check_weight(weight, name)
    out_features, in_features = weight.shape
    og, ig, num_codebooks, size = scheme.out_group_size, scheme.in_group_size, scheme.num_codebooks, 2**scheme.nbits
    if in_features % ig or out_features % og:
        raise ValueError(
            f"{name} [{out_features}, {in_features}] does not split into groups of {og} x {ig} (scheme {scheme})"
        )
    if rounds < 0 or kmeans_iters < 0 or beam_size < 1:
        raise ValueError("rounds and kmeans_iters must be >= 0 and beam_size >= 1")
    out_dtype = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
    generator = torch.Generator().manual_seed(seed)
    num_out, num_in, dim = out_features // og, in_features // ig, og * ig

    # Fit W / 2**e: no squared norm underflows or overflows float32, whatever the weight's magnitude.
    w, exponent = _normalized(weight)
    # [O, og, I, ig] -> [O, I, og, ig] -> per-group vectors, row order (o, i).
    w_groups = w.reshape(num_out, og, num_in, ig).permute(0, 2, 1, 3).reshape(num_out, num_in, dim)
    w_norm = float(w.double().norm())
    scales = w.reshape(num_out, -1).pow(2).mean(1).sqrt()  # [O]

    def scaled_target() -> tuple[Tensor, Tensor]:
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        x = (w_groups / safe[:, None, None]).reshape(-1, dim)
        group_weight = scales.pow(2).repeat_interleave(num_in)  # the true error weights each group by s^2
        return x, group_weight

    def rel_error(codes: Tensor, books: Tensor) -> float:
        recon = _decode(codes, books).reshape(num_out, num_in, dim) * scales[:, None, None]
        if w_norm == 0.0:
            return 0.0
        return float((recon.double() - w_groups.double()).norm()) / w_norm

    x, gw = scaled_target()
    # Residual k-means, one codebook at a time.
    books = torch.zeros(num_codebooks, size, dim)
    codes = torch.zeros(x.shape[0], num_codebooks, dtype=torch.int64)
    residual = x.clone()
    fit_weight = gw if float(gw.sum()) > 0 else torch.ones_like(gw)
    for c in range(num_codebooks):
        books[c] = kmeans(residual, size, weights=fit_weight, iters=kmeans_iters, init=init, generator=generator)
        codes[:, c], _ = nearest(residual, books[c])
        residual -= books[c][codes[:, c]]
    errors = [rel_error(codes, books)]
    logger.debug("quantize %s [%d, %d]: round 0 error %.5f", scheme, out_features, in_features, errors[0])

    for rnd in range(1, rounds + 1):
        recon = _decode(codes, books)
        if beam_size > 1:
            candidate = _beam_codes(x, books, beam_size)
            new_recon = _decode(candidate, books)
            better = (x - new_recon).pow(2).sum(1) < (x - recon).pow(2).sum(1)
            codes[better] = candidate[better]
            recon[better] = new_recon[better]
        for c in range(num_codebooks):
            target = x - (recon - books[c][codes[:, c]])  # what codebook c should reproduce
            codes[:, c], _ = nearest(target, books[c])
            books[c] = _weighted_means(target, gw, codes[:, c], books[c])
            recon = (x - target) + books[c][codes[:, c]]
        # Least-squares scale per output group given the decoded (unscaled) groups.
        decoded = recon.reshape(num_out, -1)
        w_flat = w_groups.reshape(num_out, -1)
        energy = decoded.pow(2).sum(1)
        fitted = (w_flat * decoded).sum(1) / energy.clamp_min(1e-30)
        scales = torch.where(energy > 0, fitted, scales)
        x, gw = scaled_target()
        errors.append(rel_error(codes, books))
        logger.debug("quantize %s: round %d error %.5f", scheme, rnd, errors[-1])

    codebooks = books.reshape(num_codebooks, size, og, ig).to(out_dtype).contiguous()
    return QuantizedWeight(
        codes=pack_codes(codes.reshape(num_out, num_in, num_codebooks), scheme.nbits).contiguous(),
        codebooks=codebooks,
        scales=_stored_scales(scales, exponent, out_dtype, name).reshape(num_out, 1, 1, 1).contiguous(),
        scheme=scheme,
        errors=errors,
    )


def quantize_linear(linear: nn.Linear, scheme: Union[str, Scheme], **kwargs) -> tuple[nn.Module, list[float]]:
    """A new ``aqlm.QuantizedLinear`` for ``linear`` (bias copied) and its error per round.

    Keyword arguments go to :func:`quantize_weight`.
    """
    from aqlm import QuantizedLinear

    scheme = parse_scheme(scheme)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_linear needs an nn.Linear, got {type(linear).__name__}")
    q = quantize_weight(linear.weight, scheme, **kwargs)
    dtype = q.codebooks.dtype
    layer = QuantizedLinear(
        linear.in_features,
        linear.out_features,
        in_group_size=scheme.in_group_size,
        out_group_size=scheme.out_group_size,
        num_codebooks=scheme.num_codebooks,
        nbits_per_codebook=scheme.nbits,
        bias=linear.bias is not None,
        dtype=dtype,
    )
    layer.codes.data = q.codes
    layer.codebooks.data = q.codebooks
    layer.scales.data = q.scales
    if linear.bias is not None:
        layer.bias.data = linear.bias.detach().to("cpu", dtype).clone()
    layer.requires_grad_(False)
    return layer.to(linear.weight.device), q.errors


# ---------------------------------------------------------------------------------------------
# Whole models


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def _not_to_quantize(model: nn.Module, skipped_linears: list[str]) -> list[str]:
    """``linear_weights_not_to_quantize`` for transformers' AQLM loader.

    transformers < 5 compares ``<module>.weight`` names, transformers 5 matches module-name patterns
    (``should_convert_module``), so every skipped linear is listed both ways; the input and output
    embeddings' weights are listed too, as AQLM checkpoints on the Hub do.
    """
    names: list[str] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is None:
            continue
        for name, candidate in model.named_modules():
            if candidate is module and isinstance(candidate, (nn.Embedding, nn.Linear)):
                names.append(f"{name}.weight")
    for name in skipped_linears:
        names += [f"{name}.weight", name]
    return list(dict.fromkeys(names))


def quantize_model(
    model: nn.Module,
    scheme: Union[str, Scheme],
    skip: Iterable[str] = ("lm_head",),
    *,
    progress: bool = True,
    **kwargs,
) -> dict[str, list[float]]:
    """Replace every ``nn.Linear`` of ``model`` (except those matching ``skip``) by an AQLM layer.

    A name in ``skip`` matches a module of that full name, its children, or any module whose name
    ends with ``.<name>``. Sets ``model.config.quantization_config`` (a ``transformers.AqlmConfig``)
    when the model has a config, so ``save_pretrained`` writes a checkpoint that transformers'
    AQLM integration loads. Returns ``{module name: relative error per round}``; keyword
    arguments go to :func:`quantize_weight`. Raises ``ValueError`` naming the layer when there is
    nothing to quantize or a layer cannot be quantized (see :func:`quantize_weight`); the model is
    only changed once every layer is quantized.
    """
    from tqdm.auto import tqdm

    scheme = parse_scheme(scheme)
    skip = tuple(skip)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    todo = [(name, m) for name, m in linears if not _skipped(name, skip)]
    skipped = [name for name, _ in linears if _skipped(name, skip)]
    if not todo:
        what = "no nn.Linear layers" if not linears else f"no nn.Linear layers outside skip={list(skip)}"
        raise ValueError(f"{type(model).__name__} has {what} to quantize")
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for name, m in todo:
        shared = [n for n in owners.get(id(m.weight), []) if n != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"layer {name} shares its weight with {shared[0]} (tied embeddings?); keep it dense with skip"
            )
        check_weight(m.weight, f"layer {name}")
        if m.in_features % scheme.in_group_size or m.out_features % scheme.out_group_size:
            raise ValueError(
                f"layer {name} [{m.out_features}, {m.in_features}] does not split into groups of "
                f"{scheme.out_group_size} x {scheme.in_group_size} (scheme {scheme})"
            )
    errors: dict[str, list[float]] = {}
    layers: dict[str, nn.Module] = {}
    bar = tqdm(
        todo, desc=f"quantize {scheme}", unit="layer", disable=None if progress else True, leave=False
    )  # None: only on a terminal
    for name, linear in bar:
        layers[name], errors[name] = quantize_linear(linear, scheme, name=f"layer {name}", **kwargs)
        bar.set_postfix(err=f"{errors[name][-1]:.4f}")
    bar.close()
    for name, layer in layers.items():  # only now: a layer that fails leaves the model as it was
        _set_submodule(model, name, layer)

    config = getattr(model, "config", None)
    if config is not None:
        qconfig = scheme.aqlm_config(_not_to_quantize(model, skipped))
        _check_loader_agrees(qconfig.linear_weights_not_to_quantize, list(errors), skipped)
        config.quantization_config = qconfig
    return errors


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_loader_agrees(patterns: list[str], quantized: list[str], skipped: list[str]) -> None:
    """transformers must re-create exactly our AQLM layers from ``patterns`` when it loads the model."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # older transformers compare full weight names, which we list
        return
    wrong = [n for n in quantized if not should_convert_module(n, patterns)]
    wrong += [n for n in skipped if should_convert_module(n, patterns)]
    if wrong:
        raise RuntimeError(f"transformers would load these layers with the wrong type: {wrong}")


def layer_scheme(layer: nn.Module) -> Scheme:
    """The scheme of an ``aqlm.QuantizedLinear``."""
    return Scheme(layer.num_codebooks, layer.nbits_per_codebook, layer.in_group_size, layer.out_group_size)


def mean_errors(errors: dict[str, list[float]]) -> list[float]:
    """Mean relative error over layers, per round."""
    rows = list(errors.values())
    if not rows:
        return []
    return [sum(r[i] for r in rows) / len(rows) for i in range(min(len(r) for r in rows))]


# ---------------------------------------------------------------------------------------------
# Files that travel with the weights

# What a quantized checkpoint needs from its source besides the weights and config.json: the
# tokenizer (every format transformers reads, and our byte tokenizer) and the generation settings.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "aqlm_lora_tokenizer.json",
)
# Folder of named chat templates (transformers >= 4.54 saves them there).
TEMPLATE_DIR = "additional_chat_templates"


def copy_tokenizer_files(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> list[str]:
    """Copy :data:`TOKENIZER_FILES` (and the chat template folder) that ``src`` has into ``dst``.

    Runs after ``save_pretrained``: the source's own ``generation_config.json`` replaces the one
    transformers rewrites. Returns the names copied.
    """
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if (src / TEMPLATE_DIR).is_dir():
        shutil.copytree(src / TEMPLATE_DIR, dst / TEMPLATE_DIR, dirs_exist_ok=True)
        copied.append(TEMPLATE_DIR + "/")
    return copied
