"""``aqlm-lora generate MODEL_DIR --adapter NAME=DIR ... --prompts FILE.jsonl``: completions of many
prompts, each with its own adapter (or none), in mixed batches over one AQLM base.

Each line of the prompts file is ``{"prompt": "...", "adapter": "NAME"}`` (``"adapter": null`` or
absent: the base model). Prompts go in batches of ``--batch`` in file order; one batch mixes
adapters freely (``generate(..., adapter_names=[...])``: per layer, one fused call computes the
base once for every row and each row's own LoRA). Completions go to ``--out`` (JSONL, one
``{"prompt", "adapter", "completion", "tokens", "token_ids"}`` a line, in the file's order) or to stdout; the
summary line (prompt and decode tokens/s, measured separately) goes to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .errors import UserError

BASE = "__base__"


def add_parser(sub) -> None:
    from .cli import _SEED, _float_in, _int_in
    from .models import DTYPE_CHOICES

    p = sub.add_parser(
        "generate",
        help="complete prompts, each with its own LoRA adapter (or none), in mixed batches",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local AQLM (or dense) checkpoint with its tokenizer")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT adapter directory under the name the prompts use (repeat for more adapters)",
    )
    p.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help='JSONL, one {"prompt": ..., "adapter": NAME or null} object a line',
    )
    p.add_argument("--out", metavar="FILE", help="write the completions here (JSONL) instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--max-new-tokens", type=_int_in(1), default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--batch", type=_int_in(1), default=8, help="prompts per generate() call (default 8)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    # Checked when parsed (exit code 2), as every command's numbers: transformers raises deep in generate().
    p.add_argument(
        "--temperature", type=_float_in(0, low_open=True), default=1.0, help="sampling temperature, > 0 (default 1.0)"
    )
    p.add_argument("--top-k", type=_int_in(0), default=0, help="sample from the k most likely tokens (default 0: all)")
    p.add_argument(
        "--top-p",
        type=_float_in(0, 1, low_open=True),
        default=1.0,
        help="nucleus sampling mass, in (0, 1] (default 1.0: all)",
    )
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the sampling (default 0)")
    p.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype the model is loaded in (default float32)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter expects NAME=DIR, got {spec!r}")
        if name == BASE:
            raise UserError(f"--adapter: the name {BASE!r} is reserved for prompts without an adapter")
        if name in adapters:
            raise UserError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = Path(path)
    return adapters


def read_prompts(path: Path, adapters: dict[str, Path]) -> list[dict[str, Any]]:
    from .data import jsonl_lines  # UTF-8 (else one line naming the file), lines as JSONL defines them

    records = []
    for line_no, line in jsonl_lines(path):
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not a JSON object: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{where}: expected {{"prompt": "...", "adapter": NAME or null}}')
        adapter = record.get("adapter")
        if adapter is not None and (not isinstance(adapter, str) or adapter not in adapters):
            known = ", ".join(sorted(adapters)) or "none given"
            raise UserError(f"{where}: adapter {adapter!r} is not one of the --adapter names ({known})")
        records.append({"prompt": record["prompt"], "adapter": adapter})
    if not records:
        raise UserError(f"{path} holds no prompts")
    return records


def load_adapters(model, adapters: dict[str, Path]):
    """A PeftModel of our layers with every adapter under its name (none: the model itself)."""
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    from ..lora.dispatch import register
    from .adapters import check_adapter_fits, read_lora_config
    from .files import check_input_dir

    peft_model = None
    for name, directory in adapters.items():
        directory = check_input_dir(directory, f"adapter {name!r} directory", must_contain="adapter_config.json")
        check_adapter_fits(model if peft_model is None else peft_model.get_base_model(), directory)
        config = read_lora_config(directory)
        config.inference_mode = True
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, str(directory), adapter_name=name, config=register(config))
        else:
            peft_model.add_adapter(name, register(config))
            set_peft_model_state_dict(peft_model, load_peft_weights(str(directory), device="cpu"), adapter_name=name)
    if peft_model is None:
        return model
    peft_model.eval()
    return peft_model


class _StepClock:
    """A logits processor that records when each step's logits arrive: the first after the prompt's
    forward (prefill), every later one after one decode step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _decode(tokenizer, ids: list[int]) -> str:
    inner = getattr(tokenizer, "tokenizer", None)  # HFTokenizer wraps a transformers tokenizer
    if inner is not None:
        return inner.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids)


