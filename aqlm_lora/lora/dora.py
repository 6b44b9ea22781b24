"""DoRA on an AQLM layer, computed from the codes: the row norms of ``W + s*B@A`` and the output terms.

PEFT's DoRA (``peft.tuners.lora.dora.DoraLinearLayer``) rescales each output row ``o`` by
``m_o / ||W_o + s (BA)_o||``, the norm treated as a constant in backward (detached). PEFT gets the
norm from the dense weight; an AQLM layer has none, so the norm is expanded:

    ||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s sum_i (W A^T)_{o,i} B_{o,i} + s^2 sum_i (B (A A^T))_{o,i} B_{o,i}

- ``||W_o||^2`` depends on the frozen codes only: one blocked pass of ``ops.dequantize`` over row
  slices (never more than ``_BLOCK_ELEMENTS`` weights at a time), cached per layer and recomputed
  when the codes, codebooks or scales change (:func:`~aqlm_lora.lora.tensor_key.tensor_key`: the
  tensor objects, their address, ``_version``, dtype, device, shape);
- ``W A^T`` is one ``ops.aqlm_gemm`` with the ``r`` rows of ``A`` as tokens: one pass over the codes
  for ``r`` tokens, the cost of the base matmul on ``r`` rows;
- the last term is ``O(r^2 (in + out))`` dense work.

A new op could not do better: ``||W_o||^2`` needs every weight once (one pass, done once per layer
instead of per step) and ``W A^T`` is exactly the base matmul on ``r`` rows (one pass per step,
fused with nothing else that reads the codes: the step's own base matmul reads ``x``, which the
norm must not depend on). So the composed ops read the codes as often as one new kernel would.

The forward mirrors PEFT's ``DoraLinearVariant.forward`` term for term (see :func:`dora_step`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import Tensor, nn

from .. import functional, ops
from ..reference import dropout_scaled
from .tensor_key import tensor_key

__all__ = ["AqlmDoraVariant", "DoraMagnitude", "DoraNorms", "dora_step", "lora_row_norms", "weight_row_sq_norms"]

# At most this many dense weights exist at once while computing ||W_o||^2 (8 MiB in float64).
_BLOCK_ELEMENTS = 1 << 20

# The expansion's terms are as large as ||W_o||^2 and cancel where an adapter nearly cancels a row
# (||W_o + s (BA)_o|| << ||W_o||): in float32 the norm then lost 5e-2 (relative) where PEFT's direct
# float32 norm loses 5e-4. ||W_o||^2 is kept in float64 (computed once per layer); rows whose terms
# add up to more than _MAX_CANCELLATION times their sum are recomputed in float64 from their own
# dequantized rows. Doing every row in float64 instead cost 1.18x-1.27x a LoRA step (1.09x before).
_MAX_CANCELLATION = 4.0


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _groups_per_block(codes: Tensor, codebooks: Tensor) -> int:
    """Output groups whose dequantized rows hold at most ``_BLOCK_ELEMENTS`` weights (at least one)."""
    out_group, in_features = codebooks.shape[2], codes.shape[1] * codebooks.shape[3]
    return max(1, _BLOCK_ELEMENTS // (out_group * in_features))


@torch.no_grad()
def weight_row_sq_norms(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """``||W_o||^2`` for every output row, in float64, one block at a time."""
    books, scales = codebooks.detach().double(), scales.detach().double()
    step = _groups_per_block(codes, codebooks)
    parts = []
    for start in range(0, codes.shape[0], step):
        block = ops.dequantize(codes[start : start + step], books, scales[start : start + step])
        parts.append(block.square_().sum(1))  # in place: one block alive, not two
    return torch.cat(parts)


def _squared_norms(weight_sq: Tensor, wa: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``||W_o||^2 + 2 s (W A^T)_o . B_o + s^2 (B A A^T)_o . B_o`` and the sum of the terms' sizes."""
    cross = (2.0 * scaling) * (wa.T * b).sum(1)
    lora_sq = (scaling * scaling) * ((b @ (a @ a.T)) * b).sum(1)
    weight_sq = weight_sq.to(cross.dtype)
    return weight_sq + cross + lora_sq, weight_sq + cross.abs() + lora_sq


