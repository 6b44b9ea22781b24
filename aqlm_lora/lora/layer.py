"""``AqlmLoraLinear``: PEFT's LoRA layer for ``aqlm.QuantizedLinear``, computed with fused ops.

A drop-in for ``peft.tuners.lora.aqlm.AqlmLoraLinear``: same constructor, same state-dict keys
(``base_layer.*``, ``lora_A.<name>.weight``, ``lora_B.<name>.weight``/``.bias``), same scaling,
``lora_bias``, ``disable_adapters``, ``set_adapter``, ``delete_adapter`` and ``adapter_names``
mixed-batch semantics. This module only decides *what* to compute (which adapters, scaling,
dropout probability, dtypes); the math is :mod:`aqlm_lora.functional` (``aqlm_lora_linear``,
``aqlm_linear``, ``lora_delta``), which reads the base layer's ``codes``, ``codebooks``,
``scales`` and ``bias`` directly. The base layer's ``forward`` is never called and its tensors
are never written.

Behaviour worth knowing:

- Several active adapters: adapters with the same effective dropout probability are fused into one
  call by concatenating their ranks (``A = cat(A_i)``, ``B = cat(s_i * B_i)``, lora bias
  ``sum(s_i * b_i)``, scaling 1). The group of the first active adapter shares the call with the
  base matmul; another group (only when dropout probabilities differ while training) is added as a
  plain-PyTorch LoRA term with its own Philox mask. Adapters in one group share one dropout mask
  per call (each adapter still sees Bernoulli(1 - p) dropout; PEFT draws independent masks).
- Dropout masks come from the op's counter-based generator (seeded from torch's default CPU
  generator), not from ``nn.Dropout``: same statistics, different draws. ``lora_dropout=1.0`` gives
  PEFT's ``x * 0`` LoRA input (the op's dropout needs p < 1: those adapters are added apart).
- dtypes: the fused op reads ``x`` in its own dtype and accumulates in float32 against LoRA
  weights of any float dtype, which is what PEFT's ``_cast_input_dtype`` (cast ``x`` to the
  LoRA dtype for the LoRA branch, cast the LoRA output back) achieves, without the extra copies.
  The output has ``x``'s dtype, as the base AQLM layer's does. Under ``torch.autocast`` for
  ``x``'s device, ``x`` is cast to the autocast dtype first (the output then has that dtype, as
  ``F.linear`` under autocast would give).
- DoRA (``use_dora=True``): PEFT's semantics, the row norms computed from the codes without a
  dense weight (:mod:`aqlm_lora.lora.dora`); DoRA adapters also work in mixed batches
  (``adapter_names=``), which PEFT refuses.
- Mixed batches (``adapter_names=``): one ``lora_mixed_forward`` call per layer, the base matmul
  once for the whole batch and each row's LoRA from stacked adapter weights
  (:mod:`aqlm_lora.lora.adapter_stack`, cached until an adapter changes; :meth:`clear_caches` after
  writes through ``.data``); while training with dropout, one call per adapter on its rows instead.
- ``merge()`` swaps in a dense ``nn.Linear`` base holding the merged weight and keeps the AQLM layer
  to put back on ``unmerge()`` (:mod:`aqlm_lora.lora.merge`).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import aqlm
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from .. import functional
from .adapter_stack import AdapterStack
from .config_checks import check_supported, prepare_config
from .dora import AqlmDoraVariant, DoraNorms, dora_step
from .fused_base import canonical_codes
from .merge import merge_layer, unmerge_layer

__all__ = ["AqlmLoraLinear", "canonical_codes"]

_VARIANT_KWARGS = ("alora_offsets",)


def _lora_delta(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_bias: Optional[Tensor], scaling: float, dropout_p: float
) -> Tensor:
    """``functional.lora_delta``, also for ``dropout_p == 1``, which the op's dropout refuses: PEFT's
    ``nn.Dropout(p=1)`` gives ``x * 0`` (NaN where x is not finite), so the term is ``scaling * lora_bias``."""
    if dropout_p == 1.0:
        x, dropout_p = x * 0, 0.0
    return functional.lora_delta(x, lora_A, lora_B, scaling, dropout_p, lora_bias)


class AqlmLoraLinear(torch.nn.Module, LoraLayer):
    """LoRA on an ``aqlm.QuantizedLinear`` (or a PEFT tuner layer wrapping one), fused kernels.

    Constructor as PEFT's ``AqlmLoraLinear``. With ``config`` (what PEFT >= 0.19 passes) the
    config's dropout, init, rsLoRA, DoRA and lora_bias settings count; ``r`` and ``lora_alpha``
    are the arguments (PEFT resolves ``rank_pattern``/``alpha_pattern`` into them), or the config's
    when ``r`` is not given. Without ``config`` the keyword arguments build one.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 0,
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_bias: bool = False,
        config: Optional[LoraConfig] = None,
        **kwargs: Any,
    ) -> None:
        if config is None:
            config = LoraConfig(
                r=max(int(r), 1),
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                init_lora_weights=init_lora_weights,
                use_rslora=use_rslora,
                use_dora=use_dora,
                lora_bias=lora_bias,
            )
        elif not r:
            r, lora_alpha = config.r, config.lora_alpha
        prepare_config(config, type(self).__name__, kwargs.get("parameter_name"))

        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if not isinstance(self.get_base_layer(), aqlm.QuantizedLinear):
            raise TypeError(
                f"{type(self).__name__} needs an aqlm.QuantizedLinear base layer, got "
                f"{type(self.get_base_layer()).__name__}"
            )
        self._active_adapter = adapter_name
        update_kwargs = {k: kwargs[k] for k in ("target_name", "tied_adapter") if k in kwargs}
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **update_kwargs)

    # -----------------------------------------------------------------------------------------
    # Adapter management (PEFT's LoraLayer does the bookkeeping).

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        # Also reached directly by PEFT when a second adapter is added to an existing layer.
        check_supported(config, type(self).__name__)
        try:
            self.resolve_lora_variant(config=config)
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__} implements DoRA and otherwise plain LoRA only; this LoraConfig asks for "
                f"another LoRA variant (aLoRA, VeLoRA, MiCA, Arrow, BD-LoRA, MonteCLoRA, KaSA...): {err}"
            ) from err
        orthogonal = config.init_lora_weights == "orthogonal"
        if orthogonal:  # PEFT's path probes the dense base weight first; init it ourselves afterwards
            config = copy.copy(config)
            config.init_lora_weights = False
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if orthogonal:
            self.orthogonal_init(adapter_name)
            if adapter_name in self.lora_variant:  # DoRA's magnitude starts from the final A and B
                self.lora_variant[adapter_name].init(self, adapter_name=adapter_name)
            # The new parameters require grad; PEFT's update_layer ends with this call, which freezes
            # the inactive adapters (and, with inference_mode, the active ones).
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @property
    def lora_variants(self) -> dict:
        return {(): None, ("use_dora",): AqlmDoraVariant}

    def _cache(self, key: str, make: Any) -> Any:
        """The per-layer cache object ``key``, made by ``make()`` on first use. Kept in ``__dict__``,
        outside ``nn.Module``'s attribute handling: never part of the state dict."""
        cache = self.__dict__.get(key)
        if cache is None:
            cache = self.__dict__[key] = make()
        return cache

    @property
    def dora_norms(self) -> DoraNorms:
        """The cached DoRA norms of this layer (see :class:`~aqlm_lora.lora.dora.DoraNorms`)."""
        return self._cache("_dora_norms", DoraNorms)

    def quantized_base(self) -> nn.Module:
        """The ``aqlm.QuantizedLinear`` under this layer, also while merged (a dense copy then is the base layer)."""
        quantized = self.__dict__.get("_quantized_base")
        return quantized if quantized is not None else self.get_base_layer()

    def quantized_weight(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes, codebooks, scales)`` of :meth:`quantized_base`, the codes in canonical layout."""
        base = self.quantized_base()
        return canonical_codes(base), base.codebooks, base.scales

    def dora_scale(self, name: str, weight: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
        """DoRA's ``m / ||W + s*B@A||`` per output row for adapter ``name`` (the norm detached, cached
        outside training); ``weight``: :meth:`quantized_weight`, when the caller has it already."""
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        weight = self.quantized_weight() if weight is None else weight
        norms = self.dora_norms.row_norms(name, weight, lora_A, lora_B, self.scaling[name], cache=not self.training)
        return self.lora_magnitude_vector[name].weight.to(norms.dtype) / norms

    def clear_caches(self) -> None:
        """Drop the cached DoRA norms and mixed-batch adapter stacks. Their keys see new tensors and
        in-place ops but not writes through ``.data`` (no version bump): call this after such writes.
        PEFT's ``hotswap_adapter``/``hotswap_adapter_from_state_dict`` call it (see :mod:`.dispatch`)."""
        for key in ("_dora_norms", "_adapter_stack"):
            cache = self.__dict__.get(key)
            if cache is not None:
                cache.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        # The caches are keyed by name: a deleted adapter's norms (and a stack holding its weights)
        # would stay until the next train(), one set per adapter ever deleted.
        super().delete_adapter(adapter_name)
        self.dora_norms.forget(adapter_name)
        stack = self.__dict__.get("_adapter_stack")
        if stack is not None:
            stack.clear()

    def train(self, mode: bool = True):
        if mode:  # cached adapter norms (used outside training only) live for one eval() stretch at most
            self.dora_norms.clear_adapters()
        return super().train(mode)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # New adapters go to the codebooks' device; their dtype stays as created (float32), as with
        # PEFT's own AQLM layer (whose probe only finds the int `qweight`).
        if isinstance(base_layer, aqlm.QuantizedLinear):
            return base_layer.codebooks.device, None
        return super()._get_base_layer_device_and_dtype(base_layer)

    @torch.no_grad()
    def orthogonal_init(self, adapter_name: str) -> None:
        # PEFT's version reads the dense weight only for its dtype; use the adapter's own dtype.
        rank = self.r[adapter_name]
        if rank % 2 != 0:
            raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {rank} instead.")
        q, _ = torch.linalg.qr(torch.randn(rank, rank))
        lora_A = torch.randn(self.in_features, rank // 2).mm(q[0::2, :]).T / 10.0
        lora_B = torch.randn(rank // 2, self.out_features).T.mm(q[1::2, :]) / 10.0
        weight_A, weight_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        self.lora_A[adapter_name].weight = nn.Parameter(lora_A.contiguous().to(weight_A))
        self.lora_B[adapter_name].weight = nn.Parameter(lora_B.contiguous().to(weight_B))

    def get_delta_weight(self, adapter: str) -> Tensor:
        """PEFT's ``lora.Linear.get_delta_weight``: ``B @ A * scaling`` in B's dtype, fp16/bf16 on the CPU
        computed in float32 and cast back (read by ``add_weighted_adapter``'s SVD combinations)."""
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = weight_B.dtype
        upcast = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = (weight_B @ weight_A) * self.scaling[adapter]
        return delta.to(dtype) if upcast else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active adapters (or ``adapter_names``): the base layer becomes a dense ``nn.Linear``
        holding ``W + s*B@A`` (DoRA: rescaled rows), in the codebooks' dtype; the AQLM layer is kept
        aside for :meth:`unmerge`. Warns with the size it adds (see :mod:`aqlm_lora.lora.merge`)."""
        merge_layer(self, check_adapters_to_merge(self, adapter_names), safe_merge)

    def unmerge(self) -> None:
        """Put the original ``aqlm.QuantizedLinear`` (the same object, untouched) back as the base layer."""
        unmerge_layer(self)

    # -----------------------------------------------------------------------------------------
    # Forward.

    def _adapter_terms(self, names: list[str], training: bool):
        """(A, B, lora_bias, scaling, dropout_p) for the adapters in ``names``; ranks concatenated."""
        mods = [(self.lora_A[n], self.lora_B[n], self.scaling[n]) for n in names]
        if len(mods) == 1:
            lora_A, lora_B, scaling = mods[0]
            return lora_A.weight, lora_B.weight, lora_B.bias, float(scaling), self._dropout_p(names[0], training)
        dtype = mods[0][0].weight.dtype
        for lora_A, lora_B, _ in mods[1:]:
            dtype = torch.promote_types(dtype, torch.promote_types(lora_A.weight.dtype, lora_B.weight.dtype))
        weight_A = torch.cat([a.weight.to(dtype) for a, _, _ in mods], dim=0)
        weight_B = torch.cat([b.weight.to(dtype) * s for _, b, s in mods], dim=1)
        biases = [b.bias.to(dtype) * s for _, b, s in mods if b.bias is not None]
        lora_bias = torch.stack(biases).sum(0) if biases else None
        return weight_A, weight_B, lora_bias, 1.0, self._dropout_p(names[0], training)

    def _dropout_p(self, adapter_name: str, training: bool) -> float:
        if not training:
            return 0.0
        dropout = self.lora_dropout[adapter_name]
        return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0

    def _lora_forward(self, x: Tensor, names: list[str]) -> Tensor:
        """Base output plus the LoRA terms of ``names`` (all present in this layer) for input ``x``.

        Adapters apply in order, as in PEFT: a DoRA adapter rescales the output so far. The plain
        adapters before the first DoRA one share the fused call; the rest follow one by one.
        """
        weight, bias = self.quantized_weight(), self.get_base_layer().bias
        if not names:
            return functional.aqlm_linear(x, *weight, bias)
        is_dora = [name in self.lora_magnitude_vector for name in names]
        first_dora = is_dora.index(True) if any(is_dora) else len(names)
        out = self._plain_forward(x, weight, bias, names[:first_dora]) if first_dora else None
        for name in names[first_dora:]:
            out = self._adapter_step(x, out, name, weight, bias)
        return out.to(x.dtype)

    def _adapter_step(
        self, x: Tensor, out: Optional[Tensor], name: str, weight: tuple[Tensor, Tensor, Tensor], bias: Optional[Tensor]
    ) -> Tensor:
        """The output after adapter ``name`` given the output ``out`` before it (None: nothing yet, DoRA only)."""
        lora_A, lora_B, scaling = self.lora_A[name].weight, self.lora_B[name], self.scaling[name]
        dropout_p = self._dropout_p(name, self.training)
        if name not in self.lora_magnitude_vector:
            return out + _lora_delta(x, lora_A, lora_B.weight, lora_B.bias, scaling, dropout_p)
        magnitude = self.lora_magnitude_vector[name].weight
        scale = self.dora_scale(name, weight)
        # Without a gradient for m, one scale per output row lets the rescaling ride in the fused call.
        fold = weight[1].shape[2] == 1 and not (torch.is_grad_enabled() and magnitude.requires_grad)
        return dora_step(out, x, weight, bias, lora_A, lora_B.weight, scaling, scale, dropout_p, fold)

    def _plain_forward(
        self, x: Tensor, weight: tuple[Tensor, Tensor, Tensor], bias: Optional[Tensor], names: list[str]
    ) -> Tensor:
        """Base output plus the plain LoRA adapters ``names``, grouped by dropout probability."""
        codes, codebooks, scales = weight
        training = self.training
        groups: dict[float, list[str]] = {}
        for name in names:
            groups.setdefault(self._dropout_p(name, training), []).append(name)
        dropped = groups.pop(1.0, None)  # the op's dropout needs p < 1: these are added apart
        rest = list(groups.values())
        if rest:
            weight_A, weight_B, lora_bias, scaling, dropout_p = self._adapter_terms(rest.pop(0), training)
            out = functional.aqlm_lora_linear(
                x, codes, codebooks, scales, bias, weight_A, weight_B, scaling, dropout_p, lora_bias, training=training
            )
        else:
            out = functional.aqlm_linear(x, codes, codebooks, scales, bias)
        for group in rest + ([dropped] if dropped else []):  # only while training: other dropout probabilities
            delta = _lora_delta(x, *self._adapter_terms(group, training))
            out = out + delta.to(out.dtype)
        return out

    @staticmethod
    def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and x.is_floating_point():
            return torch.get_autocast_dtype(device_type)
        return None

    def _check_forward_args(self, x: Tensor, *args: Any, **kwargs: Any) -> None:
        names = kwargs.get("adapter_names")
        if names is not None:  # PEFT refuses DoRA in mixed batches; ours supports them
            kwargs = {**kwargs, "adapter_names": ["__base__" if n in self.lora_magnitude_vector else n for n in names]}
        super()._check_forward_args(x, *args, **kwargs)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in _VARIANT_KWARGS:
            if kwargs.pop(key, None) is not None:
                raise ValueError(f"{type(self).__name__} does not support `{key}` (LoRA variants are not supported)")
        if args or kwargs:
            raise TypeError(
                f"{type(self).__name__}.forward takes the input and `adapter_names` only (as "
                f"aqlm.QuantizedLinear.forward), got extra {len(args)} positional and {sorted(kwargs)} keyword"
            )
        autocast_dtype = self._autocast_dtype(x)
        if autocast_dtype is None:
            return self._dispatch(x, adapter_names)
        # The layer applies autocast's policy itself (x in the autocast dtype, fp32 accumulation
        # inside the op) and runs the op with autocast off: the ops take explicit dtypes, and the
        # CPU lora_forward kernel's internal at::mm is otherwise re-cast by autocast and fails.
        with torch.autocast(x.device.type, enabled=False):
            return self._dispatch(x.to(autocast_dtype), adapter_names)

    def _dispatch(self, x: Tensor, adapter_names: Optional[list[str]]) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._lora_forward(x, [])
        if self.merged:  # the dense base holds the merged adapters (mixed batches were refused above)
            dense = self.get_base_layer()
            return dense(x.to(dense.weight.dtype)).to(x.dtype)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names=adapter_names)
        present = [name for name in self.active_adapters if name in self.lora_A]
        return self._lora_forward(x, present)

    @property
    def adapter_stack(self) -> AdapterStack:
        """The cached stacked adapter weights for mixed batches (see :mod:`aqlm_lora.lora.adapter_stack`)."""
        return self._cache("_adapter_stack", AdapterStack)

    def _mixed_batch_forward(self, x: Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> Tensor:
        """Row ``i`` of the batch uses adapter ``adapter_names[i]`` (``"__base__"``, or a name this
        layer lacks: none). One fused op call for the whole batch: the base matmul once, then each
        row's own LoRA (plain and DoRA adapters, any ranks, scalings and ``lora_bias``). While
        training with dropout, each adapter's rows run on their own instead (composed, with gradients)."""
        keys = [name if name in self.lora_A else "__base__" for name in adapter_names]
        distinct = set(keys)
        if len(distinct) <= 1:  # one adapter (or none) for every row: the plain fused call
            name = distinct.pop() if distinct else "__base__"
            return self._lora_forward(x, [] if name == "__base__" else [name])
        used = distinct - {"__base__"}
        if self.training and any(self._dropout_p(name, True) != 0.0 for name in used):
            return self._grouped_forward(x, keys)
        stacked = self.adapter_stack.stacked(self, used)
        rows_per_item = x[0].numel() // x.shape[-1] if x.dim() > 1 and x.shape[-1] else 1
        indices = self.adapter_stack.indices(keys, stacked.index, rows_per_item, x.device)
        return functional.aqlm_lora_mixed_linear(
            x,
            *self.quantized_weight(),
            self.get_base_layer().bias,
            stacked.lora_A,
            stacked.lora_B_t,
            stacked.scalings,
            indices,
            stacked.lora_bias,
            stacked.row_scale,
        )

    def _grouped_forward(self, x: Tensor, keys: list[str]) -> Tensor:
        """The mixed batch as one call per adapter on its rows (each with its own base matmul)."""
        rows: dict[str, list[int]] = {}
        for index, name in enumerate(keys):
            rows.setdefault(name, []).append(index)
        parts, order = [], []
        for name, index in rows.items():
            idx = torch.tensor(index, device=x.device)
            parts.append(self._lora_forward(x.index_select(0, idx), [] if name == "__base__" else [name]))
            order.append(idx)
        inverse = torch.empty(len(keys), dtype=torch.long, device=x.device)
        order_cat = torch.cat(order)
        inverse[order_cat] = torch.arange(len(keys), device=x.device)
        return torch.cat(parts, dim=0).index_select(0, inverse)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
