"""Many LoRA adapters on one AQLM base in one batch (issue 14): decode steps and a prefill on a
Llama-shaped stack of our layers.

    .venv/bin/python benchmarks/bench_multi_adapter.py [--quick] [--schemes 2x8,1x16] [--layers q,k,v,o,gate,up,down]

The stack is one Llama-7B block's linear layers (hidden 4096, intermediate 11008: q/k/v/o
4096x4096, gate/up 11008x4096, down 4096x11008), each an ``AqlmLoraLinear`` holding K adapters of
rank 16 (random, B non-zero), fp32. A decode step runs a batch of B rows (one token each) through
every layer, the rows spread round-robin over the K adapters; a prefill runs 8 prompts x 256
tokens over 8 adapters. Contenders, every one once per repeat in an order rotated each repeat
(interleaved, so a slow spell of a shared machine hits all), medians reported:

- ``fused``: ours, ``forward(x, adapter_names=...)``: one ``lora_mixed_forward`` call per layer;
- ``one adapter``: ours with one adapter active for every row (the plain fused call): the target's baseline;
- ``per-group loop``: ours as it was before, one fused call per adapter on that adapter's rows
  (``AqlmLoraLinear._grouped_forward``);
- ``PEFT stock``: ``peft.tuners.lora.aqlm.AqlmLoraLinear`` with ``adapter_names`` (reported as the error it
  raises when it does not run; ``--skip-peft`` leaves it out).

Targets: fused / one adapter <= 1.25x at 8 adapters, <= 1.5x at 32 (decode); <= 1.15x for the prefill.
Prints a markdown table; writes ``bench_multi_adapter.csv`` and ``.png`` to ``--out`` (default
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from plotting import pyplot, save_figure, write_csv  # benchmarks/plotting.py (scripts run with benchmarks/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RANK, ALPHA = 16, 32
HIDDEN, INTERMEDIATE = 4096, 11008
LAYERS = {  # name: (out, in)
    "q": (HIDDEN, HIDDEN),
    "k": (HIDDEN, HIDDEN),
    "v": (HIDDEN, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate": (INTERMEDIATE, HIDDEN),
    "up": (INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
}
CONTENDERS = ["fused", "one adapter", "per-group loop", "PEFT stock"]


def _args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="q and down layers, batches 8/32, adapters 1/8/32, prefill 8x32"
    )
    p.add_argument("--schemes", default="2x8,1x16")
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated subset of " + ",".join(LAYERS))
    p.add_argument("--batches", default="8,32,64", help="decode batch sizes (rows)")
    p.add_argument("--adapters", default="1,4,8,32", help="adapter counts")
    p.add_argument("--prefill", default="8x256", help="PROMPTSxTOKENS of the prefill over 8 adapters ('' : none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument(
        "--op-level",
        action="store_true",
        help="instead: the ops alone on one 4096x4096 layer (base aqlm_gemm, lora_forward with one adapter, "
        "lora_mixed_forward), where the LoRA part's time goes",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.batches, args.adapters, args.prefill = "q,down", "8,32", "1,8,32", "8x32"
        args.repeats = min(args.repeats, 3)
    return args


def build_layers(scheme_text: str, layer_names: list[str], max_adapters: int, seed: int = 0):
    """Our layers with ``max_adapters`` adapters each, and PEFT's stock layers on the same bases (lazily)."""
    import aqlm
    from peft import LoraConfig

    from aqlm_lora import AqlmLoraLinear
    from aqlm_lora.scheme import parse_scheme

    scheme = parse_scheme(scheme_text)
    g = torch.Generator().manual_seed(seed)
    ours = {}
    for name in layer_names:
        out_f, in_f = LAYERS[name]
        base = aqlm.QuantizedLinear(in_f, out_f, **scheme.aqlm_kwargs(), bias=False)
        info = torch.iinfo(base.codes.dtype)
        with torch.no_grad():
            base.codes.copy_(torch.randint(info.min, info.max + 1, base.codes.shape, generator=g).to(base.codes.dtype))
            base.codebooks.normal_(0, 1.0 / math.sqrt(scheme.num_codebooks * scheme.in_group_size), generator=g)
            base.scales.copy_(torch.rand(base.scales.shape, generator=g) + 0.5)
        base.requires_grad_(False)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
        layer = AqlmLoraLinear(base, "a0", r=RANK, lora_alpha=ALPHA, config=config)
        for k in range(1, max_adapters):
            layer.update_layer(f"a{k}", RANK, lora_alpha=ALPHA, config=config)
        with torch.no_grad():
            for k in range(max_adapters):
                layer.lora_B[f"a{k}"].weight.normal_(0, 0.02, generator=g)
        layer.requires_grad_(False)
        ours[name] = layer.eval()
    return ours


