"""llama.cpp's CPU matmul, ``ggml_mul_mat``, through ggml-python's low-level ctypes API.

One ``GgmlWeight`` holds an ``out x in`` weight of a ggml type in its own ggml context;
``GgmlGraph([(W, x), ...])`` builds, for fixed f32 activations x [N, in], a graph of
``y = mul_mat(W, x)`` nodes ([N, out], like ``F.linear``) in a second context, planned once for
``threads`` threads; calling it runs ``ggml_graph_compute`` (the CPU kernels llama.cpp runs:
activations quantized to the weight type's dot type, q8_0 / q8_K, then the type's vec_dot or
llamafile's sgemm).

The weight's bytes are valid blocks of the type: ``TEMPLATE_ROWS`` rows of Gaussian floats
quantized with ``ggml_quantize_chunk`` (an all-ones importance matrix where the type needs one),
then tiled over all ``out`` rows, so every block decodes to finite numbers like a real model's and
the weight still fills its whole size in memory. ``GgmlWeight.reference`` is the fp32 product
with the unquantized template rows, for a sanity check of the orientation and the quantization error.
"""

from __future__ import annotations

import ctypes
import math
from types import ModuleType
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The llama.cpp types the benchmark asks for, in ggml's spelling (GGML_TYPE_<upper>).
GGML_TYPES = ("f16", "q4_0", "q2_K", "iq2_xxs", "iq2_xs")
TEMPLATE_ROWS = 32
INSTALL_HINT = (
    "install it with `.venv/bin/pip install ggml-python` (the project's `ggml` extra; an sdist: pip builds its"
    " vendored ggml with cmake, a few minutes)"
)


def load_ggml() -> tuple[Optional[ModuleType], str]:
    """(the ``ggml`` module, "") or (None, why not) when ggml-python is missing or its library does not load."""
    try:
        import ggml
    except ImportError as err:
        return None, f"ggml-python is not importable ({type(err).__name__}: {err}); {INSTALL_HINT}"
    except OSError as err:  # the package is there but libggml*.so does not load
        return None, f"ggml-python's library does not load ({err}); {INSTALL_HINT}"
    ggml.ggml_cpu_init()  # fp16 tables; idempotent (ggml_graph_compute calls it too)
    return ggml, ""


def type_ids(ggml: ModuleType, names: tuple[str, ...] = GGML_TYPES) -> tuple[dict[str, int], list[str]]:
    """({name: GGML_TYPE_* id} of the types this ggml knows, [the names it does not])."""
    found = {n: getattr(ggml, f"GGML_TYPE_{n.upper()}") for n in names if hasattr(ggml, f"GGML_TYPE_{n.upper()}")}
    return found, [n for n in names if n not in found]


def bits_per_weight(ggml: ModuleType, type_id: int) -> float:
    return 8 * ggml.ggml_type_size(type_id) / ggml.ggml_blck_size(type_id)


def ggml_info(ggml: ModuleType) -> dict[str, str]:
    """ggml-python's version and the CPU features its ggml was built for (``-march=native`` by default)."""
    features = ["avx", "avx2", "f16c", "fma", "avx512", "avx512_bf16", "avx_vnni", "amx_int8"]
    have = [f for f in features if getattr(ggml, f"ggml_cpu_has_{f}", lambda: 0)()]
    return {"ggml-python": getattr(ggml, "__version__", "?"), "ggml CPU features": " ".join(have) or "none"}


def _view(address: int, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """A numpy view of ``nbytes`` of ggml-owned memory (no copy)."""
    return np.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=dtype)


