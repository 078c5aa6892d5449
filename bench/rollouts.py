"""Rollout throughput: the llama.cpp rollout engine vs the transformers one, same prompts, same run.

    .venv/bin/python bench/rollouts.py --questions 8 --k 2 --max-new-tokens 128 --temperature 0.8

Both engines sample the embedded default (SmolLM2-135M-Instruct) plus an
SFT-shaped LoRA adapter (the recipe's LoRA: r 16, alpha 32, every projection,
with random B so that it is not a no-op; ``--adapter DIR`` takes a trained one,
``--no-adapter`` the bare base) exactly as ``medcritical rounds`` does:
``selfplay.rollouts`` on the first N demo train questions, k samples each at
the given temperature (top-p 0.95).

- transformers: the 4-bit NF4 model as in training, plus the adapter,
  batched ``--batch-size`` sequences at a time (rounds.rollouts.batch_size).
- llama.cpp: the q8_0 GGUF of base + adapter that the rounds cache in
  ``<output_dir>/policies`` (``medcritical.policy_gguf``), one sequence at a
  time; the k samples of a question reuse its evaluated prompt.

Generated tokens are counted with the model's tokenizer on both sides, on the
texts as the rollouts store them. Generation time excludes loading; load time
and the one-off GGUF export (merge, convert, quantize; from an empty cache) are
reported apart. Prints a table and writes JSON (``--out``).

llama.cpp's threads spin-wait on each other, so any other CPU-heavy process
wrecks its numbers (and transformers' less): benchmark on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medcritical.artifacts import versions
from medcritical.cli import offline_quiet
from medcritical.models import random_lora
from medcritical.recipe import LoraCfg

console = Console(stderr=True, highlight=False)


def run_engine(name: str, build: Any, recipe: Any, questions: list, work: Path, tok: Any) -> dict[str, Any]:
    """Load an engine, run the rounds' rollouts with it, count what it generated."""
    from medcritical.selfplay import rollouts

    t0 = time.perf_counter()
    engine = build()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    log = rollouts(recipe, engine, questions, work / f"rollouts-{engine.name}.jsonl", console)
    gen_s = time.perf_counter() - t0
    engine.close()
    samples = [s for row in log.values() for s in row["samples"]]
    tokens = sum(len(tok(s["text"], add_special_tokens=False)["input_ids"]) for s in samples)
    return {
        "engine": name,
        "load_seconds": round(load_s, 2),
        "seconds": round(gen_s, 2),
        "samples": len(samples),
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / gen_s, 2),
        "samples_per_second": round(len(samples) / gen_s, 3),
        "sample_accuracy": round(sum(s["correct"] for s in samples) / max(len(samples), 1), 4),
        "parse_rate": round(sum(s["parsed"] is not None for s in samples) / max(len(samples), 1), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=8, help="demo train questions (default 8)")
    ap.add_argument("--k", type=int, default=2, help="samples per question (default 2)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch-size", type=int, default=8, help="transformers sequences per batch, as rounds (default 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both engines (default: all)")
    ap.add_argument("--adapter", help="a trained LoRA adapter (default: a random SFT-shaped one)")
    ap.add_argument("--no-adapter", action="store_true", help="sample the bare base model")
    ap.add_argument("--engines", default="llamacpp,transformers", help="which engines, in order")
    ap.add_argument("--out", default="bench/results/rollouts.json")
    a = ap.parse_args(argv)
    offline_quiet()

    import torch
    from transformers.utils import logging as hf_logging

    from medcritical.data import load_recipe_data
    from medcritical.default_model import materialize
    from medcritical.engines import HFEngine, LlamaCppEngine
    from medcritical.models import load_model, load_tokenizer
    from medcritical.policy_gguf import policy_gguf
    from medcritical.recipe import Recipe

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    base = str(materialize())
    work = Path(tempfile.mkdtemp(prefix="bench-rollouts-"))
    try:
        recipe = Recipe(output_dir=str(work / "run"))
        ro = recipe.rounds.rollouts
        ro.k, ro.max_new_tokens, ro.temperature, ro.batch_size = a.k, a.max_new_tokens, a.temperature, a.batch_size
        questions = load_recipe_data(recipe.data, split="train")[: a.questions]
        if a.no_adapter:
            adapter = None
        elif a.adapter:
            adapter = Path(a.adapter)
        else:
            with console.status("making an SFT-shaped LoRA adapter..."):
                adapter = random_lora(base, work / "adapter", LoraCfg())  # shaped like the SFT stage's
        tok = load_tokenizer(str(adapter) if adapter else base)

        t0 = time.perf_counter()
        gguf = policy_gguf("default", adapter, work / "run" / "policies", console=console)
        export = {"seconds": round(time.perf_counter() - t0, 2), "steps": gguf.steps}
        export["size_mib"] = round(gguf.path.stat().st_size / 2**20, 1)

        builders = {
            "llamacpp": (
                "llama.cpp q8_0, 1 stream",
                lambda: LlamaCppEngine(gguf.path, n_ctx=recipe.eval.n_ctx, n_threads=a.threads, seed=recipe.seed),
            ),
            "transformers": (
                f"transformers NF4, batch {a.batch_size}",
                lambda: HFEngine(*_hf(load_model(recipe.model, adapter=adapter))),
            ),
        }
        rows = []
        for key in a.engines.split(","):
            label, build = builders[key.strip()]
            rows.append(run_engine(label, build, recipe, questions, work, tok))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ref = next((r for r in rows if r["engine"].startswith("transformers")), rows[0])
    for r in rows:
        r["speedup_vs_transformers"] = round(r["tokens_per_second"] / ref["tokens_per_second"], 2)
    t = Table(
        title=f"rollouts: {len(questions)} demo train questions x k={a.k}, {a.max_new_tokens} new tokens, "
        f"temperature {a.temperature}, {a.threads} threads (CPU)",
        title_justify="left",
    )
    for col in ("engine", "load s", "gen s", "samples", "tokens", "tok/s", "vs transformers"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        t.add_row(
            r["engine"],
            f"{r['load_seconds']:.1f}",
            f"{r['seconds']:.1f}",
            str(r["samples"]),
            str(r["generated_tokens"]),
            f"{r['tokens_per_second']:.1f}",
            f"{r['speedup_vs_transformers']:.2f}x",
        )
    console.print(t)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in export["steps"].items())
    console.print(f"one-off q8_0 GGUF export: {export['seconds']:.1f}s ({steps}), {export['size_mib']} MiB")

    result = {
        "args": vars(a),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "versions": versions(),
        "export": export,
        "results": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| engine | load s | generation s | samples | generated tokens | tok/s | vs transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['load_seconds']} | {r['seconds']} | {r['samples']} | {r['generated_tokens']} "
            f"| {r['tokens_per_second']} | {r['speedup_vs_transformers']}x |"
        )
    print(f"\none-off q8_0 GGUF export: {export['seconds']} s ({steps}); JSON: {a.out}")
    return 0


def _hf(loaded: Any) -> tuple[Any, Any]:
    return loaded.model, loaded.tokenizer


if __name__ == "__main__":
    raise SystemExit(main())
