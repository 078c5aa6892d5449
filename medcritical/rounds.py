"""Stage ``rounds``: iterative self-correction DPO.

Round r starts from the policy of round r-1 (round 1 from the SFT adapter) and
runs five steps under ``<run>/rounds/round-r/``, each keyed by what it reads
(:mod:`medcritical.steps`): ``rollouts`` (the policy's adapter hash, the round's
questions, the sampling settings, the round number in the seed), ``corrections``
(the rollouts' hash, the corrector's adapter), ``pairs`` (both logs), ``dpo``
(the pairs' hash, the start adapter, the DPO settings) and ``eval`` (the new
adapter's hash, the dev questions). A change anywhere redoes exactly the steps
downstream of it; a round killed anywhere resumes inside the step it was in.

A round without a preference pair trains nothing: its policy is the previous
one (said in the table); two such rounds in a row end the rounds. With
``early_stop`` a round whose dev accuracy falls below the selected policy's
ends the rounds, and the policy stays the last round that did not regress.
``rounds/rounds.json`` records the table, the selected round and the chain of
adapter hashes from SFT to it; export merges exactly that adapter.

Rollouts, corrections and evaluations sample on the engine
``rounds.rollouts.engine`` names (:mod:`medcritical.policy`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .artifacts import JsonlLog, atomic_write_json, atomic_write_text, model_fingerprint, read_json, sha256_tree
from .data import MCQ, load_recipe_data, records_hash
from .errors import UserError
from .layout import RoundDir, RunDir
from .recipe import Recipe
from .steps import Step, move_aside

PARTS = ("rollouts", "corrections", "pairs", "dpo", "eval")


def round_questions(recipe: Recipe, r: int, console: Console | None = None) -> list[MCQ]:
    """Round r's training questions: ``rollouts.questions`` of them, a different slice each round."""
    train = load_recipe_data(recipe.data, split="train", console=console)
    n = recipe.rounds.rollouts.questions
    if n:
        off = ((r - 1) * n) % max(len(train), 1)
        train = (train[off:] + train[:off])[:n]
    return train


def _engines_used(rows: list[dict]) -> str | None:
    """The engines that generated ``rows`` ("llamacpp", or "llamacpp+transformers" after a switch)."""
    names = sorted({r["engine"] for r in rows if r.get("engine")})
    return "+".join(names) or None


def round_start(run_dir: RunDir, r: int) -> tuple[Path, str]:
    """The policy round ``r`` starts from: SFT's adapter for round 1, else round r-1's policy."""
    if r < 1:
        raise UserError(f"rounds: --round {r}: rounds count from 1")
    if r == 1:
        if not (run_dir.sft_adapter / "adapter_config.json").is_file():
            raise UserError(f"{run_dir.sft_adapter}: no SFT adapter; run the sft stage first")
        return run_dir.sft_adapter, sha256_tree(run_dir.sft_adapter)
    prev = run_dir.round(r - 1).root / "round.json"
    if not prev.is_file():
        raise UserError(f"round {r}: round {r - 1} is not done ({prev} is missing); run it first")
    row = read_json(prev)
    path = run_dir.root / row["adapter"]
    if sha256_tree(path) != row["adapter_hash"]:
        raise UserError(f"round {r}: round {r - 1}'s policy {path} changed since it was made; run round {r - 1} again")
    return path, row["adapter_hash"]


def _step(kind: str, d: Path, material: dict[str, Any], run_dir: RunDir, r: int) -> Step:
    return Step(kind, d, material, stale_root=run_dir.stale, label=f"round {r} {kind}")