def peft_stock_layers(ours: dict, adapters: int):
    from peft import LoraConfig
    from peft.tuners.lora.aqlm import AqlmLoraLinear as Stock

    stock = {}
    for name, layer in ours.items():
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
        s = Stock(layer.get_base_layer(), "a0", r=RANK, lora_alpha=ALPHA, config=config)
        for k in range(1, adapters):
            s.update_layer(f"a{k}", RANK, lora_alpha=ALPHA, config=config)
        stock[name] = s.eval()
    return stock


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, object]:
    """Median seconds per contender (or the error it raised), interleaved with a rotating order."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    errors: dict[str, str] = {}
    for name, fn in contenders.items():  # warm-up (stacks built, caches filled) and error probe
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    live = [n for n in contenders if n not in errors]
    for rep in range(repeats):
        order = live[rep % len(live) :] + live[: rep % len(live)] if live else []
        for name in order:
            results[name].append(_time(contenders[name]))
    return {name: errors.get(name) or statistics.median(results[name]) for name in contenders}


def run_case(ours, stock, names: list[str], x_by_layer: dict, repeats: int) -> dict[str, object]:
    for layer in ours.values():  # the one-adapter baseline's adapter, chosen outside the timing
        layer.set_adapter("a0")

    def fused():
        for layer_name, layer in ours.items():
            layer(x_by_layer[layer_name], adapter_names=names)

    def single():
        for layer_name, layer in ours.items():
            layer(x_by_layer[layer_name])

    def grouped():
        for layer_name, layer in ours.items():
            layer._grouped_forward(x_by_layer[layer_name], names)

    contenders = {"fused": fused, "one adapter": single, "per-group loop": grouped}
    if stock is not None:

        def peft_stock():
            for layer_name, layer in stock.items():
                layer(x_by_layer[layer_name], adapter_names=names)

        contenders["PEFT stock"] = peft_stock
    with torch.no_grad():
        return measure(contenders, repeats)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v * 1e3:.1f}"
    text = str(v)
    return "fails (see the CSV)" if text.startswith("error:") else text


def _op_contenders(w, x, lora_A, lora_B_t, scalings, indices) -> dict[str, Callable[[], object]]:
    from aqlm_lora import ops

    lora_B0 = lora_B_t[0].T.contiguous()
    return {
        "base": lambda: ops.aqlm_gemm(x, *w.args(), None),
        "one": lambda: ops.lora_forward(x, *w.args(), None, lora_A[0], lora_B0, None, 2.0, 0.0, 0, 0),
        "mixed": lambda: ops.lora_mixed_forward(x, *w.args(), None, lora_A, lora_B_t, None, scalings, None, indices),
    }


def op_level(args: argparse.Namespace) -> int:
    """One 4096x4096 layer: base alone, + one adapter (lora_forward), + one adapter per row (lora_mixed_forward)."""
    from aqlm_lora.scheme import random_weight

    print(f"(one 4096x4096 layer, rank {RANK}, fp32; medians of {args.repeats} interleaved repeats, ms per call)")
    print("| scheme | rows | adapters | base | + one adapter | + mixed | mixed / one adapter | LoRA part: mixed, one |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for scheme in args.schemes.split(","):
        w = random_weight(scheme, HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(0))
        for n in [int(b) for b in args.batches.split(",")]:
            for k in [int(a) for a in args.adapters.split(",")]:
                g = torch.Generator().manual_seed(n * 100 + k)
                x = torch.randn(n, HIDDEN, generator=g)
                lora_A = torch.randn(k, RANK, HIDDEN, generator=g) * HIDDEN**-0.5
                lora_B_t = torch.randn(k, RANK, HIDDEN, generator=g) * 0.02
                scalings, indices = torch.full((k,), ALPHA / RANK), torch.arange(n) % k
                fns = _op_contenders(w, x, lora_A, lora_B_t, scalings, indices)
                m = measure(fns, args.repeats)
                cells = [scheme, str(n), str(k), *(f"{m[c] * 1e3:.2f}" for c in fns)]
                cells += [
                    f"{m['mixed'] / m['one']:.3f}x",
                    f"{(m['mixed'] - m['base']) * 1e3:.2f}, {(m['one'] - m['base']) * 1e3:.2f}",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _args(argv)
    if args.op_level:
        return op_level(args)
    layer_names = args.layers.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    adapter_counts = [int(a) for a in args.adapters.split(",")]
    rows = []
    t_start = time.perf_counter()
    for scheme in args.schemes.split(","):
        max_k = max(adapter_counts + [8])
        ours = build_layers(scheme, layer_names, max_k)
        stock_cache: dict[int, dict] = {}
        cases = [(b, k, 1) for b in batches for k in adapter_counts]
        if args.prefill:
            prompts, tokens = (int(v) for v in args.prefill.lower().split("x"))
            cases.append((prompts, 8, tokens))
        for batch, k, tokens in cases:
            names = [f"a{i % k}" for i in range(batch)]
            g = torch.Generator().manual_seed(batch * 100 + k)
            shape = (batch, tokens) if tokens > 1 else (batch,)
            x_by_layer = {n: torch.randn(*shape, LAYERS[n][1], generator=g) for n in layer_names}
            stock = None
            if not args.skip_peft:
                stock = stock_cache.get(k) or peft_stock_layers(ours, k)
                stock_cache = {k: stock}
            medians = run_case(ours, stock, names, x_by_layer, args.repeats)
            row = {
                "scheme": scheme,
                "case": "prefill" if tokens > 1 else "decode",
                "rows": batch * tokens,
                "batch": batch,
                "tokens": tokens,
                "adapters": k,
                **{c: medians.get(c, "skipped") for c in CONTENDERS},
            }
            fused, single = row["fused"], row["one adapter"]
            row["fused / one adapter"] = (
                fused / single if isinstance(fused, float) and isinstance(single, float) else None
            )
            grouped = row["per-group loop"]
            row["speed-up vs per-group loop"] = grouped / fused if isinstance(grouped, float) else None
            rows.append(row)
            print(
                f"  {scheme} {row['case']} batch {batch}x{tokens} over {k} adapters: "
                + ", ".join(f"{c} {_fmt(row[c])}" for c in CONTENDERS),
                file=sys.stderr,
                flush=True,
            )
    print(
        f"(measured in {time.perf_counter() - t_start:.0f} s; layers {','.join(layer_names)}; "
        f"threads {torch.get_num_threads()}; medians of {args.repeats} interleaved repeats, ms per step)"
    )
    header = [
        "scheme",
        "case",
        "batch x tokens",
        "adapters",
        *[f"{c} (ms)" for c in CONTENDERS],
        "fused / one adapter",
        "speed-up vs per-group loop",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        ratio = r["fused / one adapter"]
        speed = r["speed-up vs per-group loop"]
        cells = [
            r["scheme"],
            r["case"],
            f"{r['batch']}x{r['tokens']}",
            str(r["adapters"]),
            *[_fmt(r[c]) for c in CONTENDERS],
            f"{ratio:.3f}x" if ratio is not None else "-",
            f"{speed:.2f}x" if speed is not None else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "bench_multi_adapter.csv", rows)
    _plot(rows, out / "bench_multi_adapter.png")
    print(f"wrote {out / 'bench_multi_adapter.csv'} and .png", file=sys.stderr)
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    decode = [r for r in rows if r["case"] == "decode"]
    schemes = sorted({r["scheme"] for r in decode})
    fig, axes = plt.subplots(1, max(1, len(schemes)), figsize=(6 * max(1, len(schemes)), 4), squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        for batch in sorted({r["batch"] for r in decode}):
            sel = [r for r in decode if r["scheme"] == scheme and r["batch"] == batch]
            ks = [r["adapters"] for r in sel]
            for contender, style in (("fused", "-o"), ("per-group loop", "--x")):
                ys = [r[contender] * 1e3 if isinstance(r[contender], float) else float("nan") for r in sel]
                ax.plot(ks, ys, style, label=f"{contender}, batch {batch}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters in the batch")
        ax.set_ylabel("ms per decode step (stack of layers)")
        ax.set_title(f"AQLM {scheme}, rank {RANK}")
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
