"""The argument checks of ``csrc/common/checks.h``, in Python, for the fake kernels and the wrappers.

Fake (meta) kernels run instead of the C++ ones under ``torch.compile``, on ``meta`` tensors and
whenever one argument is on the ``meta`` device, so they must refuse what the C++ kernels refuse,
with the same words. ``tests/ops/test_checks.py`` runs its bad-input table through both and compares
the messages: change one side, change the other.

Conditions go through ``torch._check`` so that symbolic sizes become guards instead of errors.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

# How c10 prints a ScalarType in TORCH_CHECK messages.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT64_MAX = 2**63 - 1


def scalar_type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def sizes(shape: Sequence) -> str:
    """A shape as c10 prints an IntArrayRef: ``[2, 31]``."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check(cond, message: Callable[[], str]) -> None:
    torch._check(cond, lambda: "aqlm_lora: " + message())


def _is_static(*values) -> bool:
    return all(isinstance(v, int) for v in values)


def check_float(t: Tensor, name: str) -> None:
    _check(
        t.dtype in _FLOATS,
        lambda: f"{name} must be float32, float16, bfloat16 or float64, got {scalar_type_name(t.dtype)}",
    )


def check_same_device(ref: Tensor, t: Tensor, name: str) -> None:
    _check(t.device == ref.device, lambda: f"{name} must be on {ref.device} (the device of codes), got {t.device}")


def check_weight(codes: Tensor, codebooks: Tensor, scales: Tensor) -> None:
    _check(
        codes.dtype in (torch.int8, torch.int16),
        lambda: f"codes must be int8 or int16, got {scalar_type_name(codes.dtype)}",
    )
    _check(
        codes.dim() == 3,
        lambda: f"codes must be 3-D [out_groups, in_groups, num_codebooks], got shape {sizes(codes.shape)}",
    )
    _check(
        codebooks.dim() == 4,
        lambda: (
            "codebooks must be 4-D [num_codebooks, 2**nbits, out_group, in_group], got shape " + sizes(codebooks.shape)
        ),
    )
    check_float(codebooks, "codebooks")
    check_float(scales, "scales")
    check_same_device(codes, codebooks, "codebooks")
    check_same_device(codes, scales, "scales")
    out_groups, in_groups, num_codebooks = codes.shape
    _check(
        codebooks.shape[0] == num_codebooks,
        lambda: (
            f"codebooks.shape[0] must equal codes.shape[2] = {num_codebooks} (num_codebooks), got {codebooks.shape[0]}"
        ),
    )
    _check(num_codebooks >= 1, lambda: f"num_codebooks must be at least 1, got {num_codebooks}")
    _check(
        out_groups >= 1 and in_groups >= 1,
        lambda: f"codes must have at least one output and one input group, got shape {sizes(codes.shape)}",
    )
    _check(
        codebooks.shape[2] >= 1 and codebooks.shape[3] >= 1,
        lambda: f"codebooks group sizes must be positive, got shape {sizes(codebooks.shape)}",
    )
    k = codebooks.shape[1]
    if _is_static(k):  # the codebook size is a constant of the model: never symbolic in practice
        _check(
            2 <= k <= 65536 and k & (k - 1) == 0,
            lambda: f"codebooks.shape[1] must be 2**nbits with 1 <= nbits <= 16, got {k}",
        )
        nbits = k.bit_length() - 1
        storage_bits = 8 if codes.dtype == torch.int8 else 16
        _check(
            nbits <= storage_bits,
            lambda: (
                f"codes of dtype {scalar_type_name(codes.dtype)} hold at most {storage_bits} bits, but "
                f"codebooks have 2**{nbits} entries; use int16 codes"
            ),
        )
    _check(
        scales.numel() == out_groups and scales.dim() >= 1 and scales.shape[0] == out_groups,
        lambda: f"scales must have shape [{out_groups}, 1, 1, 1] (one per output group), got {sizes(scales.shape)}",
    )


def out_features(codes: Tensor, codebooks: Tensor):
    return codes.shape[0] * codebooks.shape[2]


def in_features(codes: Tensor, codebooks: Tensor):
    return codes.shape[1] * codebooks.shape[3]


