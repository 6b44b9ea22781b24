"""Nearest neighbours, k-means and beam search over codebooks (chunked, vectorised)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 20  # at most this many distance entries (4 MiB of fp32) at a time
_KMEANS_PP_MAX_ENTRIES = 1024



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


