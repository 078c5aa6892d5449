"""Eval throughput: llama.cpp backend vs transformers backend, same questions, same run.

    .venv/bin/python bench/eval_throughput.py --questions 16 --max-new-tokens 128

Both backends run the embedded default (SmolLM2-135M-Instruct): transformers on
the materialized float32 safetensors (batched generation), llama.cpp on the
original Q4_1 GGUF. Greedy decoding, the demo set's first N questions, one
process, one after the other. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from medcritical.data import demo_path, load_questions
from medcritical.default_model import default_gguf
from medcritical.engines import open_engine
from medcritical.evaluate import evaluate
from medcritical.runtime import make_console, offline_quiet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="bench/results/eval_throughput.json")
    a = ap.parse_args()
    offline_quiet()
    console = make_console(stderr=True)
    records = load_questions(demo_path()).records[: a.questions]
    rows = []
    for name, model in (("transformers (f32, batched)", "default"), ("llama.cpp (Q4_1 GGUF)", str(default_gguf()))):
        t0 = time.perf_counter()
        engine = open_engine(model)
        load_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            s = evaluate(
                records,
                engine,
                Path(tmp),
                max_new_tokens=a.max_new_tokens,
                batch_size=a.batch_size,
                console=console,
                label=name,
            )
            tokens = 0
            for line in (Path(tmp) / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
                tokens += len(json.loads(line)["output"])  # characters; the tokenizers differ in detail only
        rows.append({"backend": name, "questions": s["n"], "seconds": s["seconds"], "questions_per_second": s["questions_per_second"],
                     "load_seconds": round(load_s, 1), "accuracy": s["accuracy"], "parse_rate": s["parse_rate"], "output_chars": tokens})  # fmt: skip
        del engine
    base = rows[0]["questions_per_second"]
    for r in rows:
        r["speedup_vs_transformers"] = round(r["questions_per_second"] / base, 2)
        console.print(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": rows}, indent=2) + "\n")
    print("| backend | questions | seconds | q/s | speedup | load s | output chars |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['questions']} | {r['seconds']} | {r['questions_per_second']} | {r['speedup_vs_transformers']}x | {r['load_seconds']} | {r['output_chars']} |"
        )


if __name__ == "__main__":
    main()