@torch.no_grad()
def lora_row_norms(
    codes: Tensor, codebooks: Tensor, scales: Tensor, weight_sq: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float
) -> Tensor:
    """``||W_o + scaling * (B A)_o||`` for every output row (detached), from ``weight_sq = ||W_o||^2``
    (float64), in float32 (float64 when an input is float64); cancelling rows in float64."""
    acc = _acc_dtype(codebooks, lora_A, lora_B)
    codebooks, scales = codebooks.detach(), scales.detach()
    a, b = lora_A.detach().to(acc), lora_B.detach().to(acc)
    wa = ops.aqlm_gemm(a, codes, codebooks, scales, None)  # [r, out] = A W^T
    squared, size = _squared_norms(weight_sq, wa, a, b, scaling)
    if acc != torch.float64:
        cancels = squared * _MAX_CANCELLATION < size
        # Not while traced (torch.compile): the rows are a data-dependent selection.
        if not torch.compiler.is_compiling() and bool(cancels.any()):
            squared = _cancelling_rows(cancels, squared, codes, codebooks, scales, weight_sq, a, b, scaling)
    return squared.clamp_min(0.0).sqrt()


def _cancelling_rows(
    cancels: Tensor,
    squared: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor,
    weight_sq: Tensor,
    a: Tensor,
    b: Tensor,
    scaling: float,
) -> Tensor:
    """``squared`` with the rows ``cancels`` marks recomputed in float64 from their output groups'
    dequantized rows (usually few: an adapter cancelling a row is rare), a block of at most
    ``_BLOCK_ELEMENTS`` weights at a time."""
    out_group, step = codebooks.shape[2], _groups_per_block(codes, codebooks)
    books, a64 = codebooks.double(), a.double()
    all_groups = torch.unique(cancels.nonzero().squeeze(1) // out_group)
    for start in range(0, all_groups.numel(), step):
        groups = all_groups[start : start + step]
        rows = (groups[:, None] * out_group + torch.arange(out_group, device=groups.device)).reshape(-1)
        weight = ops.dequantize(codes[groups], books, scales[groups].double())  # [rows, in]
        exact, _ = _squared_norms(weight_sq[rows], (a64 @ weight.T), a64, b[rows].double(), scaling)
        squared = squared.index_copy(0, rows, exact.to(squared.dtype))
    return squared


class DoraNorms:
    """The layer's cached norms (never part of the state dict).

    ``||W_o||^2`` is cached for the layer's life, keyed on the codes, codebooks and scales. An
    adapter's row norms are cached only outside training (inference), keyed on its ``A``, ``B``,
    scaling and the base tensors; :meth:`clear_adapters` drops them (the layer does on ``train(True)``).
    Keys (:func:`~aqlm_lora.lora.tensor_key.tensor_key`) name the tensor objects and read their
    ``_version``: a new tensor assigned in place of an old one is seen, but writes through ``.data``
    (which bump no version; PEFT's hotswap, which the layer handles) are not: call
    ``AqlmLoraLinear.clear_caches()`` after them.
    """

    def __init__(self) -> None:
        self._weight: Optional[tuple[tuple, Tensor]] = None
        self._adapters: dict[str, tuple[tuple, Tensor]] = {}

    @torch.compiler.disable
    def weight_sq(self, codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
        key = tuple(tensor_key(t) for t in (codes, codebooks, scales))
        if self._weight is None or self._weight[0] != key:
            self._weight = (key, weight_row_sq_norms(codes, codebooks, scales))
        return self._weight[1]

    @torch.compiler.disable
    def row_norms(
        self,
        name: str,
        weight: tuple[Tensor, Tensor, Tensor],
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        cache: bool,
    ) -> Tensor:
        """``||W + scaling * B@A||`` per row for adapter ``name``; ``weight``: ``(codes, codebooks, scales)``."""
        # Norms made under inference_mode are inference tensors: a later forward with grad may not
        # save them for backward (magnitude / norms), so they never serve outside that mode.
        key = (
            tuple(tensor_key(t) for t in (*weight, lora_A, lora_B)),
            float(scaling),
            torch.is_inference_mode_enabled(),
        )
        hit = self._adapters.get(name)
        if cache and hit is not None and hit[0] == key:
            return hit[1]
        norms = lora_row_norms(*weight, self.weight_sq(*weight), lora_A, lora_B, scaling)
        if cache:
            self._adapters[name] = (key, norms)
        else:
            self._adapters.pop(name, None)
        return norms

    def clear_adapters(self) -> None:
        self._adapters.clear()

    def forget(self, name: str) -> None:
        self._adapters.pop(name, None)

    def clear(self) -> None:
        self._weight = None
        self._adapters.clear()

    def __reduce__(self) -> tuple:
        # A copy (pickle, torch.save, deepcopy) starts empty, as AdapterStack's does.
        return (type(self), ())


class DoraMagnitude(nn.Module):
    """DoRA's magnitude vector ``m`` of one adapter, as ``weight`` (PEFT's state-dict key
    ``lora_magnitude_vector.<adapter>.weight``, saved as ``...lora_magnitude_vector``)."""

    def __init__(self, magnitude: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


class AqlmDoraVariant(LoraVariant):
    """``use_dora=True`` on :class:`~aqlm_lora.lora.layer.AqlmLoraLinear`.

    Only ``init`` is PEFT's business (``update_layer`` calls it): ``m`` starts as the row norms of
    ``W + s*B@A``, as PEFT's. The layer computes the forward and merges itself.
    """

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        base = module.quantized_base()
        lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        dtype = torch.promote_types(base.codebooks.dtype, lora_A.dtype)
        if lora_A.is_meta or lora_B.is_meta:
            # low_cpu_mem_usage=True: the adapter is made on meta and its state dict, magnitude
            # included, is assigned afterwards; there is nothing to compute norms from yet.
            magnitude = torch.empty(module.out_features, dtype=dtype, device="meta")
        else:
            with torch.no_grad():
                norms = module.dora_norms.row_norms(
                    adapter_name, module.quantized_weight(), lora_A, lora_B, module.scaling[adapter_name], cache=False
                )
            magnitude = norms.to(dtype)
        module.lora_magnitude_vector[adapter_name] = DoraMagnitude(magnitude)

    @staticmethod
    def _unused(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("AqlmLoraLinear computes DoRA's forward and merge itself")

    merge_safe = merge_unsafe = unmerge = forward = _unused


def dora_step(
    prev: Optional[Tensor],
    x: Tensor,
    weight: tuple[Tensor, Tensor, Tensor],
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    scale: Tensor,
    dropout_p: float,
    fold: bool = False,
) -> Tensor:
    """The layer output after one DoRA adapter, from the output ``prev`` before it (None: first adapter).

    ``scale = m / ||W + s*B@A||`` per output row (the norm detached). PEFT's formula, with
    ``u = xd W^T``, ``v = s (xd A^T) B^T`` and ``xd = dropout(x)``::

        no dropout:  y = prev + (scale - 1) * (prev - bias) + scale * v   (= scale * (prev - bias + v) + bias)
        dropout:     y = prev + (scale - 1) * u + scale * v               (the base recomputed on xd)

    ``dropout_p == 1`` (PEFT's ``nn.Dropout(p=1)``): ``xd = x * 0``.

    With ``prev`` None, ``prev = x W^T + bias``: without dropout base and LoRA come from one fused
    call; with dropout ``x W^T`` and ``xd W^T`` come from one ``aqlm_gemm`` over both inputs stacked.

    ``fold`` (no gradient wanted for ``scale``, one output row per AQLM scale): the first adapter's
    ``scale`` goes into the scales and ``B`` instead, ``y = x (scale W)^T + bias + s (x A^T)(scale B)^T``,
    so inference costs one fused call and nothing more.
    """
    codes, codebooks, scales = weight
    if dropout_p == 0.0:
        if prev is None and fold:
            rows = scale.detach()
            folded_B = (lora_B * rows[:, None]).to(lora_B.dtype)
            return functional.aqlm_lora_linear(
                x, codes, codebooks, scales * rows.view(-1, 1, 1, 1), bias, lora_A, folded_B, scaling
            )
        if prev is None:  # scale * (x W^T + v), the bias outside the fused call so it is not rescaled
            lora = functional.aqlm_lora_linear(x, codes, codebooks, scales, None, lora_A, lora_B, scaling)
        else:
            unbiased = prev if bias is None else prev - bias
            lora = unbiased + functional.lora_delta(x, lora_A, lora_B, scaling)
        return lora * scale if bias is None else torch.addcmul(bias, lora, scale)
    if dropout_p == 1.0:  # nn.Dropout(p=1) gives x * 0 (NaN where x is not finite); the op's mask needs p < 1
        xd = x.to(lora_A.dtype) * 0
    else:
        xd = dropout_scaled(x.to(lora_A.dtype), ops.dropout_mask(x, dropout_p, functional.draw_seed()), dropout_p)
    v = ((xd @ lora_A.T) @ lora_B.T) * scaling
    if prev is None:
        dtype = torch.promote_types(x.dtype, xd.dtype)
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        both = functional.aqlm_linear(torch.cat([rows, xd.reshape(rows.shape).to(dtype)]), codes, codebooks, scales)
        base, u = (part.reshape(v.shape) for part in both.split(rows.shape[0]))
        prev = base if bias is None else base + bias
    else:
        u = functional.aqlm_linear(xd, codes, codebooks, scales)
    return torch.addcmul(prev - u, u + v, scale)
