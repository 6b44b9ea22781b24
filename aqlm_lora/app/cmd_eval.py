"""``aqlm-lora eval MODEL_DIR [--adapter DIR] --data FILE``: perplexity on consecutive windows of a file."""

from __future__ import annotations

from ..lora.fused_base import use_fused_kernels
from .adapters import load_adapter
from .data import check_vocab
from .errors import UserError
from .files import check_input_dir, check_input_file
from .inputs import model_inputs
from .models import DTYPES, load_causal_lm
from .progress import ProgressLog
from .text import perplexity


def run(args) -> int:
    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    data_path = check_input_file(args.data, "data file")
    tokenizer, data = model_inputs(args, model_dir, data_path)
    model = load_causal_lm(model_dir, DTYPES[args.dtype])
    check_vocab(model.get_input_embeddings().num_embeddings, tokenizer, model_dir)
    use_fused_kernels(model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    windows = data.tokens.numel() // args.seq
    if args.max_windows:
        windows = min(windows, args.max_windows)
    progress = _EvalProgress(args, windows)
    try:
        ppl = perplexity(
            model,
            data.tokens,
            args.seq,
            batch=args.batch,
            max_windows=args.max_windows,
            labels=data.labels,
            progress=progress,
        )
    except ValueError as exc:  # e.g. the windows hold prompt tokens only
        raise UserError(f"cannot evaluate {data_path}: {exc}") from None
    finally:
        progress.close()
    scored = "" if data.labels is None else ", completion tokens only"
    print(f"perplexity {ppl:.4f} ({windows} windows of {args.seq} tokens{scored})")
    return 0


class _EvalProgress:
    """A bar (on a terminal) and --log-every lines (anywhere) over the batches of ``eval``."""

    def __init__(self, args, windows: int) -> None:
        from tqdm.auto import tqdm

        self.batch = args.batch
        batches = -(-windows // args.batch)
        self.log = ProgressLog("eval", "batch", 0, batches, args.log_every, args.batch * args.seq)
        self.bar = tqdm(total=windows, desc="eval", unit="window", disable=True if args.no_progress else None)

    def __call__(self, done: int, total: int, running_ppl: float) -> None:
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(ppl=f"{running_ppl:.3f}")
        self.log.update(-(-done // self.batch), f"ppl {running_ppl:.4f}")

    def close(self) -> None:
        self.bar.close()