def check_rows(input: Tensor, name: str, features, codes: Tensor):
    """``input [..., features]`` against the weight; returns the number of rows N."""
    check_float(input, name)
    check_same_device(codes, input, name)
    _check(
        input.dim() >= 1 and input.shape[-1] == features,
        lambda: f"{name} must have last dimension {features}, got shape {sizes(input.shape)}",
    )
    return math.prod(input.shape[:-1])


def check_vector(v: Optional[Tensor], name: str, n, codes: Tensor) -> None:
    if v is None:
        return
    check_float(v, name)
    check_same_device(codes, v, name)
    _check(v.dim() == 1 and v.shape[0] == n, lambda: f"{name} must have shape [{n}], got {sizes(v.shape)}")


def check_lora(lora_A: Tensor, lora_B: Tensor, codes: Tensor, codebooks: Tensor):
    """``lora_A [r, in]``, ``lora_B [out, r]``, one dtype; returns r."""
    check_float(lora_A, "lora_A")
    check_float(lora_B, "lora_B")
    check_same_device(codes, lora_A, "lora_A")
    check_same_device(codes, lora_B, "lora_B")
    n_in, n_out = in_features(codes, codebooks), out_features(codes, codebooks)
    _check(
        lora_A.dim() == 2 and lora_A.shape[1] == n_in,
        lambda: f"lora_A must have shape [r, {n_in}], got {sizes(lora_A.shape)}",
    )
    r = lora_A.shape[0]
    _check(
        lora_B.dim() == 2 and lora_B.shape[0] == n_out and lora_B.shape[1] == r,
        lambda: f"lora_B must have shape [{n_out}, {r}] (r from lora_A), got {sizes(lora_B.shape)}",
    )
    _check(
        lora_A.dtype == lora_B.dtype,
        lambda: (
            f"lora_A and lora_B must share a dtype, got {scalar_type_name(lora_A.dtype)} and "
            f"{scalar_type_name(lora_B.dtype)}"
        ),
    )
    return r


def check_dropout(p: float) -> None:
    _check(0.0 <= p < 1.0, lambda: f"dropout_p must be in [0, 1), got {p:g}")


def check_scaling(scaling: float) -> None:
    finite = math.isfinite(scaling) if isinstance(scaling, (int, float)) else True  # symbolic: not checked
    _check(finite, lambda: f"scaling must be finite, got {scaling:g}")


def check_seed(seed: int, offset: int) -> None:
    """Seeds and offsets are int64 in the schema; negative ones are refused (their bits would
    alias large unsigned values, a silent surprise)."""
    _check_int64_nonnegative(seed, "seed")
    _check_int64_nonnegative(offset, "offset")


def _check_int64_nonnegative(value, name: str) -> None:
    is_int = isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)
    if torch.compiler.is_compiling() and isinstance(value, torch.SymInt):
        # A traced seed may be symbolic (draw_seed declares its range). Dynamo traces a message only
        # from a lambda that closes over nothing (torch 2.11 refuses any other), so it cannot name
        # the argument; two checks, as `0 <= v <= max` on a SymInt would force a bool.
        torch._check(value >= 0, lambda: "aqlm_lora: seed and offset must be integers in [0, 2**63 - 1]")
        torch._check(value <= INT64_MAX, lambda: "aqlm_lora: seed and offset must be integers in [0, 2**63 - 1]")
        return
    if not (is_int and 0 <= value <= INT64_MAX):
        # A plain raise, not torch._check: under torch.compile the condition is a constant here and
        # Dynamo (2.11) cannot trace torch._check's message closure; the error is the same type.
        raise RuntimeError(f"aqlm_lora: {name} must be an integer in [0, 2**63 - 1], got {value!r}")


def check_lora_forward(
    input, codes, codebooks, scales, bias, lora_A, lora_B, lora_bias, scaling, dropout_p, seed, offset
):
    """Returns ``(N, r)``."""
    check_weight(codes, codebooks, scales)
    n = check_rows(input, "input", in_features(codes, codebooks), codes)
    check_vector(bias, "bias", out_features(codes, codebooks), codes)
    r = check_lora(lora_A, lora_B, codes, codebooks)
    check_vector(lora_bias, "lora_bias", out_features(codes, codebooks), codes)
    check_dropout(dropout_p)
    check_scaling(scaling)
    check_seed(seed, offset)
    return n, r


