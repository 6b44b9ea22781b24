"""The one cache key for tensors, shared by the layer's caches (DoRA norms, mixed-batch adapter stacks).

A cached result is valid while the tensors it was computed from are the same objects with the same
contents. :func:`tensor_key` names the object itself through a weak reference compared by
identity (a fresh tensor that lands at a freed tensor's address, with the same ``_version``, is a
different object and never matches; the cache does not keep the old one alive), plus its address,
``_version``, dtype, device, shape and strides. In-place ops and optimizer steps bump
``_version``; writes through ``.data`` (``p.data.copy_(...)``, as PEFT's hotswap does) bump
nothing and need ``AqlmLoraLinear.clear_caches()``.

A live weak reference also makes ``torch.utils.swap_tensors`` refuse the tensor (used by
``nn.Module.to`` only under ``torch.__future__.set_swap_module_params_on_conversion(True)``):
``clear_caches()`` drops them.
"""

from __future__ import annotations

import weakref
from typing import Optional

from torch import Tensor

__all__ = ["tensor_key"]


class _Same:
    """A weak reference equal to another only when both still point at the very same tensor object
    (``weakref.ref`` itself would compare the tensors' values). Keys are compared, never hashed."""

    __slots__ = ("ref",)

    def __init__(self, t: Tensor) -> None:
        self.ref = weakref.ref(t)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return NotImplemented
        t = self.ref()
        return t is not None and t is other.ref()

    __hash__ = None  # type: ignore[assignment]


def tensor_key(t: Optional[Tensor]) -> tuple:
    """What a result computed from ``t`` depends on (``()`` for None). A view (the codes permuted by
    ``canonical_codes``, made anew on every call) is named by its base tensor, which owns its data."""
    if t is None:
        return ()
    owner = t if t._base is None else t._base
    return (_Same(owner), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride())
