"""Run every ``aqlm.QuantizedLinear`` of a model on our kernels, with or without PEFT, and undo it.

PEFT replaces only the layers a LoRA config targets; the others (with PEFT's default Llama targets
``q_proj``/``v_proj``: ``k_proj``, ``o_proj`` and the MLP) would still call aqlm's own forward,
which on CPU is slow, races in its multithreaded numba kernel, cannot be trained through for 8-bit
codebooks and permutes their codes in place. :func:`use_fused_kernels` gives each such layer an
instance-level ``forward`` that calls :func:`aqlm_lora.functional.aqlm_linear` on its codes as stored
(the class, the parameters and the state dict are untouched); :func:`restore_aqlm_kernels` takes
it away again. :func:`aqlm_lora.register` applies it to the model PEFT adapts (see
:mod:`aqlm_lora.lora.dispatch`).

This module needs torch only (it never imports aqlm: a model can hold aqlm layers only once aqlm
was imported), so the training helpers and the CLI import it without loading aqlm.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import functional

__all__ = [
    "FusedKernels",
    "canonical_codes",
    "on_fused_kernels",
    "restore_aqlm_kernels",
    "restore_checkpoint_layout",
    "use_fused_kernels",
]

# Patching walks a model and swaps attributes layer by layer: one lock keeps two concurrent calls
# (say, a patch and a restore of one model from two threads) from interleaving on a layer.
_LOCK = threading.RLock()


def canonical_codes(base_layer: nn.Module) -> Tensor:
    """The base layer's codes as ``[out_groups, in_groups, num_codebooks]``, never modifying them.

    ``aqlm.QuantizedLinear.forward`` on CPU with 8-bit codebooks (``codebook_size == 256``) permutes
    ``codes`` in place to ``[in_groups, out_groups, C]`` the first time it runs (``prepare_matmul_op``,
    which also sets ``gemv_op``). Such codes are returned as a permuted view of the stored tensor.
    When ``out_groups == in_groups`` the shape cannot tell the layouts apart; the layout is then
    inferred from the device aqlm prepared on (CPU permutes, CUDA does not) and refused when the
    codes are on CUDA, where it cannot be inferred.
    """
    codes = base_layer.codes
    num_out = base_layer.out_features // base_layer.out_group_size
    num_in = base_layer.in_features // base_layer.in_group_size
    num_cb = base_layer.num_codebooks
    canonical, permuted = (num_out, num_in, num_cb), (num_in, num_out, num_cb)
    shape = tuple(codes.shape)
    may_be_permuted = getattr(base_layer, "gemv_op", None) is not None and base_layer.codebook_size == 256
    if not may_be_permuted or canonical == permuted:
        if shape != canonical:
            raise ValueError(
                f"aqlm_lora: the base layer's codes have shape {list(shape)}, expected {list(canonical)} "
                "[out_features/out_group_size, in_features/in_group_size, num_codebooks]"
            )
        if not may_be_permuted:
            return codes
        if codes.is_cuda:
            raise ValueError(
                "aqlm_lora: this aqlm.QuantizedLinear has 8-bit codebooks and already ran its own forward, "
                "which permutes `codes` in place on CPU (to [in_groups, out_groups, C]); with "
                f"out_groups == in_groups == {num_out} the layout cannot be inferred for codes on CUDA. "
                "Reload the layer's codes from the checkpoint (or wrap the layer before calling it)."
            )
        return codes.permute(1, 0, 2)
    if shape == canonical:
        return codes
    if shape == permuted:
        return codes.permute(1, 0, 2)
    raise ValueError(
        f"aqlm_lora: the base layer's codes have shape {list(shape)}, expected {list(canonical)} "
        f"(or {list(permuted)} after aqlm's in-place CPU permutation)"
    )


class _FusedForward:
    """The ``forward`` installed on one layer: ``aqlm_linear`` on its codes, codebooks, scales, bias.

    A small class rather than a bound method so that a patched model still pickles and deep-copies
    (the copy's forward computes with the copy's tensors), and so that ours is recognisable.
    ``replaced`` is the instance attribute it displaced (None: there was none), put back on restore.
    """

    def __init__(self, layer: nn.Module, replaced: Optional[Any]) -> None:
        self.layer = layer
        self.replaced = replaced

    def __call__(self, input: Tensor) -> Tensor:
        layer = self.layer
        return functional.aqlm_linear(input, canonical_codes(layer), layer.codebooks, layer.scales, layer.bias)

    def __repr__(self) -> str:
        return "<aqlm_lora fused forward>"


def _slot(layer: nn.Module) -> str:
    # accelerate's hooks (device_map offloading) move the real forward to `_old_forward` and install
    # a wrapper as `forward`; replace the real one, so the hook keeps working around our kernels.
    return "_old_forward" if "_old_forward" in vars(layer) and "_hf_hook" in vars(layer) else "forward"


def on_fused_kernels(layer: nn.Module) -> bool:
    """Whether ``layer`` (an ``aqlm.QuantizedLinear``) currently runs on our kernels."""
    return isinstance(vars(layer).get(_slot(layer)), _FusedForward)


def _patch(layer: nn.Module) -> bool:
    slot = _slot(layer)
    current = vars(layer).get(slot)
    if isinstance(current, _FusedForward):
        return False
    setattr(layer, slot, _FusedForward(layer, current))
    return True


def _unpatch(layer: nn.Module) -> bool:
    slot = _slot(layer)
    current = vars(layer).get(slot)
    if not isinstance(current, _FusedForward):
        return False
    if current.replaced is not None:
        setattr(layer, slot, current.replaced)
    elif slot == "forward":
        delattr(layer, slot)  # the class's forward (aqlm's) shows through again
    else:  # patched before accelerate hooked the layer: its wrapper calls `_old_forward`, keep one
        setattr(layer, slot, types.MethodType(type(layer).forward, layer))
    return True


def _aqlm_layers(model: nn.Module) -> list[nn.Module]:
    # A QuantizedLinear exists only once aqlm was imported: without it there is nothing to patch,
    # and a torch-only install can call this too.
    aqlm = sys.modules.get("aqlm")
    if aqlm is None:
        return []
    return [m for m in model.modules() if isinstance(m, aqlm.QuantizedLinear)]


class FusedKernels:
    """What :func:`use_fused_kernels` did to a model; ``restore()`` (or leaving a ``with``) undoes it.

    ``layers``: every ``aqlm.QuantizedLinear`` of the model (all now on our kernels); ``count``:
    how many; ``patched``: those this call switched (the rest already were). ``restore()`` switches
    back only ``patched``, so nested uses leave an outer one in place.
    """

    def __init__(self, layers: list[nn.Module], patched: list[nn.Module]) -> None:
        self.layers = tuple(layers)
        self.patched = tuple(patched)

    @property
    def count(self) -> int:
        return len(self.layers)

    def restore(self) -> int:
        """Put the layers this call switched back on aqlm's own forward; returns how many it did."""
        with _LOCK:
            return sum(_unpatch(layer) for layer in self.patched)

    def __enter__(self) -> FusedKernels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"FusedKernels(count={self.count}, patched={len(self.patched)})"