def run_round(
    recipe: Recipe,
    run_dir: RunDir,
    r: int,
    start: Path,
    start_hash: str,
    console: Console,
    only: str | None = None,
    start_eval: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One round from the policy ``start``; ``only`` runs a single part (the parts before it must be
    complete for these inputs; the parts after it are left alone). ``start_eval``: the start policy's
    dev evaluation, reused when the round carries the policy over.

    Returns the round's row for the table (also written to ``round-r/round.json``).
    """
    from . import selfplay
    from .default_model import resolve_model
    from .evaluate import eval_policy
    from .policy import LazyPolicy, engine_settings

    rd: RoundDir = run_dir.round(r)
    if only is not None and only not in PARTS:
        raise UserError(f"round {r}: unknown part {only!r}; parts: {', '.join(PARTS)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and only != "dpo":
        raise UserError(
            f"round {r}: under a multi-process launcher only `--only dpo` runs; generate with one process "
            "(docs/multi-gpu.md)"
        )
    questions = round_questions(recipe, r, console)
    seed_and_lang = {"seed": recipe.seed, "round": r, "language": recipe.language}
    base = model_fingerprint(resolve_model(recipe.model.name_or_path))
    engine = engine_settings(recipe)
    row: dict[str, Any] = {"round": r, "questions": len(questions), "start_adapter": start_hash}

    def need(step: Step, part: str) -> bool:
        """Whether ``part`` must run now; with ``only``, an earlier part must already be complete."""
        if only is None or part == only:
            return step.begin(console) != "complete"
        if not step.complete:
            raise UserError(f"round {r}: {part} is not done for these inputs; run it first (--only {part})")
        return False

    def past(part: str) -> bool:
        """With ``only``: ``part`` comes after it, so the round stops here."""
        return only is not None and PARTS.index(part) > PARTS.index(only)

    # 1. rollouts
    ro = _step(
        "rollouts", rd.rollouts,
        {"rollouts": recipe.rounds.rollouts.model_dump(exclude={"questions", "server", "engine"}), "questions": records_hash(questions),
         "policy": start_hash, "base": base, "engine": engine, "eval_n_ctx": recipe.eval.n_ctx, **seed_and_lang},
        run_dir, r,
    )  # fmt: skip
    policy = LazyPolicy(recipe, start, console, start_hash)
    try:
        if need(ro, "rollouts"):
            rolled = selfplay.rollouts(recipe, policy, questions, rd.rollouts_log, console, round_no=r)
            ro.done(_rollout_stats(rolled), outputs=["rollouts.jsonl"], engine=policy.info())
        rolled = JsonlLog(rd.rollouts_log)
        row |= _rollout_stats(rolled) | {"rollout_engine": _engines_used(rolled.values())}

        if past("corrections"):
            return row
        # 2. corrections, by the SFT model or the current policy
        corrector_path = run_dir.sft_adapter if recipe.rounds.correction.by == "sft" else start
        corrector_hash = sha256_tree(corrector_path) if corrector_path != start else start_hash
        co = _step(
            "corrections", rd.corrections,
            {"correction": recipe.rounds.correction.model_dump(), "batch_size": recipe.rounds.rollouts.batch_size,
             "rollouts": ro.output_hash("rollouts.jsonl"), "corrector": corrector_hash, "base": base,
             "engine": engine, "eval_n_ctx": recipe.eval.n_ctx, **seed_and_lang},
            run_dir, r,
        )  # fmt: skip
        if need(co, "corrections"):
            corrector = policy
            if corrector_hash != start_hash:
                policy.close()  # free it before the corrector loads
                corrector = LazyPolicy(recipe, corrector_path, console, corrector_hash)
            corrected = selfplay.corrections(recipe, corrector, questions, rolled, rd.corrections_log, console, r)
            co.done(_correction_stats(corrected), outputs=["corrections.jsonl"], engine=corrector.info())
            corrector.close()
    finally:
        policy.close()
    corrected = JsonlLog(rd.corrections_log)
    row |= _correction_stats(corrected) | {"correction_engine": _engines_used(corrected.values())}

    # 3. pairs
    if past("pairs"):
        return row
    pa = _step(
        "pairs", rd.pairs,
        {"pairs": recipe.rounds.pairs.model_dump(), "rollouts": ro.output_hash("rollouts.jsonl"),
         "corrections": co.output_hash("corrections.jsonl"), "questions": records_hash(questions),
         "tokenizer": start_hash, **seed_and_lang},
        run_dir, r,
    )  # fmt: skip
    if need(pa, "pairs"):
        from .models import load_tokenizer

        pairs, stats = selfplay.build_pairs(recipe, questions, rolled, corrected, load_tokenizer(str(start)))
        selfplay.write_pairs(pairs, rd.pairs_file)
        pa.done(stats, outputs=["pairs.jsonl"])
    row |= {f"pairs_{k}": v for k, v in pa.metrics().items()}

    # 4. dpo (no pairs: the policy carries over unchanged)
    if past("dpo"):
        return row
    adapter, adapter_hash = start, start_hash
    if pa.metrics().get("pairs", 0) == 0:
        row |= {"dpo_steps": 0, "note": "no preference pairs: policy carried over"}
        console.print(f"[yellow]round {r}: no preference pairs; the policy is carried over unchanged[/]")
    else:
        dp = _step(
            "dpo", rd.dpo,
            {"dpo": recipe.rounds.dpo.model_dump(), "max_length": recipe.rounds.pairs.max_length,
             "model": recipe.model.model_dump(), "base": base, "pairs": pa.output_hash("pairs.jsonl"),
             "start": start_hash, "seed": recipe.seed},
            run_dir, r,
        )  # fmt: skip
        if only in (None, "dpo"):
            from .training import main_process_begin

            if main_process_begin(dp, console) != "complete":
                from .dpo import run_dpo

                dm = run_dpo(recipe, rd.pairs_file, start, rd.dpo, console, label=f"dpo round {r}")
                if int(os.environ.get("RANK", "0")) == 0:
                    dp.done(dm, outputs=["adapter"])
                _free_accelerator_memory()  # a served engine starts next, in another process
        elif not dp.complete:
            raise UserError(f"round {r}: dpo is not done for these inputs; run it first (--only dpo)")
        if only == "dpo":
            return row
        row |= {f"dpo_{k}": v for k, v in dp.metrics().items() if k != "resumed_from"}
        adapter, adapter_hash = rd.adapter, dp.output_hash("adapter")

    # 5. eval on the dev split (a carried-over policy keeps the evaluation it had)
    if adapter_hash == start_hash and start_eval is not None:
        ev = start_eval
    else:
        ev = eval_policy(recipe, adapter, rd.eval, console, adapter_hash=adapter_hash, stale_root=run_dir.stale,
                         label=f"round {r}")  # fmt: skip
    row |= {"dev_accuracy": ev["accuracy"], "dev_parse_rate": ev["parse_rate"], "eval_engine": ev["engine"]}
    row |= {"adapter": str(adapter.relative_to(run_dir.root)), "adapter_hash": adapter_hash}
    if only is None:
        atomic_write_json(rd.root / "round.json", row)
    return row


def _prune(run_dir: RunDir, table: list[dict[str, Any]], selected: int) -> None:
    """Keep the merged weights and f16 GGUF of the selected policy's build only (disk: a 7B merge is 15 GB)."""
    from export.build import prune

    prune(run_dir.policies, {next(t for t in table if t["round"] == selected)["adapter_hash"]})


def _free_accelerator_memory() -> None:
    """Give the trained model's GPU memory back before a server (vLLM) starts in another process."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rollout_stats(rolled: JsonlLog) -> dict[str, Any]:
    samples = [s for row in rolled.values() for s in row["samples"]]
    n = max(len(samples), 1)
    return {
        "sample_accuracy": round(sum(s["correct"] for s in samples) / n, 4),
        "sample_parse_rate": round(sum(s["parsed"] is not None for s in samples) / n, 4),
        "sample_committed": round(sum(bool(s.get("committed")) for s in samples) / n, 4),
    }


def _correction_stats(corrected: JsonlLog) -> dict[str, Any]:
    rows = corrected.values()
    return {
        "corrections_tried": len(rows),
        "corrections_verified": sum(c["verified"] for c in rows),
        "corrections_lenient": sum(bool(c.get("verified_lenient")) for c in rows),
    }


def run(recipe: Recipe, run_dir: RunDir, console: Console) -> dict[str, Any]:
    """All rounds, with the SFT policy's dev accuracy as round 0; writes rounds.json/.md/.png."""
    from .evaluate import eval_policy

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "rounds: under a multi-process launcher only `rounds --round N --only dpo` runs; generate with one "
            "process (docs/multi-gpu.md)"
        )
    sft = run_dir.sft_adapter
    if not (sft / "adapter_config.json").is_file():
        raise UserError(f"{sft}: no SFT adapter; run the sft stage first")
    sft_hash = sha256_tree(sft)
    ev = eval_policy(recipe, sft, run_dir.sft_eval, console, adapter_hash=sft_hash, stale_root=run_dir.stale,
                     label="sft")  # fmt: skip
    table: list[dict[str, Any]] = [
        {"round": 0, "dev_accuracy": ev["accuracy"], "dev_parse_rate": ev["parse_rate"], "eval_engine": ev["engine"],
         "adapter": str(sft.relative_to(run_dir.root)), "adapter_hash": sft_hash}
    ]  # fmt: skip
    chain = [{"round": 0, "adapter": str(sft.relative_to(run_dir.root)), "hash": sft_hash}]
    selected, empty_streak, stopped = 0, 0, None
    start, start_hash, start_eval = sft, sft_hash, ev
    for r in range(1, recipe.rounds.num_rounds + 1):
        row = run_round(recipe, run_dir, r, start, start_hash, console, start_eval=start_eval)
        table.append(row)
        if row["adapter_hash"] != start_hash:
            chain.append({"round": r, "adapter": row["adapter"], "hash": row["adapter_hash"]})
        empty_streak = empty_streak + 1 if row.get("pairs_pairs", 0) == 0 else 0
        best = next(t for t in table if t["round"] == selected)
        if recipe.rounds.early_stop and row["dev_accuracy"] < best["dev_accuracy"]:
            stopped = (
                f"round {r}: dev accuracy fell ({best['dev_accuracy']:.1%} -> {row['dev_accuracy']:.1%}); "
                f"round {selected} stays the policy"
            )
            break
        if row["adapter_hash"] != start_hash:
            selected = r
        start, start_hash = run_dir.root / row["adapter"], row["adapter_hash"]
        start_eval = {
            "accuracy": row["dev_accuracy"],
            "parse_rate": row["dev_parse_rate"],
            "engine": row["eval_engine"],
        }
        _prune(run_dir, table, selected)
        if empty_streak >= 2:
            stopped = f"rounds {r - 1} and {r} made no preference pair; stopping"
            break
    _prune(run_dir, table, selected)
    if stopped:
        console.print(f"[yellow]{stopped}[/]")
    last = table[-1]["round"]
    for rd in run_dir.round_dirs():  # rounds an earlier run went further with: not this run's, out of the way
        if rd.number > last:
            dest = move_aside(rd.root, run_dir.stale, f"This run's rounds ended at round {last}.")
            console.print(f"[dim]round {rd.number}: left from an earlier run; moved to {dest}[/]")
    chain = [c for c in chain if c["round"] <= selected]
    result = {"rounds": table, "selected": selected, "chain": chain, "stopped": stopped}
    write_round_report(result, run_dir, console)
    return {"rounds": table, "selected": selected, "stopped": stopped}


