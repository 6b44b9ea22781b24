"""Whole models: every ``nn.Linear`` a transformers AQLM config quantizes, replaced in place."""

from __future__ import annotations

from typing import Iterable, Union

from torch import nn

from ..scheme import Scheme, parse_scheme
from .weight import check_weight, quantize_linear


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def _not_to_quantize(model: nn.Module, skipped_linears: list[str]) -> list[str]:
    """``linear_weights_not_to_quantize`` for transformers' AQLM loader.

    transformers < 5 compares ``<module>.weight`` names, transformers 5 matches module-name patterns
    (``should_convert_module``), so every skipped linear is listed both ways; the input and output
    embeddings' weights are listed too, as AQLM checkpoints on the Hub do.
    """
    names: list[str] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is None:
            continue
        for name, candidate in model.named_modules():
            if candidate is module and isinstance(candidate, (nn.Embedding, nn.Linear)):
                names.append(f"{name}.weight")
    for name in skipped_linears:
        names += [f"{name}.weight", name]
    return list(dict.fromkeys(names))


def quantize_model(
    model: nn.Module,
    scheme: Union[str, Scheme],
    skip: Iterable[str] = ("lm_head",),
    *,
    progress: bool = True,
    **kwargs,
) -> dict[str, list[float]]:
    """Replace every ``nn.Linear`` of ``model`` (except those matching ``skip``) by an AQLM layer.

    A name in ``skip`` matches a module of that full name, its children, or any module whose name
    ends with ``.<name>``. Sets ``model.config.quantization_config`` (a ``transformers.AqlmConfig``)
    when the model has a config, so ``save_pretrained`` writes a checkpoint that transformers'
    AQLM integration loads. Returns ``{module name: relative error per round}``; keyword
    arguments go to :func:`quantize_weight`. Raises ``ValueError`` naming the layer when there is
    nothing to quantize or a layer cannot be quantized (see :func:`quantize_weight`); the model is
    only changed once every layer is quantized.
    """
    from tqdm.auto import tqdm

    scheme = parse_scheme(scheme)
    skip = tuple(skip)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    todo = [(name, m) for name, m in linears if not _skipped(name, skip)]
    skipped = [name for name, _ in linears if _skipped(name, skip)]
    if not todo:
        what = "no nn.Linear layers" if not linears else f"no nn.Linear layers outside skip={list(skip)}"
        raise ValueError(f"{type(model).__name__} has {what} to quantize")
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for name, m in todo:
        shared = [n for n in owners.get(id(m.weight), []) if n != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"layer {name} shares its weight with {shared[0]} (tied embeddings?); keep it dense with skip"
            )
        check_weight(m.weight, f"layer {name}")
        if m.in_features % scheme.in_group_size or m.out_features % scheme.out_group_size:
            raise ValueError(
                f"layer {name} [{m.out_features}, {m.in_features}] does not split into groups of "
                f"{scheme.out_group_size} x {scheme.in_group_size} (scheme {scheme})"
            )
    errors: dict[str, list[float]] = {}
    layers: dict[str, nn.Module] = {}
    bar = tqdm(
        todo, desc=f"quantize {scheme}", unit="layer", disable=None if progress else True, leave=False
    )  # None: only on a terminal
    for name, linear in bar:
        layers[name], errors[name] = quantize_linear(linear, scheme, name=f"layer {name}", **kwargs)
        bar.set_postfix(err=f"{errors[name][-1]:.4f}")
    bar.close()
    for name, layer in layers.items():  # only now: a layer that fails leaves the model as it was
        _set_submodule(model, name, layer)

    config = getattr(model, "config", None)
    if config is not None:
        qconfig = scheme.aqlm_config(_not_to_quantize(model, skipped))
        _check_loader_agrees(qconfig.linear_weights_not_to_quantize, list(errors), skipped)
        config.quantization_config = qconfig
    return errors


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_loader_agrees(patterns: list[str], quantized: list[str], skipped: list[str]) -> None:
    """transformers must re-create exactly our AQLM layers from ``patterns`` when it loads the model."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # older transformers compare full weight names, which we list
        return
    wrong = [n for n in quantized if not should_convert_module(n, patterns)]
    wrong += [n for n in skipped if should_convert_module(n, patterns)]
    if wrong:
        raise RuntimeError(f"transformers would load these layers with the wrong type: {wrong}")


def layer_scheme(layer: nn.Module) -> Scheme:
    """The scheme of an ``aqlm.QuantizedLinear``."""
    return Scheme(layer.num_codebooks, layer.nbits_per_codebook, layer.in_group_size, layer.out_group_size)


def mean_errors(errors: dict[str, list[float]]) -> list[float]:
    """Mean relative error over layers, per round."""
    rows = list(errors.values())
    if not rows:
        return []
    return [sum(r[i] for r in rows) / len(rows) for i in range(min(len(r) for r in rows))]


