"""One weight matrix -> AQLM codes, codebooks and scales (see the package docstring)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..scheme import Scheme, pack_codes, parse_scheme, unpack_codes
from .clustering import _beam_codes, _weighted_means, kmeans, nearest

logger = logging.getLogger(__name__)


@dataclass
class QuantizedWeight:
    """AQLM tensors of one weight and the relative error ``||W - W_q||_F / ||W||_F`` per round."""

    codes: Tensor  # [out/og, in/ig, C], int8/int16, signed
    codebooks: Tensor  # [C, 2**nbits, og, ig]
    scales: Tensor  # [out/og, 1, 1, 1]
    scheme: Scheme
    errors: list[float] = field(default_factory=list)  # round 0 = after residual k-means

    def to_linear(self, bias: Optional[Tensor] = None, device: Optional[torch.device] = None) -> nn.Module:
        """A frozen ``aqlm.QuantizedLinear`` of these tensors (``bias`` in the codebooks' dtype) on ``device``."""
        from aqlm import QuantizedLinear

        dtype = self.codebooks.dtype
        layer = QuantizedLinear(
            self.codes.shape[1] * self.scheme.in_group_size,
            self.codes.shape[0] * self.scheme.out_group_size,
            **self.scheme.aqlm_kwargs(),
            bias=bias is not None,
            dtype=dtype,
            device=device,
        )
        layer.codes.data = self.codes.to(device)
        layer.codebooks.data = self.codebooks.to(device)
        layer.scales.data = self.scales.to(device)
        if bias is not None:
            layer.bias.data = bias.detach().to(device, dtype).clone()
        return layer.requires_grad_(False)

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
    warm_start: Optional[QuantizedWeight] = None,
) -> QuantizedWeight:
    """Quantize a dense ``[out, in]`` weight to AQLM tensors (see the module docstring).

    ``rounds`` alternating refinement rounds follow the residual k-means; ``beam_size > 1`` adds a
    joint beam search over all codebooks at the start of each round (kept per group only where it
    lowers the error). ``dtype`` is the dtype of codebooks and scales (default: the weight's).
    ``ValueError`` (its message starts with ``name``) for an empty or non-finite weight, a shape the
    scheme does not split, or scales that ``dtype`` cannot hold; any finite magnitude is handled.

    ``warm_start``: codes, codebooks and scales of this scheme and shape to start from instead of
    the residual k-means (e.g. the AQLM weight an adapter was merged into): the scales are refitted
    to ``weight`` by least squares, then the same ``rounds`` follow (``errors[0]`` is the error after
    that refit). Starting near the answer, a round or two do what a fresh quantization needs
    k-means and more rounds for.
    """
    scheme = parse_scheme(scheme)
    check_weight(weight, name)
    if warm_start is not None:
        _check_warm_start(warm_start, scheme, weight.shape, name)
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

    def fit_scales(recon: Tensor) -> Tensor:
        """Least-squares scale per output group given the decoded (unscaled) groups ``recon``."""
        decoded = recon.reshape(num_out, -1)
        w_flat = w_groups.reshape(num_out, -1)
        energy = decoded.pow(2).sum(1)
        fitted = (w_flat * decoded).sum(1) / energy.clamp_min(1e-30)
        return torch.where(energy > 0, fitted, scales)

    if warm_start is not None:
        books = warm_start.codebooks.detach().to("cpu", torch.float32).reshape(num_codebooks, size, dim).clone()
        codes = unpack_codes(warm_start.codes.detach().cpu(), scheme.nbits).reshape(-1, num_codebooks)
        # the codebooks fit W / (scale * 2**e): carry the stored scales into that frame, then refit them
        scales = _times_power_of_two(warm_start.scales.detach().to("cpu", torch.float64).flatten(), -exponent).float()
        scales = fit_scales(_decode(codes, books))
        x, gw = scaled_target()
    else:
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
        scales = fit_scales(recon)
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


def _check_warm_start(start: QuantizedWeight, scheme: Scheme, shape: torch.Size, name: str) -> None:
    """The warm start must be of ``scheme`` and of the weight's shape."""
    out_features, in_features = shape
    og, ig, num_codebooks = scheme.out_group_size, scheme.in_group_size, scheme.num_codebooks
    expected = {
        "codes": (out_features // og, in_features // ig, num_codebooks),
        "codebooks": (num_codebooks, 2**scheme.nbits, og, ig),
        "scales": (out_features // og, 1, 1, 1),
    }
    for what, want in expected.items():
        got = tuple(getattr(start, what).shape)
        if got != want:
            raise ValueError(
                f"{name}: warm start {what} have shape {list(got)}, expected {list(want)} for scheme {scheme} "
                f"and a [{out_features}, {in_features}] weight"
            )


def quantize_linear(linear: nn.Linear, scheme: Union[str, Scheme], **kwargs) -> tuple[nn.Module, list[float]]:
    """A new ``aqlm.QuantizedLinear`` for ``linear`` (bias copied) and its error per round.

    Keyword arguments go to :func:`quantize_weight`.
    """
    scheme = parse_scheme(scheme)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_linear needs an nn.Linear, got {type(linear).__name__}")
    q = quantize_weight(linear.weight, scheme, **kwargs)
    return q.to_linear(linear.bias, linear.weight.device), q.errors
