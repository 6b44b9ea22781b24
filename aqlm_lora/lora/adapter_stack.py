"""Every adapter of one ``AqlmLoraLinear`` stacked for mixed batches (``forward(x, adapter_names=...)``).

The fused op ``lora_mixed_forward`` takes the adapters as stacks: ``lora_A [K, r, in]``,
``lora_B_t [K, r, out]`` (``lora_B`` transposed, ranks zero-padded to the largest), ``scalings
[K]``, ``lora_bias [K, out]`` (zeros for adapters without one) and ``row_scale [K, out]`` (DoRA's
``m / ||W + s B A||``, ones for plain adapters). Building them copies every adapter's weights, so
:class:`AdapterStack` builds them once and reuses them until an adapter changes. The key holds, per
adapter, its name, scaling, and :func:`~aqlm_lora.lora.tensor_key.tensor_key` (the tensor object,
its ``_version``, dtype, device, shape) and ``requires_grad`` of its ``A``, ``B``, ``lora_bias`` and
DoRA magnitude (and of the base tensors when a DoRA adapter is present): adding, deleting, loading
or re-assigning an adapter, an optimizer step, or ``requires_grad_`` all change it. As with
:class:`~aqlm_lora.lora.dora.DoraNorms`, writes through ``.data`` bump no version and are not seen:
call ``AqlmLoraLinear.clear_caches()`` after them (PEFT's hotswap does, once registered).

When a gradient is wanted (grad mode on and a tensor of an adapter some row uses requires grad) the
stacks are built fresh on every call, so autograd reaches those adapters' parameters; nothing is
cached then. Adapters no row uses enter as detached copies, so their ``.grad`` stays None (as in
PEFT, where they never run) and weight decay leaves them alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensor_key import tensor_key

__all__ = ["AdapterStack", "StackedAdapters"]


@dataclass
class StackedAdapters:
    index: dict[str, int]  # adapter name -> its position k in the stacks
    lora_A: Tensor  # [K, r, in]
    lora_B_t: Tensor  # [K, r, out]
    scalings: Tensor  # [K]
    lora_bias: Optional[Tensor]  # [K, out]
    row_scale: Optional[Tensor]  # [K, out]


def _tensor_key(t: Optional[Tensor]) -> tuple:
    return () if t is None else (*tensor_key(t), t.requires_grad)


class AdapterStack:
    """The cached stacks of one layer (never part of the state dict)."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._stacked: Optional[StackedAdapters] = None
        self._indices: Optional[tuple[tuple, Tensor]] = None
        self.builds = 0  # how many times the stacks were built (tests read it)

    def clear(self) -> None:
        self._key = self._stacked = self._indices = None

    def __reduce__(self) -> tuple:
        # A copy (pickle, torch.save, deepcopy) starts empty: its keys name the original's tensor
        # objects through weak references, which neither pickle nor match the copy's tensors.
        return (type(self), ())

    def _adapter_tensors(self, layer, name: str) -> list[Optional[Tensor]]:
        magnitude = layer.lora_magnitude_vector[name].weight if name in layer.lora_magnitude_vector else None
        lora_B = layer.lora_B[name]
        return [layer.lora_A[name].weight, lora_B.weight, lora_B.bias, magnitude]

    @torch.compiler.disable
    def stacked(self, layer, used: Collection[str]) -> StackedAdapters:
        """The stacks of every adapter of ``layer`` (its ``lora_A`` keys, in order); only the adapters
        in ``used`` (those some row of the batch names) are connected to autograd."""
        names = list(layer.lora_A.keys())
        tensors = [self._adapter_tensors(layer, name) for name in names]
        differentiable = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for name, ts in zip(names, tensors) if name in used for t in ts
        )
        has_dora = any(ts[3] is not None for ts in tensors)
        base_key = tuple(_tensor_key(t) for t in layer.quantized_weight()) if has_dora else ()
        key = (
            tuple(
                (name, float(layer.scaling[name]), *(_tensor_key(t) for t in ts)) for name, ts in zip(names, tensors)
            ),
            base_key,
            layer.training,
            torch.is_inference_mode_enabled(),  # inference tensors cannot be saved for a later backward
        )
        if not differentiable and self._stacked is not None and self._key == key:
            return self._stacked
        self.builds += 1
        if differentiable:
            self._key = self._stacked = None
            detached = [
                ts if name in used else [None if t is None else t.detach() for t in ts]
                for name, ts in zip(names, tensors)
            ]
            return self._build(layer, names, detached)
        with torch.no_grad():  # constants, reused by later calls: connected to no parameter
            self._stacked = self._build(layer, names, tensors)
        self._key = key
        return self._stacked

    @staticmethod
    def _build(layer, names: list[str], tensors: list[list[Optional[Tensor]]]) -> StackedAdapters:
        dtype = tensors[0][0].dtype
        for weight_A, weight_B, _, _ in tensors:
            dtype = torch.promote_types(dtype, torch.promote_types(weight_A.dtype, weight_B.dtype))
        device = tensors[0][0].device
        rank = max(ts[0].shape[0] for ts in tensors)
        out_features = tensors[0][1].shape[0]
        stack_A, stack_B, biases, row_scales = [], [], [], []
        for name, (weight_A, weight_B, bias, magnitude) in zip(names, tensors):
            pad = rank - weight_A.shape[0]
            stack_A.append(F.pad(weight_A.to(dtype), (0, 0, 0, pad)))
            stack_B.append(F.pad(weight_B.to(dtype).T, (0, 0, 0, pad)))
            biases.append(bias.to(dtype) if bias is not None else torch.zeros(out_features, dtype=dtype, device=device))
            if magnitude is None:
                row_scales.append(torch.ones(out_features, dtype=dtype, device=device))
            else:
                scale = layer.dora_scale(name)  # reads the layer's own magnitude: detach it with the rest
                row_scales.append((scale if magnitude.requires_grad else scale.detach()).to(dtype))
        has_bias = any(ts[2] is not None for ts in tensors)
        has_dora = any(ts[3] is not None for ts in tensors)
        return StackedAdapters(
            index={name: k for k, name in enumerate(names)},
            lora_A=torch.stack(stack_A).contiguous(),
            lora_B_t=torch.stack(stack_B).contiguous(),
            scalings=torch.tensor([float(layer.scaling[name]) for name in names], dtype=dtype, device=device),
            lora_bias=torch.stack(biases) if has_bias else None,
            row_scale=torch.stack(row_scales) if has_dora else None,
        )

    @torch.compiler.disable
    def indices(self, adapter_names: list[str], index: dict[str, int], rows_per_item: int, device) -> Tensor:
        """int64 ``[len(adapter_names) * rows_per_item]``: each name's stack position (-1: none), repeated
        for the rows of its batch item. The last one is cached (``generate`` asks for it every step)."""
        key = (
            tuple(adapter_names),
            tuple(sorted(index.items())),
            rows_per_item,
            device,
            torch.is_inference_mode_enabled(),
        )
        if self._indices is not None and self._indices[0] == key:
            return self._indices[1]
        per_item = torch.tensor([index.get(name, -1) for name in adapter_names], dtype=torch.int64)
        indices = per_item.repeat_interleave(rows_per_item).to(device)
        self._indices = (key, indices)
        return indices
