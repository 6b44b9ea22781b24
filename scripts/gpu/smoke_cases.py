"""What the GPU smoke test compares with what: its tolerances, the decode schemes that reach every
GEMV kernel of csrc/cuda/decode.cu, and a mirror of that file's choice of kernel (tests hold the
mirror to the source)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from aqlm_lora.scheme import Scheme

# Largest error allowed, relative to the largest |reference| value, per output dtype. The kernels
# and the reference both accumulate in float32 (float64); what differs is rounding and summation
# order, which stays within a few units in the last place of the output dtype. The one table of
# the GPU check; the test suite's own bounds are in tests/support/tolerances.py.
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}
DECODE_MAX_ROWS = 2  # csrc/cuda/kernels.cuh kDecodeMaxRows: the decode kernels run for 1 <= N <= this
DEFAULT_SMEM = 48 * 1024  # bytes of dynamic shared memory a kernel gets without opting in
BOOK_ROW_BYTES_8BIT = 256 * 8 * 4  # one 8-bit codebook of in_group 8, staged as float32
# Off CUDA (the dry run, the tests) the H100/H200 value stands in for the device's.
H200_SMEM_OPTIN = 227 * 1024


class DecodeCase(NamedTuple):
    scheme: Scheme
    code_dtype: Optional[torch.dtype]  # None: the scheme's own (int8 up to 8 bits, else int16)
    note: str


def scheme_tag(scheme: Scheme) -> str:
    """``CxB og<og> ig<ig>``: the name of a scheme in check names."""
    return f"{scheme.num_codebooks}x{scheme.nbits} og{scheme.out_group_size} ig{scheme.in_group_size}"


def staged_codebook_bytes(scheme: Scheme) -> int:
    """Shared memory decode.cu's in_group-8 kernel needs: every codebook staged as float32."""
    return scheme.num_codebooks * scheme.codebook_size * scheme.out_group_size * 8 * 4


def shared_memory_optin(dev: torch.device) -> int:
    """The device's opt-in shared memory per block (bytes)."""
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        value = getattr(props, "shared_memory_per_block_optin", None)
        if value:
            return int(value)
    return H200_SMEM_OPTIN


def expected_gemv_kernel(scheme: Scheme, optin: int) -> str:
    """The GEMV kernel decode.cu's decode_gemv picks for ``scheme`` on a device with ``optin`` bytes."""
    if scheme.in_group_size != 8:
        return "gemv_generic_kernel"
    if scheme.nbits <= 8 and staged_codebook_bytes(scheme) <= optin:
        return "gemv_ig8_smem_kernel"
    return "gemv_ig8_global_kernel"


def decode_schemes(optin: int) -> list[DecodeCase]:
    """Every decode kernel variant, including the shared-memory thresholds of decode.cu's 8-bit
    path: above 48 KiB the kernel opts in, above the device's opt-in limit (``optin`` bytes) it must
    fall back to the global-memory kernel."""
    fit = optin // BOOK_ROW_BYTES_8BIT  # largest C * og whose 8-bit codebooks fit
    int16 = torch.int16
    return [
        DecodeCase(Scheme(1, 16), None, "ig8 global (L2) kernel, one codebook"),
        DecodeCase(Scheme(2, 8), None, "ig8 shared-memory kernel, 16 KiB"),
        DecodeCase(Scheme(1, 8, out_group_size=2), None, "shared memory, out_group 2"),
        DecodeCase(Scheme(4, 8), None, "shared memory, 32 KiB"),
        DecodeCase(Scheme(2, 7), None, "shared memory, 7-bit codes"),
        DecodeCase(Scheme(2, 16), None, "ig8 global kernel, several codebooks"),
        DecodeCase(Scheme(2, 8), int16, "8-bit codes stored as int16"),
        DecodeCase(Scheme(1, 16, in_group_size=16), None, "generic kernel"),
        DecodeCase(Scheme(3, 5, in_group_size=4, out_group_size=2), None, "generic, odd sizes"),
        DecodeCase(Scheme(1, 1, in_group_size=1), int16, "generic, 1-bit, in_group 1"),
        DecodeCase(Scheme(8, 8), None, "shared memory 64 KiB > 48 KiB default: opt-in attribute"),
        DecodeCase(Scheme(4, 8, out_group_size=2), None, "shared memory 64 KiB with out_group 2: opt-in attribute"),
        DecodeCase(
            Scheme(4, 8, out_group_size=fit // 4),
            None,
            f"largest 8-bit codebooks that fit the opt-in limit ({optin} B)",
        ),
        DecodeCase(
            Scheme(2, 8, out_group_size=16), None, "2x8 out_group 16: 256 KiB > opt-in limit, global-memory fallback"
        ),
        DecodeCase(
            Scheme(1, 8, out_group_size=fit + 1), None, "one 8-bit codebook just over the opt-in limit: global fallback"
        ),
    ]


# (shape, seed, offset, p) of the small dropout masks compared bit for bit.
SMALL_MASKS = [((7, 129), 0, 0, 0.5), ((3, 5, 11), 2**40 + 17, 3, 0.1), ((1000,), 2**62 - 1, 2**33 + 5, 0.9)]
# (scheme, tokens) run on a non-default CUDA stream: decode and tiled paths, the generic kernel.
STREAM_CASES = [
    (Scheme(2, 8), 2),
    (Scheme(1, 16), 1),
    (Scheme(3, 5, in_group_size=4, out_group_size=2), 2),
    (Scheme(1, 16), 5),
    (Scheme(2, 8), 40),
]