def check_lora_backward(grad, input, xa, codes, codebooks, scales, lora_A, lora_B, scaling, dropout_p, seed, offset):
    """Returns ``(N, r)``."""
    check_weight(codes, codebooks, scales)
    n = check_rows(input, "input", in_features(codes, codebooks), codes)
    r = check_lora(lora_A, lora_B, codes, codebooks)
    n_grad = check_rows(grad, "grad", out_features(codes, codebooks), codes)
    _check(n_grad == n, lambda: f"grad must have {n} rows like input, got shape {sizes(grad.shape)}")
    check_float(xa, "xa")
    check_same_device(codes, xa, "xa")
    _check(
        xa.dim() == 2 and xa.shape[0] == n and xa.shape[1] == r,
        lambda: f"xa must have shape [{n}, {r}], got {sizes(xa.shape)}",
    )
    check_dropout(dropout_p)
    check_scaling(scaling)
    check_seed(seed, offset)
    return n, r


def _check_per_adapter(t: Optional[Tensor], name: str, k, n_out, codes: Tensor) -> None:
    if t is None:
        return
    check_float(t, name)
    check_same_device(codes, t, name)
    _check(
        t.dim() == 2 and t.shape[0] == k and t.shape[1] == n_out,
        lambda: f"{name} must have shape [{k}, {n_out}] (num_adapters from lora_A), got {sizes(t.shape)}",
    )


def check_lora_mixed_forward(
    input, codes, codebooks, scales, bias, lora_A, lora_B_t, lora_bias, scalings, row_scale, indices
):
    """csrc/common/multi_lora_checks.h in Python; returns ``(N, K, r)``. The values of ``indices``
    (in [-1, K)) and ``scalings`` (finite) are checked by the CPU kernel only: reading them here
    would need the data (and a device sync on CUDA)."""
    check_weight(codes, codebooks, scales)
    n_in, n_out = in_features(codes, codebooks), out_features(codes, codebooks)
    n = check_rows(input, "input", n_in, codes)
    check_vector(bias, "bias", n_out, codes)
    check_float(lora_A, "lora_A")
    check_float(lora_B_t, "lora_B_t")
    check_same_device(codes, lora_A, "lora_A")
    check_same_device(codes, lora_B_t, "lora_B_t")
    _check(
        lora_A.dim() == 3 and lora_A.shape[2] == n_in,
        lambda: f"lora_A must have shape [num_adapters, r, {n_in}], got {sizes(lora_A.shape)}",
    )
    k, r = lora_A.shape[0], lora_A.shape[1]
    _check(
        lora_B_t.dim() == 3 and lora_B_t.shape[0] == k and lora_B_t.shape[1] == r and lora_B_t.shape[2] == n_out,
        lambda: (
            f"lora_B_t must have shape [{k}, {r}, {n_out}] (lora_B transposed; num_adapters and r from lora_A), "
            f"got {sizes(lora_B_t.shape)}"
        ),
    )
    _check(
        lora_A.dtype == lora_B_t.dtype,
        lambda: (
            f"lora_A and lora_B_t must share a dtype, got {scalar_type_name(lora_A.dtype)} and "
            f"{scalar_type_name(lora_B_t.dtype)}"
        ),
    )
    _check_per_adapter(lora_bias, "lora_bias", k, n_out, codes)
    check_float(scalings, "scalings")
    check_same_device(codes, scalings, "scalings")
    _check(
        scalings.dim() == 1 and scalings.shape[0] == k,
        lambda: f"scalings must have shape [{k}] (one per adapter), got {sizes(scalings.shape)}",
    )
    _check_per_adapter(row_scale, "row_scale", k, n_out, codes)
    _check(indices.dtype == torch.int64, lambda: f"indices must be int64, got {scalar_type_name(indices.dtype)}")
    check_same_device(codes, indices, "indices")
    _check(
        indices.dim() == 1 and indices.shape[0] == n,
        lambda: f"indices must have shape [{n}] (one adapter index per row of input), got {sizes(indices.shape)}",
    )
    return n, k, r
