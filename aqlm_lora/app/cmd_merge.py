"""``aqlm-lora merge MODEL_DIR --adapter DIR --out OUT_DIR [--dense | --requantize]``: one deployable model.

``--dense`` (the default): every layer becomes a dense ``nn.Linear`` (the adapted ones hold
``W + s*B@A``, DoRA's rows rescaled), a plain checkpoint that loads without aqlm; exact, but several
times bigger. ``--requantize``: the adapted layers are quantized again in the checkpoint's own
scheme, warm-started from their codes (:func:`aqlm_lora.lora.requantize.merge_and_quantize`); an
AQLM checkpoint of the same size, approximate.

Refused before anything is written (:class:`~aqlm_lora.app.errors.UserError`): a missing model or
adapter, a model without AQLM layers, an adapter whose shapes do not fit the model, an adapter with
a LoRA bias on layers that have no bias (the checkpoint's architecture cannot hold it), OUT_DIR
equal to an input or existing and not empty without ``--overwrite``. The output is written to a
temporary sibling and renamed into place.
"""

from __future__ import annotations

import argparse
import time
import warnings

from .cli import _float_in, _int_in

MODES = ("dense", "requantize")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``merge`` command to the CLI's subparsers; returns its parser."""
    from .models import DTYPE_CHOICES

    p = subparsers.add_parser(
        "merge",
        help="merge a LoRA/DoRA adapter into an AQLM model: a dense checkpoint, or a re-quantized AQLM one",
        description="Merge a PEFT adapter into the AQLM model it was trained on. --dense (default): every layer "
        "dense, exact, loads without aqlm. --requantize: the adapted layers re-quantized in the model's scheme, "
        "warm-started from their codes; same size as the AQLM model, approximate.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local AQLM checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory (LoRA or DoRA)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="where to write the merged checkpoint")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dense", dest="mode", action="store_const", const="dense", help="write a dense checkpoint (default)"
    )
    mode.add_argument(
        "--requantize", dest="mode", action="store_const", const="requantize", help="write an AQLM checkpoint"
    )
    p.set_defaults(mode="dense")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="--dense: dtype of the dense weights (default: the checkpoint's codebooks' dtype)",
    )
    p.add_argument(
        "--rounds",
        type=_int_in(0, 1000),
        default=2,
        help="--requantize: refinement rounds after the warm start (default 2)",
    )
    p.add_argument(
        "--beam", type=_int_in(1, 1000), default=1, help="--requantize: beam width of the code search (default 1)"
    )
    p.add_argument(
        "--calibration",
        metavar="FILE",
        default=None,
        help="--requantize: text or JSONL (as finetune's --data) on which the new codebooks and scales are tuned to "
        "the adapted model's outputs, codes fixed; keeps much more of the adapter's gain (see README)",
    )
    p.add_argument("--data-format", choices=("auto", "text", "jsonl"), default="auto", help="format of --calibration")
    p.add_argument("--seq", type=_int_in(2), default=None, help="--calibration: window length (default 128)")
    p.add_argument(
        "--windows", type=_int_in(1, 1 << 20), default=64, help="--calibration: windows drawn from FILE (default 64)"
    )
    p.add_argument("--tune-steps", type=_int_in(1, 100000), default=100, help="--calibration: Adam steps (default 100)")
    p.add_argument(
        "--tune-lr", type=_float_in(0.0, 1.0, low_open=True), default=1e-4, help="--calibration: learning rate"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return p


def run(args) -> int:
    import torch

    from ..lora.fused_base import use_fused_kernels
    from ..lora.layer import AqlmLoraLinear
    from ..lora.merge import dequantize_model, merge_and_unload, tensor_bytes
    from ..lora.requantize import merge_and_quantize
    from .adapters import load_adapter
    from .errors import UserError
    from .files import check_input_dir, check_output_apart, check_output_dir, staged_dir
    from .models import DTYPES, aqlm_layer_names, config_dtype, load_causal_lm, load_model_config
    from .tokenizer_files import copy_tokenizer_files

    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    adapter_dir = check_input_dir(args.adapter, "adapter directory", must_contain="adapter_config.json")
    out_dir = check_output_dir(args.out, args.overwrite)
    check_output_apart(out_dir, "--out", {"MODEL_DIR": model_dir, "the adapter directory": adapter_dir})
    if args.calibration is not None and args.mode != "requantize":
        raise UserError("--calibration tunes a re-quantized model: it needs --requantize")
    calibration = _calibration_windows(args, model_dir) if args.calibration is not None else None
    start = time.perf_counter()
    # Load in the checkpoint's own dtype: the codebooks (and a re-quantized model) keep it.
    model = load_causal_lm(model_dir, config_dtype(load_model_config(model_dir)) or torch.float32)
    if not aqlm_layer_names(model):
        raise UserError(f"{model_dir} has no AQLM layers; merge adapters of dense models with PEFT's merge_and_unload")
    size_before = tensor_bytes(model)
    use_fused_kernels(model)
    with warnings.catch_warnings():
        # PEFT's two-line warning about a LoRA bias on a bias-less layer: _refuse_unholdable_bias says it in one.
        warnings.filterwarnings("ignore", message=".*lora_bias=True.* has no bias")
        peft_model = load_adapter(model, adapter_dir)
    inner = peft_model.base_model.model
    layers = {n: m for n, m in inner.named_modules() if isinstance(m, AqlmLoraLinear)}
    if not layers:
        raise UserError(f"adapter {adapter_dir} adapts no AQLM layer of {model_dir}")
    _refuse_unholdable_bias(layers, adapter_dir)
    errors: dict[str, list[float]] = {}
    losses: list[float] = []
    if args.mode == "requantize":
        try:
            merged = merge_and_quantize(
                peft_model,
                rounds=args.rounds,
                beam_size=args.beam,
                errors=errors,
                calibration=calibration,
                tune_steps=args.tune_steps,
                tune_lr=args.tune_lr,
                losses=losses,
            )
        except ValueError as exc:
            raise UserError(f"cannot re-quantize {model_dir} with {adapter_dir}: {exc}") from None
    else:
        dtype = DTYPES[args.dtype] if args.dtype else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the size is reported below, for the whole checkpoint
            merged = merge_and_unload(peft_model, dtype)
        dequantize_model(merged, dtype)
    merged.eval()
    with staged_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        copy_tokenizer_files(model_dir, tmp)
    _report(args, layers, errors, losses, size_before, tensor_bytes(merged), out_dir, time.perf_counter() - start)
    return 0


def _calibration_windows(args, model_dir):
    """Up to ``--windows`` windows of ``--seq`` tokens of ``--calibration``, drawn without replacement (seed 0)."""
    from .data import check_vocab
    from .files import check_input_file
    from .inputs import model_inputs
    from .models import load_model_config
    from .text import sample_windows

    path = check_input_file(args.calibration, "calibration file")
    tokenizer, data = model_inputs(args, model_dir, path)
    check_vocab(load_model_config(model_dir).vocab_size, tokenizer, model_dir)
    return sample_windows(data.tokens, args.seq, args.windows)


def _refuse_unholdable_bias(layers: dict, adapter_dir) -> None:
    from .errors import UserError

    for name, layer in layers.items():
        biased = [a for a in layer.lora_A if layer.lora_bias.get(a)]
        if biased and layer.quantized_base().bias is None:
            raise UserError(
                f"adapter {adapter_dir} has a LoRA bias (lora_bias=True) on {name}, which has no bias in this "
                "model's architecture: no checkpoint of it can hold the merged bias"
            )


def _report(args, layers: dict, errors: dict, losses: list, before: int, after: int, out_dir, seconds: float) -> None:
    dora = sum(bool(layer.lora_magnitude_vector) for layer in layers.values())
    kind = f"{len(layers)} adapted layers ({dora} DoRA)"
    mib = 1 << 20
    if args.mode == "requantize":
        first = sum(e[0] for e in errors.values()) / len(errors)
        last = sum(e[-1] for e in errors.values()) / len(errors)
        print(
            f"re-quantized {kind} in their AQLM scheme, warm-started, {args.rounds} rounds: relative error to the "
            f"merged weights {first:.4f} -> {last:.4f} (mean over layers)"
        )
        if losses:
            print(
                f"codebooks and scales tuned on {args.calibration} ({args.tune_steps} steps): KL to the adapted model "
                f"{losses[0]:.4g} -> {losses[-1]:.4g}"
            )
    else:
        print(f"merged {kind}; every layer is now dense")
    print(f"saved to {out_dir}: {before / mib:.1f} MiB -> {after / mib:.1f} MiB of weights ({seconds:.1f} s)")
