"""What ``finetune`` and ``eval`` read besides the weights: the model's tokenizer, the data, the window length."""

from __future__ import annotations

from pathlib import Path

from .data import TokenData, Tokenizer, load_tokenizer, read_data
from .errors import UserError, is_int
from .models import check_seq, load_model_config

# Window length when --seq is not given (shorter if the model has fewer positions).
DEFAULT_SEQ = 128


def model_inputs(args, model_dir: Path, data_path: Path) -> tuple[Tokenizer, TokenData]:
    """The model's tokenizer and the tokenized data, ``args.seq`` settled against the model's positions.
    Training and scoring both read ``args.seq``-token windows (the targets are the window shifted by
    one inside it), so the data needs at least that many tokens."""
    config = load_model_config(model_dir)
    if args.seq is None:
        limit = getattr(config, "max_position_embeddings", None)
        args.seq = min(DEFAULT_SEQ, limit) if is_int(limit) and limit >= 2 else DEFAULT_SEQ
    check_seq(config, args.seq, model_dir)
    tokenizer = load_tokenizer(model_dir)
    data = read_data(data_path, tokenizer, args.data_format)
    if data.tokens.numel() < args.seq:
        raise UserError(f"{data_path} has {data.tokens.numel()} tokens; --seq {args.seq} needs at least {args.seq}")
    if data.targets == 0:
        raise UserError(f"{data_path} has no completion tokens to learn or score (only prompts)")
    return tokenizer, data