def use_fused_kernels(model: nn.Module) -> FusedKernels:
    """Run every ``aqlm.QuantizedLinear`` in ``model`` on aqlm_lora's kernels; returns a handle.

    Each layer (a bare one, or the base layer inside a PEFT tuner layer) gets an instance-level
    ``forward`` that computes ``x @ W^T + bias`` with :func:`aqlm_lora.functional.aqlm_linear` straight from
    its codes (read as stored, also after aqlm's own CPU forward has permuted them), differentiable
    with respect to ``x`` and ``bias``. Parameters, state dict, ``save_pretrained`` and the class are
    unchanged; the patch itself is not saved. Calling it again is a no-op for patched layers.

    Use it for inference or training without PEFT (``generate()``, perplexity, a teacher model);
    :func:`aqlm_lora.register`'s configs apply it by themselves in ``get_peft_model``. Undo it with
    ``handle.restore()``, ``with use_fused_kernels(model): ...``, or :func:`restore_aqlm_kernels`.
    """
    with _LOCK:
        layers = _aqlm_layers(model)
        patched = [layer for layer in layers if _patch(layer)]
    return FusedKernels(layers, patched)


def restore_aqlm_kernels(model: nn.Module) -> int:
    """Put every ``aqlm.QuantizedLinear`` in ``model`` back on aqlm's own forward; returns how many
    were on ours. Our PEFT layers (:class:`aqlm_lora.AqlmLoraLinear`) compute with our kernels either
    way; this switches the bare layers (the untargeted ones, or all of them after ``unload()``)."""
    with _LOCK:
        return sum(_unpatch(layer) for layer in _aqlm_layers(model))


@torch.no_grad()
def restore_checkpoint_layout(model: nn.Module) -> int:
    """Write the codes of every ``aqlm.QuantizedLinear`` in ``model`` that aqlm's own CPU forward
    permuted back in the checkpoint layout ``[out_groups, in_groups, C]``; returns how many.

    Saved permuted, such codes fail to load (size mismatch) or, for a square grid of groups, load
    without complaint into a wrong weight. aqlm's prepared ops are dropped with them, so its next
    forward prepares (and permutes) again, as on a freshly loaded layer.
    """
    restored = 0
    for layer in _aqlm_layers(model):
        codes = canonical_codes(layer)
        if codes is layer.codes:
            continue
        layer.codes.data = codes.contiguous()
        layer.gemv_op = layer.gemm_op = layer.use_gemv_rule = None
        restored += 1
    return restored
