"""The ops a loaded aqlm_lora library registers, read back from torch's dispatcher.

The schemas in csrc/aqlm_lora.cpp are the one list of ops: the GPU check, the compile-only CUDA
check and the smoke test ask the dispatcher which ops exist instead of naming them, so a new op is
checked without editing any script. Needs torch only; the caller loads the library first
(``import aqlm_lora`` or ``torch.ops.load_library``).
"""

from __future__ import annotations

import torch

NAMESPACE = "aqlm_lora"


def registered_ops(namespace: str = NAMESPACE) -> list[str]:
    """Names (without the ``namespace::`` prefix) of every op whose schema is registered, sorted."""
    prefix = f"{namespace}::"
    names = {n[len(prefix) :].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}
    return sorted(names)


def has_kernel(op: str, key: str, namespace: str = NAMESPACE) -> bool:
    """Whether ``namespace::op`` has a kernel for dispatch key ``key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{op}", key)


def missing_kernels(key: str, namespace: str = NAMESPACE) -> list[str]:
    """Registered ops without a ``key`` kernel. Raises when the namespace has no op at all, which
    means the library was not loaded: an empty list must never read as "nothing is missing"."""
    ops = registered_ops(namespace)
    if not ops:
        raise RuntimeError(f"no {namespace}:: op is registered: the library is not loaded")
    return [op for op in ops if not has_kernel(op, key, namespace)]