COLUMNS = (
    "round",
    "dev_accuracy",
    "dev_parse_rate",
    "sample_accuracy",
    "sample_committed",
    "corrections_tried",
    "corrections_verified",
    "pairs_pairs",
    "dpo_steps",
    "dpo_reward_margin_last",
    "rollout_engine",
)


def write_round_report(result: dict[str, Any], run_dir: RunDir, console: Console) -> None:
    table, selected = result["rounds"], result["selected"]
    atomic_write_json(run_dir.rounds_json, result)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    t = Table(title=f"self-correction rounds (policy: round {selected})", title_justify="left")
    for c in COLUMNS:
        t.add_column(c.replace("_", " "), justify="right")
    for row in table:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in COLUMNS]
        cells[0] += " *" if row["round"] == selected else ""
        lines.append("| " + " | ".join(cells) + " |")
        t.add_row(*cells)
    notes = [f"round {row['round']}: {row['note']}" for row in table if row.get("note")]
    lines += ["", f"Policy: round {selected} (*)."] + ([result["stopped"]] if result["stopped"] else []) + notes
    atomic_write_text(run_dir.rounds / "rounds.md", "\n".join(lines) + "\n")
    console.print(t)
    for n in notes:
        console.print(f"[dim]{n}[/]")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [row["round"] for row in table]
    ax.plot(xs, [row["dev_accuracy"] for row in table], marker="o", label="dev accuracy")
    ax.plot(xs, [row.get("dev_parse_rate") for row in table], marker="s", label="dev parse rate")
    ax.axvline(selected, color="gray", linestyle=":", label=f"policy (round {selected})")
    ax.set_xlabel("round (0 = SFT)")
    ax.set_ylim(0, 1)
    ax.set_xticks(xs)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = run_dir.rounds / ".rounds.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(run_dir.rounds / "rounds.png")
