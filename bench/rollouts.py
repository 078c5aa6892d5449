"""Rollout throughput: every rollout engine on the same prompts, the same policy, in the same run.

    .venv/bin/python bench/rollouts.py --questions 16 --k 2 --max-new-tokens 128 --temperature 0.8

The policy is the embedded default (SmolLM2-135M-Instruct) plus an SFT-shaped
LoRA adapter (the recipe's LoRA: r 16, alpha 32, every projection, with random
B so that it is not a no-op; ``--adapter DIR`` takes a trained one,
``--no-adapter`` the bare base), sampled exactly as ``medcritical rounds``
does: ``selfplay.rollouts`` on the first N demo train questions, k samples
each at the given temperature (top-p 0.95). Engines (``--engines``, in order):

- ``transformers``: the 4-bit NF4 model as in training, plus the adapter,
  ``--batch-size`` sequences at a time (rounds.rollouts.batch_size): the baseline.
- ``llamacpp-1``: in-process llama.cpp on the q8_0 GGUF of base + adapter that the
  rounds cache in ``<output_dir>/policies``, one sequence at a time through
  llama-cpp-python's ``create_completion`` (the engine before it decoded sequences
  together), on the same chunks and seeds.
- ``llamacpp``: the same engine as the rounds run it on CPU: ``--batch-size``
  sequences decoded together, one ``llama_decode`` per step for all of them.
- ``llamacpp-server``: llama-cpp-python's server on the same GGUF
  (``medcritical.serving.llamacpp.LlamaCppServer``), one process with every thread.
- ``llamacpp-server-xN``: N such processes with ``threads / N`` threads each
  (that server decodes one request at a time; N processes are its "parallel slots").
- ``vllm-merged``: vLLM (CPU build, its own venv; ``bash setup.sh --vllm``) on base
  + adapter merged into one ``--vllm-dtype`` model directory.
- ``vllm-lora``: vLLM on the base with the adapter as a LoRA module.

Served engines get ``--served-batch`` samples per ``generate`` call (rounds'
``batch_size``; the rollouts ask for ``batch_size // k`` questions at a time)
and as many requests in flight (``--concurrency``; 2 per llama.cpp process).
vLLM engines are skipped, with a note, when vLLM is not installed.

Generated tokens are counted with the model's tokenizer on every side, on the
texts as the rollouts store them. Generation time excludes loading (server
start included); load time and the one-off exports (GGUF: merge, convert,
quantize; merged directory for vLLM) are reported apart. Prints a table and
writes JSON (``--out``), with the machine's load average before and after.

llama.cpp's threads spin-wait on each other, so any other CPU-heavy process
wrecks its numbers (and the others' less): benchmark on an idle machine.
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

from rich.table import Table

from medcritical.artifacts import versions
from medcritical.models import random_lora
from medcritical.recipe import LoraCfg
from medcritical.runtime import make_console, offline_quiet

console = make_console(stderr=True)


def run_engine(
    label: str, build: Any, recipe: Any, questions: list, work: Path, tok: Any, batch: int
) -> dict[str, Any]:
    """Load an engine, run the rounds' rollouts with it, count what it generated."""
    from medcritical.selfplay import rollouts

    recipe = recipe.model_copy(deep=True)
    recipe.rounds.rollouts.batch_size = batch
    t0 = time.perf_counter()
    engine = build()
    load_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        log = rollouts(recipe, engine, questions, work / f"rollouts-{label.replace(' ', '_')}.jsonl", console)
        gen_s = time.perf_counter() - t0
    finally:
        engine.close()
    samples = [s for row in log.values() for s in row["samples"]]
    tokens = sum(len(tok(s["text"], add_special_tokens=False)["input_ids"]) for s in samples)
    return {
        "engine": label,
        "name": engine.name,
        "batch": batch,
        "load_seconds": round(load_s, 2),
        "seconds": round(gen_s, 2),
        "samples": len(samples),
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / gen_s, 2),
        "samples_per_second": round(len(samples) / gen_s, 3),
        "sample_accuracy": round(sum(s["correct"] for s in samples) / max(len(samples), 1), 4),
        "parse_rate": round(sum(s["parsed"] is not None for s in samples) / max(len(samples), 1), 4),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=16, help="demo train questions (default 16)")
    ap.add_argument("--k", type=int, default=2, help="samples per question (default 2)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch-size", type=int, default=8, help="transformers sequences per batch, as rounds (default 8)")
    ap.add_argument("--served-batch", type=int, default=32, help="samples per generate call for served engines")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight for vLLM (default 32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every engine (default: all)")
    ap.add_argument("--vllm-dtype", default="bfloat16", help="vLLM's --dtype and the merged directory's (bfloat16)")
    ap.add_argument("--adapter", help="a trained LoRA adapter (default: a random SFT-shaped one)")
    ap.add_argument("--no-adapter", action="store_true", help="sample the bare base model")
    ap.add_argument(
        "--engines",
        default="transformers,llamacpp-1,llamacpp,llamacpp-server,llamacpp-server-x2,vllm-merged,vllm-lora",
        help="which engines, in order",
    )
    ap.add_argument("--out", default="bench/results/rollouts.json")
    a = ap.parse_args(argv)
    offline_quiet()

    import torch
    from transformers.utils import logging as hf_logging

    from medcritical.data import load_recipe_data
    from medcritical.default_model import materialize
    from medcritical.engines import HFEngine, LlamaCppEngine
    from medcritical.gguf.merge import merge_adapters
    from medcritical.models import load_model, load_tokenizer
    from medcritical.policy import policy_gguf
    from medcritical.recipe import Recipe
    from medcritical.serving.llamacpp import LlamaCppServer
    from medcritical.serving.vllm import VllmServer, vllm_available

    OneAtATime = _one_at_a_time()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    base = str(materialize())
    work = Path(tempfile.mkdtemp(prefix="bench-rollouts-"))
    logs = Path(a.out).parent / "rollouts-logs"
    logs.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    export: dict[str, Any] = {}
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
        keys = [k.strip() for k in a.engines.split(",") if k.strip()]

        gguf = None
        if any(k.startswith("llamacpp") for k in keys):
            t0 = time.perf_counter()
            gguf = policy_gguf("default", adapter, work / "run" / "policies", console=console).path
            export["gguf_seconds"] = round(time.perf_counter() - t0, 2)
            export["gguf_mib"] = round(gguf.stat().st_size / 2**20, 1)
        merged = None
        vllm = vllm_available()
        if any(k.startswith("vllm") for k in keys) and not vllm:
            notes.append("vLLM engines skipped: no vLLM venv (bash setup.sh --vllm)")
        if "vllm-merged" in keys and vllm:
            t0 = time.perf_counter()
            with console.status("merging the adapter for vLLM..."):
                merged = merge_adapters(base, [adapter] if adapter else [], work / "merged", dtype=a.vllm_dtype).path
            export["merge_seconds"] = round(time.perf_counter() - t0, 2)

        def llama_server(n: int) -> Any:
            server = LlamaCppServer(
                gguf, n_ctx=recipe.eval.n_ctx, n_parallel=n, threads=a.threads, log_file=logs / f"llamacpp-x{n}.log"
            )
            return server.start().engine(concurrency=2)

        def vllm_server(lora: bool) -> Any:
            model_dir, lora_dir = (base, adapter) if lora else (merged, None)
            server = VllmServer(
                model_dir, lora_dir=lora_dir, dtype=a.vllm_dtype, max_model_len=recipe.eval.n_ctx,
                log_file=logs / ("vllm-lora.log" if lora else "vllm-merged.log"),
                env={"VLLM_CPU_OMP_THREADS_BIND": "auto"},
            )  # fmt: skip
            return server.start().engine(concurrency=a.concurrency)

        builders: dict[str, tuple[str, Any, int]] = {
            "transformers": (
                f"transformers NF4, batch {a.batch_size}",
                lambda: HFEngine(*_hf(load_model(recipe.model, adapter=adapter))),
                a.batch_size,
            ),
            "llamacpp-1": (
                "llama.cpp q8_0 in-process, 1 sequence at a time",
                lambda: OneAtATime(gguf, n_ctx=recipe.eval.n_ctx, n_threads=a.threads, seed=recipe.seed),
                a.batch_size,
            ),
            "llamacpp": (
                f"llama.cpp q8_0 in-process, {a.batch_size} sequences per step (the CPU default)",
                lambda: LlamaCppEngine(gguf, n_ctx=recipe.eval.n_ctx, n_threads=a.threads, seed=recipe.seed),
                a.batch_size,
            ),
        }
        for key in keys:
            if key.startswith("llamacpp-server"):
                n = int(key.rsplit("-x", 1)[1]) if "-x" in key else 1
                per = max(1, a.threads // n)
                label = f"llama.cpp server q8_0, {n} process{'es' if n > 1 else ''} x {per} thread{'s' * (per > 1)}"
                builders[key] = (label, lambda n=n: llama_server(n), a.served_batch)
        if vllm:
            builders["vllm-merged"] = (
                f"vLLM CPU, merged policy ({a.vllm_dtype})",
                lambda: vllm_server(False),
                a.served_batch,
            )
            builders["vllm-lora"] = (
                f"vLLM CPU, base + LoRA ({a.vllm_dtype})",
                lambda: vllm_server(True),
                a.served_batch,
            )
        rows = []
        for key in keys:
            if key not in builders:
                if not key.startswith("vllm"):
                    raise SystemExit(f"unknown engine {key!r}")
                continue
            label, build, batch = builders[key]
            console.print(f"[bold]{label}[/] (load average {os.getloadavg()[0]:.2f})")
            try:
                rows.append(run_engine(label, build, recipe, questions, work, tok, batch))
            except Exception as e:  # one engine failing must not lose the others' results
                notes.append(f"{label}: failed: {type(e).__name__}: {str(e)[:300]}")
                console.print(f"[red]{notes[-1]}[/]")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ref = next((r for r in rows if r["engine"].startswith("transformers")), rows[0])
    for r in rows:
        r["speedup_vs_transformers"] = round(r["tokens_per_second"] / ref["tokens_per_second"], 2)
    load_after = [round(x, 2) for x in os.getloadavg()]
    title = (
        f"rollouts: {len(questions)} demo train questions x k={a.k}, {a.max_new_tokens} new tokens, "
        f"temperature {a.temperature}, {a.threads} threads (CPU); load average {load_before[0]} before, "
        f"{load_after[0]} after"
    )
    t = Table(title=title, title_justify="left")
    for col in ("engine", "batch", "load s", "gen s", "samples", "tokens", "tok/s", "vs transformers"):
        t.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        t.add_row(
            r["engine"],
            str(r["batch"]),
            f"{r['load_seconds']:.1f}",
            f"{r['seconds']:.1f}",
            str(r["samples"]),
            str(r["generated_tokens"]),
            f"{r['tokens_per_second']:.1f}",
            f"{r['speedup_vs_transformers']:.2f}x",
        )
    console.print(t)
    for n in notes:
        console.print(f"[yellow]{n}[/]")

    result = {
        "args": vars(a),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "load_average": {"before": load_before, "after": load_after},
        "versions": versions(),
        "export": export,
        "notes": notes,
        "results": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| engine | batch | load s | generation s | samples | generated tokens | tok/s | vs transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['batch']} | {r['load_seconds']} | {r['seconds']} | {r['samples']} "
            f"| {r['generated_tokens']} | {r['tokens_per_second']} | {r['speedup_vs_transformers']}x |"
        )
    print(f"\nload average (1 min) {load_before[0]} before, {load_after[0]} after; exports {export}; JSON: {a.out}")
    return 0


def _one_at_a_time() -> type:
    from medcritical.engines import LlamaCppEngine, sample_seed

    class OneAtATime(LlamaCppEngine):
        """The engine as it was before it decoded sequences together: llama-cpp-python's ``create_completion``,
        one sequence at a time, the samples of a prompt reusing its evaluated tokens (same seeds)."""

        def generate(self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=0, on_done=None,
                     batch_size=1):  # fmt: skip
            out = []
            for i, msgs in enumerate(prompts):
                tokens = self.tokenize(self.render(msgs))
                self.llm.reset()
                texts = []
                for j in range(n if temperature > 0 else 1):
                    res = self.llm.create_completion(
                        tokens, max_tokens=max(1, min(max_new_tokens, self.n_ctx - len(tokens))),
                        temperature=temperature, top_p=top_p, top_k=0, min_p=0.0,
                        seed=sample_seed(sample_seed(seed, i, 0), 0, j), stop=[self.eos] if self.eos else None,
                    )  # fmt: skip
                    texts.append(res["choices"][0]["text"].strip())
                out.append(texts if len(texts) == n else texts * n)
                if on_done:
                    on_done(1)
            return out

    return OneAtATime


def _hf(loaded: Any) -> tuple[Any, Any]:
    return loaded.model, loaded.tokenizer


if __name__ == "__main__":
    raise SystemExit(main())
