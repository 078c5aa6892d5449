"""SFT speed and memory: medcritical's sft stage vs a plain TRL SFTTrainer script.

    .venv/bin/python bench/sft_step.py --examples 32 --out bench/results/sft_step.json

Both sides train one epoch over the same examples: ``--examples`` templates
drawn (seed 0) from the demo set's dataset-teacher templates, on the embedded
SmolLM2-135M-Instruct in 4-bit NF4, with the same LoRA (r 16, alpha 32, the 7
projections) and the same trainer settings, all read from one recipe: batch 4,
max_length 768, learning rate and schedule, float32
(TRL would default to bf16 autocast and gradient checkpointing; both are off
on both sides), completion-only loss with TRL's default chunked NLL. The plain
side is ``SFTTrainer`` as a user would write it; the kit side is
``medcritical.sft.run``, whose only difference in the work is that its
batches hold examples of similar length (``train_sampling_strategy=
"group_by_length"``), so less of each batch is padding.

Lockstep: each side runs in its own process (so peak RSS is its own) but never
at the same time as the other: the parent lets them take training steps in
turns (plain, kit, kit, plain, plain, ...), so a machine that slows down (other
jobs, heat) slows both alike and neither side always goes first. A step is
timed from its release to its end (forward, backward, optimizer step); model
loading and tokenizing are not timed. Tokens are TRL's ``num_tokens``, the sum
of attention-mask ones: real tokens, padding excluded, the same count on both
sides since they train the same examples (checked). The spread is a bootstrap
over steps (5th-95th percentile of the ratio).

Size: 32 examples is the smallest set where length grouping does anything
(transformers sorts within random mega-batches of min(n // 16, 50) batches of
4, so at n < 32 a mega-batch is one batch); the gain grows with n (the whole
demo set is 78 templates: ``--examples 78``). Cost: both processes are alive
together (about 2 x 7.5 GB RSS at batch 4 x 768). On 2 idle cores one repeat
of 32 examples takes about 3.5 minutes, ``--repeats 2`` about 7.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import tempfile
import time
from pathlib import Path

MAX_LENGTH = 768
OVERRIDES = [
    f"sft.max_length={MAX_LENGTH}",
    "sft.train.per_device_train_batch_size=4",
    "sft.train.gradient_accumulation_steps=1",
    "sft.train.gradient_checkpointing=false",
    "sft.train.num_train_epochs=1",
    "sft.train.max_steps=-1",
    "sft.train.logging_steps=1",
    "sft.train.save_steps=100000",
]


def bench_recipe(run: Path):
    from medcritical.recipe import load_recipe

    return load_recipe(None, [f"output_dir={run}", *OVERRIDES])


def templates(run: Path, n: int) -> Path:
    """``n`` of the demo templates from the dataset teacher (no model needed), drawn with seed 0."""
    from rich.console import Console

    from medcritical import teach
    from medcritical.artifacts import read_jsonl
    from medcritical.layout import RunDir

    recipe = bench_recipe(run)  # recipe default teach.backend: dataset
    teach.run(recipe, RunDir.of(recipe), Console(stderr=True))
    rows = read_jsonl(run / "teach" / "templates.jsonl")
    if n > len(rows):
        raise SystemExit(f"--examples {n}: the demo set has {len(rows)} templates")
    rows = random.Random(0).sample(rows, n)
    path = run / "bench-templates.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def plain(run: Path, data_path: Path, gate) -> None:
    """What a user would write with TRL alone (the baseline), with the recipe's values."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from medcritical.artifacts import read_jsonl
    from medcritical.default_model import materialize
    from medcritical.sft import sft_examples

    recipe = bench_recipe(run)
    t, lora = recipe.sft.train, recipe.sft.lora
    path = materialize()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(run / "plain"),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=False,
        max_length=recipe.sft.max_length,
        completion_only_loss=True,
        seed=recipe.seed,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    data = Dataset.from_list(sft_examples(read_jsonl(data_path)))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config, callbacks=[gate]
    )
    trainer.train()


def kit(run: Path, data_path: Path, gate) -> None:
    import shutil

    from rich.console import Console

    from medcritical import sft
    from medcritical.layout import RunDir

    recipe = bench_recipe(run / "kit")
    run_dir = RunDir.of(recipe)
    run_dir.templates.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_path, run_dir.templates)  # the stage reads its templates where teach writes them
    sft.run(recipe, run_dir, Console(stderr=True), callbacks=[gate])


def child(which: str, run: Path, data_path: Path, conn) -> None:
    """One side, in its own process: trains, taking each step when the parent says so."""
    from transformers import TrainerCallback

    from medcritical.runtime import offline_quiet

    offline_quiet()

    class Lockstep(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []  # this process's CPU time: a check on contention
            self.num_tokens: list[int] = []

        def on_step_begin(self, args, state, control, **kw):
            conn.send(("ready", state.global_step))
            conn.recv()  # wait for our turn
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)
            self.cpu_seconds.append(time.process_time() - self.c0)
            conn.send(("done", self.seconds[-1]))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs and "loss" in logs:
                self.num_tokens.append(int(logs["num_tokens"]))

    gate = Lockstep()
    (plain if which == "plain" else kit)(run, data_path, gate)
    cumulative = [0, *gate.num_tokens]
    conn.send(
        (
            "result",
            {
                "steps": len(gate.seconds),
                "step_seconds": [round(s, 3) for s in gate.seconds],
                "step_cpu_seconds": [round(s, 3) for s in gate.cpu_seconds],
                "step_tokens": [b - a for a, b in zip(cumulative, cumulative[1:], strict=False)],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            },
        )
    )


