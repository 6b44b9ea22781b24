"""``aqlm-lora quantize MODEL_DIR OUT_DIR --scheme 2x8``: a dense checkpoint to an AQLM one, tokenizer included."""

from __future__ import annotations

import sys

import torch

from ..quantize import mean_errors, parse_scheme, quantize_model
from .data import has_tokenizer
from .errors import UserError
from .files import check_input_dir, check_output_apart, check_output_dir, staged_dir
from .models import DTYPES, aqlm_layer_names, config_dtype, load_causal_lm, load_model_config
from .tokenizer_files import copy_tokenizer_files


def run(args) -> int:
    try:
        scheme = parse_scheme(args.scheme)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    out_dir = check_output_dir(args.out_dir, args.overwrite)
    check_output_apart(out_dir, "OUT_DIR", {"MODEL_DIR": model_dir})
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    # Quantize in float32 whatever the checkpoint holds; save in the dtype asked for, else the checkpoint's.
    dtype = DTYPES[args.dtype] if args.dtype else config_dtype(load_model_config(model_dir)) or torch.float32
    model = load_causal_lm(model_dir)
    if aqlm_layer_names(model) or getattr(model.config, "quantization_config", None) is not None:
        raise UserError(f"{model_dir} is already quantized; quantize a dense checkpoint")
    torch.manual_seed(args.seed)
    try:
        errors = quantize_model(
            model,
            scheme,
            skip=skip,
            progress=not args.no_progress,
            rounds=args.rounds,
            kmeans_iters=args.kmeans_iters,
            beam_size=args.beam,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UserError(f"cannot quantize {model_dir}: {exc}") from None
    model.to(dtype)  # codes stay integers
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        copied = copy_tokenizer_files(model_dir, tmp)
    per_round = " -> ".join(f"{e:.4f}" for e in mean_errors(errors))
    print(f"quantized {len(errors)} layers to AQLM {scheme} ({scheme.bits_per_weight:g} bits/weight in codes)")
    print(f"relative weight error ||W - Wq|| / ||W||, mean over layers, per round: {per_round}")
    print(
        f"saved to {out_dir} ({str(dtype).removeprefix('torch.')}; copied {', '.join(copied) or 'no tokenizer files'})"
    )
    if not has_tokenizer(out_dir):
        print(
            f"note: {model_dir} has no tokenizer files; finetune and eval will need them in {out_dir}", file=sys.stderr
        )
    return 0