def _floats(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class GgmlWeight:
    """An ``out x in`` weight of ggml type ``name`` in its own ggml context (free it with ``close``)."""

    def __init__(self, ggml: ModuleType, name: str, out_features: int, in_features: int, seed: int = 0):
        self.ggml, self.name = ggml, name
        self.type_id = type_ids(ggml, (name,))[0][name]
        block = ggml.ggml_blck_size(self.type_id)
        if in_features % block:
            raise ValueError(f"{name} packs rows in blocks of {block}; in_features {in_features} is not a multiple")
        self.out_features, self.in_features = out_features, in_features
        rows = math.gcd(out_features, TEMPLATE_ROWS)
        g = torch.Generator().manual_seed(seed)
        self.template = torch.randn(rows, in_features, generator=g)
        row_bytes = ggml.ggml_row_size(self.type_id, in_features)
        packed = np.empty(rows * row_bytes, dtype=np.uint8)
        src = np.ascontiguousarray(self.template.numpy())
        ones = np.ones(in_features, dtype=np.float32)  # iq2_*: ggml refuses to quantize without an imatrix
        imatrix = _floats(ones) if ggml.ggml_quantize_requires_imatrix(self.type_id) else None
        written = ggml.ggml_quantize_chunk(
            self.type_id, _floats(src), packed.ctypes.data, 0, rows, in_features, imatrix
        )
        if written != packed.nbytes:
            raise RuntimeError(f"ggml_quantize_chunk({name}) wrote {written} bytes, expected {packed.nbytes}")
        nbytes = row_bytes * out_features
        params = ggml.ggml_init_params(mem_size=nbytes + ggml.ggml_tensor_overhead() + 4096, mem_buffer=None)
        self.ctx = ggml.ggml_init(params)
        if not self.ctx:
            raise MemoryError(f"ggml_init could not allocate {nbytes} bytes for a {name} weight")
        self.tensor = ggml.ggml_new_tensor_2d(self.ctx, self.type_id, in_features, out_features)
        _view(ggml.ggml_get_data(self.tensor), nbytes, np.uint8).reshape(-1, packed.size)[:] = packed

    def reference(self, x: Tensor) -> Tensor:
        """fp32 ``x @ W^T`` with the unquantized template rows (tiled like the weight)."""
        return F.linear(x.float(), self.template).repeat(1, self.out_features // self.template.shape[0])

    def close(self) -> None:
        if self.ctx:
            self.ggml.ggml_free(self.ctx)
            self.ctx = None


class GgmlGraph:
    """``mul_mat(W_i, x_i)`` for fixed f32 inputs ``x_i`` [N, in], all nodes of one graph (one
    ``ggml_graph_compute`` per call, as llama.cpp runs a model's layers); a call recomputes
    ``outputs`` ([N, out] each) and returns them."""

    def __init__(self, pairs: list[tuple[GgmlWeight, Tensor]], threads: int):
        ggml = self.ggml = pairs[0][0].ggml
        floats = sum(x.shape[0] * (x.shape[1] + w.out_features) for w, x in pairs)
        mem = 4 * floats + 2 * len(pairs) * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead() + 65536
        self.ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=mem, mem_buffer=None))
        self.graph = ggml.ggml_new_graph(self.ctx)
        self.outputs: list[Tensor] = []
        for w, x in pairs:
            (n, k), m = x.shape, w.out_features
            if k != w.in_features:
                raise ValueError(f"x has {k} features, the weight takes {w.in_features}")
            x_t = ggml.ggml_new_tensor_2d(self.ctx, ggml.GGML_TYPE_F32, k, n)
            y_t = ggml.ggml_mul_mat(self.ctx, w.tensor, x_t)
            ggml.ggml_build_forward_expand(self.graph, y_t)
            torch.from_numpy(_view(ggml.ggml_get_data(x_t), 4 * n * k, np.float32)).view(n, k).copy_(x)
            self.outputs.append(torch.from_numpy(_view(ggml.ggml_get_data(y_t), 4 * n * m, np.float32)).view(n, m))
        # Plan once with our own work buffer: ggml_graph_compute_with_ctx would take a new work
        # buffer out of the context on every call and run out of it in a timing loop.
        self.plan = ggml.ggml_graph_plan(self.graph, threads, None)
        self.work = np.empty(max(1, self.plan.work_size), dtype=np.uint8)
        self.plan.work_data = ctypes.cast(self.work.ctypes.data, ctypes.POINTER(ctypes.c_uint8))
        self.keep = [w for w, _ in pairs]  # the graph points into the weights' contexts

    def __call__(self) -> list[Tensor]:
        status = self.ggml.ggml_graph_compute(self.graph, ctypes.byref(self.plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute returned status {status}")
        return self.outputs

    def close(self) -> None:
        if self.ctx:
            self.ggml.ggml_free(self.ctx)
            self.ctx = None
