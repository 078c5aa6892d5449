"""Benchmark: export wall time, and CPU decode speed of the GGUFs vs the merged transformers model.

    python bench/inference.py                      # the embedded SmolLM2-135M-Instruct, no adapter
    python bench/inference.py --adapter runs/run/sft/adapter --prompts 5 --new-tokens 128

1. Export, timed step by step (merge, convert to f16, quantize to q8_0 and
   q4_k_m) with the model's size, into ``--out``.
2. Decode tokens/s on the same prompts (the first dev questions, rendered as
   the student sees them) in the same run: the merged model through
   transformers (float32, as exported) and each GGUF through llama.cpp. Every
   backend generates exactly ``--new-tokens`` tokens greedily (end of sequence
   is ignored) after one warm-up; decode speed is measured from the first
   generated token to the last, so prompt processing is reported separately.

Prints two tables and writes ``bench.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, width=100)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_timed(
    base: str, adapters: list[str], out: Path, quants: list[str]
) -> tuple[dict[str, float], dict[str, Path], Any]:
    """Run the export's steps (no parity) from scratch; returns (seconds per step, GGUFs, merge result)."""
    from medcritical.gguf.convert import convert, quantize
    from medcritical.gguf.merge import merge_adapters

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    merged = merge_adapters(base, adapters, out / "merged", force=True)
    seconds["merge"] = time.perf_counter() - t0
    ggufs = {"f16": out / "model-f16.gguf"}
    t0 = time.perf_counter()
    convert(merged.path, ggufs["f16"], "f16")
    seconds["convert f16"] = time.perf_counter() - t0
    for q in quants:
        ggufs[q] = out / f"model-{q}.gguf"
        t0 = time.perf_counter()
        quantize(ggufs["f16"], ggufs[q], q)
        seconds[f"quantize {q}"] = time.perf_counter() - t0
    return seconds, ggufs, merged


def prompts(n: int) -> list[list[dict[str, str]]]:
    from medcritical.data import load_recipe_data
    from medcritical.prompts import choose_lang, question_messages
    from medcritical.recipe import Recipe

    records = load_recipe_data(Recipe().data, split="dev")[:n]
    return [question_messages(r.question, r.options, r.multi, choose_lang(r.question, "auto")) for r in records]


def speeds(times: list[tuple[int, float, float, float]], new_tokens: int) -> dict[str, float]:
    """(prompt tokens, start, first token, last token) per prompt -> mean prefill and decode tokens/s."""
    prefill = sum(n for n, *_ in times) / sum(first - start for _, start, first, _ in times)
    decode = (new_tokens - 1) * len(times) / sum(last - first for *_, first, last in times)
    return {"prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 1)}


def bench_transformers(
    merged: Path, messages: list[list[dict[str, str]]], new_tokens: int, threads: int
) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from export.parity import greedy_generate, load_merged

    class Clock(BaseStreamer):
        """Records when generate() hands over each new token (the first put is the prompt)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    torch.set_num_threads(threads)
    model, tok = load_merged(merged)

    def run(msgs: list[dict[str, str]], n: int) -> tuple[int, float, float, float]:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        clock = Clock()
        start = time.perf_counter()
        greedy_generate(model, ids, n, pad_token_id=tok.pad_token_id, min_new_tokens=n, streamer=clock)
        return ids.shape[1], start, clock.stamps[1], clock.stamps[-1]

    run(messages[0], 4)
    times = [run(m, new_tokens) for m in messages]
    meta = {"backend": "transformers", "file": "merged (fp32)", "size_bytes": dir_bytes(Path(merged))}
    return meta | {"threads": threads} | speeds(times, new_tokens)


def bench_llamacpp(gguf: Path, messages: list[list[dict[str, str]]], new_tokens: int, threads: int) -> dict[str, Any]:
    from medcritical.engines import LlamaCppEngine

    engine = LlamaCppEngine(gguf, n_ctx=2048, n_threads=threads)
    llm = engine.llm

    def run(msgs: list[dict[str, str]], n: int) -> tuple[int, float, float, float]:
        ids = engine.tokenize(engine.render(msgs))
        llm.reset()
        stamps = []
        start = time.perf_counter()
        for _ in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return len(ids), start, stamps[0], stamps[-1]

    run(messages[0], 4)
    times = [run(m, new_tokens) for m in messages]
    llm.close()
    meta = {"backend": "llama.cpp", "file": gguf.name, "size_bytes": gguf.stat().st_size}
    return meta | {"threads": threads} | speeds(times, new_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="default", help="base model dir or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", default=[], help="LoRA adapter to merge (repeatable)")
    p.add_argument("--out", default="runs/bench-inference", help="work directory for the exported files")
    p.add_argument("--prompts", type=int, default=3, help="dev questions to time (default 3)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both backends (default: all)")
    p.add_argument("--json", help="where to write the results (default: OUT/bench.json)")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with console.status("exporting (merge, convert, quantize)..."):
        seconds, ggufs, merged = export_timed(args.base, args.adapter, out, ["q8_0", "q4_k_m"])
    messages = prompts(args.prompts)
    with console.status("timing transformers..."):
        rows = [bench_transformers(merged.path, messages, args.new_tokens, args.threads)]
    for kind in ("f16", "q8_0", "q4_k_m"):
        with console.status(f"timing llama.cpp {kind}..."):
            rows.append(bench_llamacpp(ggufs[kind], messages, args.new_tokens, args.threads))
    sizes = {"merged_float32": dir_bytes(merged.path)} | {k: p.stat().st_size for k, p in ggufs.items()}
    for r in rows:
        r["decode_speedup"] = round(r["decode_tok_s"] / rows[0]["decode_tok_s"], 2)

    t = Table(
        title=f"decode on {args.prompts} dev prompts x {args.new_tokens} new tokens (greedy, CPU)", title_justify="left"
    )
    for col in ("backend", "model", "MiB", "threads", "prefill tok/s", "decode tok/s", "decode x"):
        t.add_column(col, justify="left" if col in ("backend", "model") else "right")
    for r in rows:
        t.add_row(
            r["backend"],
            r["file"],
            f"{r['size_bytes'] / 2**20:.0f}",
            str(r["threads"]),
            f"{r['prefill_tok_s']:.0f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_speedup']:.2f}x",
        )
    console.print(t)
    console.print(f"export wall time, {merged.n_params / 1e6:.1f}M parameters:")
    e = Table()
    e.add_column("step")
    e.add_column("seconds", justify="right")
    for step, s in seconds.items():
        e.add_row(step, f"{s:.1f}")
    e.add_row("total", f"{sum(seconds.values()):.1f}")
    console.print(e)
    result = {
        "base": args.base,
        "adapters": args.adapter,
        "n_params": merged.n_params,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "export_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "sizes_bytes": sizes,
        "decode": rows,
    }
    path = Path(args.json) if args.json else out / "bench.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
