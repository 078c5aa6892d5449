"""Does the loop learn? Each stage of a finished run evaluated on held-out questions, with intervals.

    .venv/bin/python bench/method.py                                   # the demo recipe, as shipped
    .venv/bin/python bench/method.py --scale 4 --out bench/measured/method-x4.json   # larger (hours)

It runs ``medcritical run RECIPE`` (every step content-keyed: a finished run is reused as it is), then
evaluates every stage's policy (the untrained base, SFT = round 0, each round that trained) on:

* the recipe's dev split, generation mode (the run's own evaluations, reused) and log-likelihood mode
  (the option letters scored right after the question; no reasoning);
* ``--heldout N`` (300) fresh generated questions of the run's skills (another seed; any stem the run saw
  is left out), both modes;
* the bundled real-exam demo questions in English (50, never trained on), both modes: the honest check
  that a 135M student stays at chance on real medicine;
* with ``--cmexam N``: N questions of CMExam's validation split (``../shared/data/cmexam/val-dev.csv``),
  log-likelihood mode. Only meaningful for a student that reads Chinese (SmolLM2 does not).

For each evaluation: accuracy with a 95% Wilson interval; between consecutive stages, on the same
questions, the paired difference with a 95% bootstrap interval and McNemar's exact p-value. The table goes
to ``--out`` (JSON) and stdout (Markdown). ``--scale K`` multiplies the SFT steps and the questions per
round by K (the rest of the recipe as it is).
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from medcritical.artifacts import JsonlLog, atomic_write_json, read_json  # noqa: E402
from medcritical.benchmarks import wilson  # noqa: E402
from medcritical.data import load_recipe_data, skill_questions, write_jsonl  # noqa: E402
from medcritical.evaluate import eval_policy  # noqa: E402
from medcritical.layout import RunDir  # noqa: E402
from medcritical.recipe import load_recipe  # noqa: E402
from medcritical.skills import SKILLS  # noqa: E402

CMEXAM = ROOT.parent / "shared" / "data" / "cmexam" / "val-dev.csv"


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the discordant counts (right->wrong, wrong->right)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return round(min(1.0, 2 * tail), 4)


def paired(before: dict[str, bool], after: dict[str, bool], reps: int = 2000, seed: int = 0) -> dict:
    """Accuracy difference (after - before) on the questions both answered, bootstrap interval, McNemar."""
    ids = sorted(set(before) & set(after))
    diffs = [int(after[i]) - int(before[i]) for i in ids]
    rng = random.Random(seed)
    boots = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(reps)) if diffs else []
    b = sum(before[i] and not after[i] for i in ids)
    c = sum(after[i] and not before[i] for i in ids)
    return {
        "n": len(ids),
        "diff": round(sum(diffs) / len(diffs), 4) if diffs else None,
        "ci95": [round(boots[int(0.025 * reps)], 4), round(boots[int(0.975 * reps) - 1], 4)] if boots else None,
        "right_to_wrong": b,
        "wrong_to_right": c,
        "mcnemar_p": mcnemar_p(b, c),
    }


def stages(run: RunDir) -> list[tuple[str, Path | None, str | None]]:
    """(name, adapter, hash) of the base, SFT and each round that trained a new policy."""
    table = read_json(run.rounds_json)["rounds"]
    out: list[tuple[str, Path | None, str | None]] = [("base", None, None)]
    seen: set[str] = set()
    for row in table:
        if row["adapter_hash"] in seen:
            continue  # a round without pairs carried its policy over: the same model
        seen.add(row["adapter_hash"])
        out.append(
            ("sft" if row["round"] == 0 else f"round {row['round']}", run.root / row["adapter"], row["adapter_hash"])
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "demo-cpu.yaml"))
    ap.add_argument("--scale", type=int, default=1, help="multiply SFT steps and questions per round")
    ap.add_argument("--cmexam", type=int, default=0, help="also N CMExam validation questions (loglik)")
    ap.add_argument("--heldout", type=int, default=300, help="fresh generated questions of the run's skills")
    ap.add_argument("--out", default=str(ROOT / "bench" / "measured" / "method-demo.json"))
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key.sub=value")
    args = ap.parse_args()
    console = Console(stderr=True, width=160)

    base_recipe = load_recipe(args.recipe)
    overrides = list(args.overrides)
    if args.scale > 1:
        steps = base_recipe.sft.train.max_steps
        q = base_recipe.rounds.rollouts.questions
        overrides += [f"output_dir={base_recipe.output_dir}-x{args.scale}"]
        overrides += [f"sft.train.max_steps={steps * args.scale}"] if steps > 0 else []
        overrides += [f"rounds.rollouts.questions={q * args.scale}"] if q else []
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "medcritical", "run", args.recipe, *overrides], check=True, cwd=ROOT)
    run_wall = time.time() - t0
    recipe = load_recipe(args.recipe, overrides)
    run = RunDir.of(recipe)
    exam = {"sources": [{"path": "demo", "lang": "en"}], "dev": 0.0, "test": 0.0}
    sets = {"dev": (recipe.data.model_dump(), "dev", recipe.eval.max_new_tokens)}
    if args.heldout:  # fresh generated questions (another seed), none with a stem the run saw
        seen = {q.question for q in load_recipe_data(recipe.data)}
        kinds = tuple(recipe.data.sources[0].path.partition(":")[2].split(",")) or SKILLS
        fresh = [q for q in skill_questions(args.heldout + 200, seed=1, skills=kinds) if q.question not in seen]
        path = run.root / "method" / "heldout.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(fresh[: args.heldout], path)
        sets["heldout"] = ({"sources": [{"path": str(path)}], "dev": 0.0, "test": 0.0}, "all",
                           recipe.eval.max_new_tokens)  # fmt: skip
    sets["exam-en"] = (exam, "all", 256)
    if args.cmexam:
        if not CMEXAM.is_file():
            raise SystemExit(f"{CMEXAM}: not found (the CMExam validation file beside the project)")
        sets["cmexam"] = ({"sources": [{"path": str(CMEXAM), "limit": args.cmexam}], "dev": 0.0, "test": 0.0},
                          "all", 256)  # fmt: skip
    results: dict = {"recipe": args.recipe, "overrides": overrides, "run": str(run.root), "evals": {}}
    for set_name, (data, split, cap) in sets.items():
        for mode in ("generate", "loglik"):
            if set_name == "cmexam" and mode == "generate":
                continue
            rows = results["evals"].setdefault(f"{set_name}/{mode}", [])
            for name, adapter, h in stages(run):
                r = recipe.model_copy(deep=True)
                r.data = type(r.data).model_validate(data)
                r.eval = r.eval.model_copy(update={"split": split, "mode": mode, "max_new_tokens": cap})
                if set_name == "dev" and mode == "generate":  # the run's own evaluations (same keys: reused)
                    out = run.base_eval if adapter is None else (run.sft_eval if name == "sft" else
                                                                 run.round(int(name.split()[1])).eval)  # fmt: skip
                else:
                    out = run.root / "method" / set_name / mode / name.replace(" ", "-")
                s = eval_policy(r, adapter, out, console, adapter_hash=h, label=f"{set_name} {mode} {name}")
                correct = {row["id"]: row["correct"] for row in JsonlLog(out / "predictions.jsonl").values()}
                k = sum(correct.values())
                rows.append({"stage": name, "n": len(correct), "accuracy": s["accuracy"],
                             "ci95": wilson(k, len(correct)), "parse_rate": s["parse_rate"], "_correct": correct})  # fmt: skip
            for a, b in zip(rows, rows[1:]):
                b["vs_previous"] = paired(a["_correct"], b["_correct"])
            for row in rows:
                row.pop("_correct")
            atomic_write_json(Path(args.out), results)  # after each evaluation set: a long run keeps what it has
    results["rounds"] = read_json(run.rounds_json)["rounds"]
    results["run_wall_s"] = round(run_wall)
    atomic_write_json(Path(args.out), results)
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [
        "| set / mode | stage | n | accuracy | 95% CI | vs previous (diff, 95% CI, McNemar p) |",
        "|---|---|---:|---:|---|---|",
    ]
    for key, rows in results["evals"].items():
        for row in rows:
            v = row.get("vs_previous")
            vs = f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}], p={v['mcnemar_p']}" if v else "-"
            lo, hi = row["ci95"]
            lines.append(
                f"| {key} | {row['stage']} | {row['n']} | {row['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {vs} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