def generate_batch(model, tokenizer, records, args, pad_id: int, clock: _StepClock):
    """Completions of one batch of records (left-padded prompts, mixed adapters)."""
    import torch
    from transformers import LogitsProcessorList

    prompts = [tokenizer.encode(r["prompt"], specials=True) or [pad_id] for r in records]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    kwargs: dict[str, Any] = dict(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        pad_token_id=pad_id,
        logits_processor=LogitsProcessorList([clock]),
    )
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    if hasattr(model, "peft_config"):
        kwargs["adapter_names"] = [r["adapter"] or BASE for r in records]
    with torch.no_grad():
        out = model.generate(**kwargs)
    eos = tokenizer.eos_token_id
    results = []
    for i, p in enumerate(prompts):
        new = out[i, width:].tolist()
        produced = len(new)  # the EOS counts; the padding after it does not
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
            produced = len(new) + 1
        results.append((len(p), new, produced))
    return results


def _open_out(path: Path):
    try:
        return open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in run's finally
    except OSError as exc:
        raise UserError(f"cannot write output file {path}: {exc.strerror or exc}") from None


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..lora.fused_base import use_fused_kernels
    from .data import load_tokenizer
    from .files import check_input_dir, check_input_file, check_output_file
    from .models import DTYPES, load_causal_lm

    model_dir = check_input_dir(args.model_dir, "model directory", must_contain="config.json")
    prompts_path = check_input_file(args.prompts, "prompts file")
    out_path = check_output_file(args.out, args.overwrite) if args.out else None  # before the model loads
    adapters = parse_adapters(args.adapter)
    records = read_prompts(prompts_path, adapters)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, DTYPES[args.dtype])
    use_fused_kernels(model)
    model = load_adapters(model, adapters)
    model.eval()
    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    pad_id = config.pad_token_id if config.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    torch.manual_seed(args.seed)

    out_file = _open_out(out_path) if out_path is not None else None
    sink = out_file if out_file is not None else sys.stdout
    bar = tqdm(total=len(records), desc="generate", unit="prompt", disable=True if args.no_progress else None)
    prompt_tokens = decode_tokens = 0
    prefill_s = decode_s = 0.0
    try:
        for start in range(0, len(records), args.batch):
            batch = records[start : start + args.batch]
            clock = _StepClock()
            t0 = time.perf_counter()
            results = generate_batch(model, tokenizer, batch, args, pad_id, clock)
            t1 = time.perf_counter()
            first = clock.times[0] if clock.times else t1
            prefill_s += first - t0
            decode_s += t1 - first
            prompt_tokens += sum(n for n, _, _ in results)
            decode_tokens += sum(max(produced - 1, 0) for _, _, produced in results)  # after the prefill's token
            for record, (_, new, _) in zip(batch, results):
                # token_ids: the exact output (the text is decoded with replacement characters)
                row = {**record, "completion": _decode(tokenizer, new), "tokens": len(new), "token_ids": new}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(len(batch))
    finally:
        bar.close()
        if out_file is not None:
            out_file.close()
    summary = (
        f"generate: {len(records)} prompts, {len(adapters)} adapters; "
        f"prompt {prompt_tokens} tokens in {prefill_s:.2f} s ({prompt_tokens / max(prefill_s, 1e-9):,.1f} tokens/s); "
        f"decode {decode_tokens} tokens in {decode_s:.2f} s ({decode_tokens / max(decode_s, 1e-9):,.1f} tokens/s)"
    )
    print(summary, file=sys.stderr)
    return 0