def lockstep(run: Path, data_path: Path, first: str) -> dict:
    """Start both sides, then alternate their steps: first, other, other, first, ..."""
    ctx = mp.get_context("spawn")
    conns, procs = {}, {}
    for which in ("plain", "kit"):
        parent, child_end = ctx.Pipe()
        procs[which] = ctx.Process(target=child, args=(which, run, data_path, child_end), name=f"sft-{which}")
        procs[which].start()
        conns[which] = parent
    results: dict[str, dict] = {}
    other = {"plain": "kit", "kit": "plain"}
    turn, k = first, 0
    try:
        while len(results) < 2:
            if turn not in results:
                tag, value = conns[turn].recv()
                if tag == "result":
                    results[turn] = value
                else:  # "ready": one step
                    conns[turn].send("go")
                    tag, value = conns[turn].recv()
                    assert tag == "done", tag
            k += 1
            turn = turn if k % 2 == 0 else other[turn]  # first, other, other, first, first, ...
    except EOFError:
        raise SystemExit(f"a side died: {[(w, p.exitcode) for w, p in procs.items()]}") from None
    for p in procs.values():
        p.join()
    for r in results.values():
        r["tokens"] = sum(r["step_tokens"])
        r["seconds"] = round(sum(r["step_seconds"]), 2)
        r["tokens_per_second"] = round(r["tokens"] / r["seconds"], 2)
    return results


def bootstrap(results: list[dict], n: int = 2000) -> tuple[float, float, float]:
    """5th, 50th, 95th percentile of the kit/plain tokens/s ratio, resampling steps within each side."""
    rng = random.Random(0)
    pairs = {w: [p for r in results for p in zip(r[w]["step_tokens"], r[w]["step_seconds"])] for w in ("plain", "kit")}
    ratios = []
    for _ in range(n):
        tps = {}
        for w, steps in pairs.items():
            sample = [rng.choice(steps) for _ in steps]
            tps[w] = sum(t for t, _ in sample) / sum(s for _, s in sample)
        ratios.append(tps["kit"] / tps["plain"])
    ratios.sort()
    return ratios[int(0.05 * n)], ratios[n // 2], ratios[int(0.95 * n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=32, help="templates trained (one epoch, batch 4)")
    ap.add_argument("--repeats", type=int, default=1, help="lockstep pairs, the first side alternating")
    ap.add_argument("--out", default="bench/results/sft_step.json")
    a = ap.parse_args()
    from medcritical.runtime import offline_quiet

    offline_quiet()
    t0, load0 = time.time(), os.getloadavg()
    repeats = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = templates(Path(tmp), a.examples)
        for i in range(a.repeats):
            repeats.append(lockstep(Path(tmp) / f"r{i}", data_path, "plain" if i % 2 == 0 else "kit"))
    for r in repeats:
        if r["plain"]["tokens"] != r["kit"]["tokens"]:
            raise SystemExit(f"the sides trained different tokens: {r['plain']['tokens']} vs {r['kit']['tokens']}")
        r["ratio"] = round(r["kit"]["tokens_per_second"] / r["plain"]["tokens_per_second"], 4)
    tps = {w: sum(r[w]["tokens"] for r in repeats) / sum(r[w]["seconds"] for r in repeats) for w in ("plain", "kit")}
    lo, mid, hi = bootstrap(repeats)
    summary = {
        "examples": a.examples,
        "repeats": a.repeats,
        "max_length": MAX_LENGTH,
        "batch_size": 4,
        "tokens_per_second": {w: round(v, 2) for w, v in tps.items()},
        "peak_rss_mb": {w: max(r[w]["peak_rss_mb"] for r in repeats) for w in ("plain", "kit")},
        "speed_ratio_kit_over_plain": round(tps["kit"] / tps["plain"], 4),
        "ratio_per_repeat": [r["ratio"] for r in repeats],
        "ratio_bootstrap_p05_p50_p95": [round(lo, 4), round(mid, 4), round(hi, 4)],
        "cpu_count": os.cpu_count(),
        "loadavg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "wall_seconds": round(time.time() - t0, 1),
        "runs": repeats,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("| side | tokens | step seconds | tokens/s | peak RSS MB |\n|---|---|---|---|---|")
    for w in ("plain", "kit"):
        tok, sec = sum(r[w]["tokens"] for r in repeats), sum(r[w]["seconds"] for r in repeats)
        print(f"| {w} | {tok} | {sec:.1f} | {tps[w]:.1f} | {summary['peak_rss_mb'][w]:.0f} |")
    print(
        f"speed ratio kit/plain: {summary['speed_ratio_kit_over_plain']:.3f} "
        f"(bootstrap 5-95%: {lo:.3f}-{hi:.3f}; per repeat {summary['ratio_per_repeat']}) -> {a.out}"
    )


if __name__ == "__main__":
    main()
