"""Stage ``rounds``: iterative self-correction DPO.

Round r starts from the policy of round r-1 (round 1 from the SFT adapter) and
runs five steps under ``<run>/rounds/round-r/``, each keyed by what it reads
(:mod:`medcritical.steps`): ``rollouts`` (the policy's adapter hash, the round's
questions, the sampling settings, the round number in the seed), ``corrections``
(the rollouts' hash, the corrector's adapter), ``pairs`` (both logs), ``dpo``
(the pairs' hash, the start adapter, the DPO settings, the training libraries,
backend, dtype and world size) and ``eval`` (the new adapter's hash, the dev
questions); the generating and grading ones also by the engine with its library
versions, the prompts in each language and the grader's version. A change
anywhere redoes exactly the steps downstream of it; a round killed anywhere
resumes inside the step it was in. ``--round r`` reads rounds before r only when
they are complete for the recipe given (:func:`round_start`).

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
from .grading import GRADER_VERSION
from .layout import RoundDir, RunDir
from .prompts import prompt_wording
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


def round_start(recipe: Recipe, run_dir: RunDir, r: int, console: Console) -> tuple[Path, str]:
    """The policy round ``r`` starts from: SFT's adapter for round 1, else round r-1's policy.

    What it comes from must be complete for this recipe: the SFT step, and every round before ``r`` up to its
    policy (its dpo part), so a round never starts from a policy made with other settings.
    """
    if r < 1:
        raise UserError(f"rounds: --round {r}: rounds count from 1")
    start, start_hash = _sft_start(recipe, run_dir, console)
    for k in range(1, r):
        try:
            row = run_round(recipe, run_dir, k, start, start_hash, console, only="dpo", check=True)
        except UserError as e:
            raise UserError(f"round {r} starts from round {k}'s policy: {e}; run round {k} first") from None
        start, start_hash = run_dir.root / row["adapter"], row["adapter_hash"]
    if sha256_tree(start) != start_hash:
        raise UserError(f"round {r}: round {r - 1}'s policy {start} changed since it was made; run round {r - 1} again")
    return start, start_hash


def _sft_start(recipe: Recipe, run_dir: RunDir, console: Console) -> tuple[Path, str]:
    """The SFT adapter and its hash, refused unless the SFT step is complete for this recipe."""
    from .sft import check as check_sft

    try:
        check_sft(recipe, run_dir, console)
    except UserError as e:
        raise UserError(f"rounds: {e}; run the sft stage first") from None
    return run_dir.sft_adapter, sha256_tree(run_dir.sft_adapter)


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
    check: bool = False,
) -> dict[str, Any]:
    """One round from the policy ``start``; ``only`` runs a single part (the parts before it must be
    complete for these inputs; the parts after it are left alone). ``start_eval``: the start policy's
    dev evaluation, reused when the round carries the policy over. ``check``: run and write nothing;
    every part (up to ``only``) must be complete for these inputs.

    Returns the round's row for the table (also written to ``round-r/round.json`` once the round's
    last part is complete).
    """
    from .models import import_unsloth_first

    import_unsloth_first(recipe.model)  # before anything imports transformers or trl
    from . import selfplay
    from .default_model import resolve_model
    from .evaluate import engine_material, eval_policy
    from .policy import LazyPolicy
    from .training import stack, training_step

    rd: RoundDir = run_dir.round(r)
    if only is not None and only not in PARTS:
        raise UserError(f"round {r}: unknown part {only!r}; parts: {', '.join(PARTS)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and only != "dpo":
        raise UserError(
            f"round {r}: under a multi-process launcher only `--only dpo` runs; generate with one process "
            "(docs/multi-gpu.md)"
        )
    questions = round_questions(recipe, r, console)
    # what the generating and grading parts share: seeds, the student's prompts, the grader
    shared = {"seed": recipe.seed, "round": r, "language": recipe.language, "grader": GRADER_VERSION,
              "prompts": prompt_wording(questions, recipe.language), "force_answer": recipe.rounds.force_answer}  # fmt: skip
    base = model_fingerprint(resolve_model(recipe.model.name_or_path))
    engine = engine_material(recipe)
    row: dict[str, Any] = {"round": r, "questions": len(questions), "start_adapter": start_hash}

    def need(step: Step, part: str) -> bool:
        """Whether ``part`` must run now; with ``only``, an earlier part must already be complete."""
        if not check and (only is None or part == only):
            return step.begin(console) != "complete"
        step.require("" if check else f"run it first (--only {part})")
        return False

    def past(part: str) -> bool:
        """With ``only``: ``part`` comes after it, so the round stops here."""
        return only is not None and PARTS.index(part) > PARTS.index(only)

    # 1. rollouts
    ro = _step(
        "rollouts", rd.rollouts,
        {"rollouts": recipe.rounds.rollouts.model_dump(exclude={"questions", "server", "engine"}), "questions": records_hash(questions),
         "policy": start_hash, "base": base, "engine": engine, "eval_n_ctx": recipe.eval.n_ctx, **shared},
        run_dir, r,
    )  # fmt: skip
    policy = LazyPolicy(recipe, start, console, start_hash)
    try:
        if need(ro, "rollouts"):
            rolled = selfplay.rollouts(recipe, policy, questions, rd.rollouts_log, console, round_no=r)
            ro.done(_rollout_stats(rolled, questions), outputs=["rollouts.jsonl"], engine=policy.info())
        rolled = JsonlLog(rd.rollouts_log)
        row |= _rollout_stats(rolled, questions) | {"rollout_engine": _engines_used(rolled.values())}

        if past("corrections"):
            return row
        # 2. corrections, by the SFT model or the current policy
        corrector_path = run_dir.sft_adapter if recipe.rounds.correction.by == "sft" else start
        corrector_hash = sha256_tree(corrector_path) if corrector_path != start else start_hash
        co = _step(
            "corrections", rd.corrections,
            {"correction": recipe.rounds.correction.model_dump(), "batch_size": recipe.rounds.rollouts.batch_size,
             "rollouts": ro.output_hash("rollouts.jsonl"), "corrector": corrector_hash, "base": base,
             "engine": engine, "eval_n_ctx": recipe.eval.n_ctx, **shared},
            run_dir, r,
        )  # fmt: skip
        if need(co, "corrections"):
            corrector = policy
            if corrector_hash != start_hash:
                policy.close()  # free it before the corrector loads
                # the SFT corrector's q8_0 is kept from round 1 on: it is never merged or converted again
                corrector = LazyPolicy(recipe, corrector_path, console, corrector_hash, keep_intermediate=False)
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
         "tokenizer": start_hash, **shared},
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
        if not check:
            console.print(f"[yellow]round {r}: no preference pairs; the policy is carried over unchanged[/]")
    else:
        train = not check and only in (None, "dpo")
        dp = training_step(
            "dpo", rd.dpo,
            {"dpo": recipe.rounds.dpo.model_dump(), "max_length": recipe.rounds.pairs.max_length,
             "model": recipe.model.model_dump(include={"load_in_4bit", "max_seq_length"}),
             "stack": stack(recipe.model, "trl", "accelerate"), "base": base, "pairs": pa.output_hash("pairs.jsonl"),
             "start": start_hash, "seed": recipe.seed},
            train=train, stale_root=run_dir.stale, label=f"round {r} dpo",
        )  # fmt: skip
        if train:
            from .training import main_process_begin

            if main_process_begin(dp, console) != "complete":
                from .dpo import run_dpo

                dm = run_dpo(recipe, rd.pairs_file, start, rd.dpo, console, label=f"dpo round {r}")
                if int(os.environ.get("RANK", "0")) == 0:
                    dp.done(dm, outputs=["adapter"])
                _free_accelerator_memory()  # a served engine starts next, in another process
        else:
            dp.require("" if check else "run it first (--only dpo)")
        row |= {f"dpo_{k}": v for k, v in dp.metrics().items() if k != "resumed_from"}
        adapter, adapter_hash = rd.adapter, dp.output_hash("adapter")
    row |= {"adapter": str(adapter.relative_to(run_dir.root)), "adapter_hash": adapter_hash}
    if only == "dpo":
        return row

    # 5. eval on the dev split (a carried-over policy keeps the evaluation it had)
    if adapter_hash == start_hash and start_eval is not None:
        ev = start_eval
    else:
        ev = eval_policy(recipe, adapter, rd.eval, console, adapter_hash=adapter_hash, stale_root=run_dir.stale,
                         label=f"round {r}", check=check)  # fmt: skip
    row |= {"dev_accuracy": ev["accuracy"], "dev_parse_rate": ev["parse_rate"], "eval_engine": ev["engine"]}
    if not check:  # every part is complete here, however the round was run (`--only eval` last, or at once)
        atomic_write_json(rd.root / "round.json", row)
    return row


def _prune(run_dir: RunDir, table: list[dict[str, Any]], selected: int) -> None:
    """Keep the merged weights and f16 GGUF of the selected policy's build only (disk: a 7B merge is 15 GB)."""
    from .gguf.build import prune

    prune(run_dir.policies, {next(t for t in table if t["round"] == selected)["adapter_hash"]})


def _free_accelerator_memory() -> None:
    """Give the trained model's GPU memory back before a server (vLLM) starts in another process."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _answer_stats(samples: list[dict], prefix: str) -> dict[str, Any]:
    """How the samples' answers were reached: stated, forced (and how often forced ones were right), cut."""
    forced = [s for s in samples if s.get("answered") == "forced"]
    n = len(samples)
    return {
        f"{prefix}_stated": _share(sum(s.get("answered", "stated") == "stated" for s in samples), n),
        f"{prefix}_forced": _share(len(forced), n),
        f"{prefix}_forced_accuracy": _share(sum(s["correct"] for s in forced), len(forced)),
        f"{prefix}_cut": sum(bool(s.get("cut")) for s in samples),
    }


def _rollout_stats(rolled: JsonlLog, questions: list[MCQ]) -> dict[str, Any]:
    samples = [s for row in rolled.values() for s in row["samples"]]
    n = max(len(samples), 1)
    # what a uniform guess scores: 1/options for single answers, 1/(subsets of two or more) for multi
    chance = [1 / len(q.options) if not q.multi else 1 / (2 ** len(q.options) - len(q.options) - 1) for q in questions]
    return {
        "sample_accuracy": round(sum(s["correct"] for s in samples) / n, 4),
        "sample_parse_rate": round(sum(s["parsed"] is not None for s in samples) / n, 4),
        "sample_committed": round(sum(bool(s.get("committed")) for s in samples) / n, 4),
        "chance": _share(round(sum(chance), 4), len(chance)) if chance else None,
    } | _answer_stats(samples, "sample")


def _correction_stats(corrected: JsonlLog) -> dict[str, Any]:
    rows = corrected.values()
    return {
        "corrections_tried": len(rows),
        "corrections_verified": sum(c["verified"] for c in rows),
        "corrections_lenient": sum(bool(c.get("verified_lenient")) for c in rows),
        "corrections_unstated": sum(not c.get("stated", True) for c in rows),
    } | _answer_stats([a for c in rows for a in c["attempts"]], "correction")


def run(recipe: Recipe, run_dir: RunDir, console: Console, check: bool = False) -> dict[str, Any]:
    """All rounds, with the SFT policy's dev accuracy as round 0; writes rounds.json/.md/.png.

    ``check``: run and write nothing; every round's steps must be complete for this recipe and
    rounds.json must record the policy they select (UserError otherwise).
    """
    from .models import import_unsloth_first

    import_unsloth_first(recipe.model)  # before anything imports transformers or trl
    from .evaluate import eval_policy

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "rounds: under a multi-process launcher only `rounds --round N --only dpo` runs; generate with one "
            "process (docs/multi-gpu.md)"
        )
    sft, sft_hash = _sft_start(recipe, run_dir, console)
    ev = eval_policy(recipe, sft, run_dir.sft_eval, console, adapter_hash=sft_hash, stale_root=run_dir.stale,
                     label="sft", check=check)  # fmt: skip
    table: list[dict[str, Any]] = [
        {"round": 0, "dev_accuracy": ev["accuracy"], "dev_parse_rate": ev["parse_rate"], "eval_engine": ev["engine"],
         "adapter": str(sft.relative_to(run_dir.root)), "adapter_hash": sft_hash}
    ]  # fmt: skip
    chain = [{"round": 0, "adapter": str(sft.relative_to(run_dir.root)), "hash": sft_hash}]
    selected, empty_streak, stopped = 0, 0, None
    start, start_hash, start_eval = sft, sft_hash, ev
    for r in range(1, recipe.rounds.num_rounds + 1):
        row = run_round(recipe, run_dir, r, start, start_hash, console, start_eval=start_eval, check=check)
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
        if not check:
            _prune(run_dir, table, selected)
        if empty_streak >= 2:
            stopped = f"rounds {r - 1} and {r} made no preference pair; stopping"
            break
    chain = [c for c in chain if c["round"] <= selected]
    if check:
        recorded = read_json(run_dir.rounds_json) if run_dir.rounds_json.is_file() else {}
        if (recorded.get("selected"), recorded.get("chain")) != (selected, chain):
            raise UserError(f"{run_dir.rounds_json}: does not record the policy these rounds select")
        return {"rounds": table, "selected": selected, "stopped": stopped}
    _prune(run_dir, table, selected)
    if stopped:
        console.print(f"[yellow]{stopped}[/]")
    last = table[-1]["round"]
    for rd in run_dir.round_dirs():  # rounds an earlier run went further with: not this run's, out of the way
        if rd.number > last:
            dest = move_aside(rd.root, run_dir.stale, f"This run's rounds ended at round {last}.")
            console.print(f"[dim]round {rd.number}: left from an earlier run; moved to {dest}[/]")
    result = {"rounds": table, "selected": selected, "chain": chain, "stopped": stopped}
    write_round_report(result, run_dir, console)
    return {"rounds": table, "selected": selected, "stopped": stopped}


def check(recipe: Recipe, run_dir: RunDir, console: Console) -> None:
    """Refuse unless every round is complete for this recipe (see :func:`run`)."""
    run(recipe, run_dir, console, check=True)


COLUMNS = (
    "round",
    "dev_accuracy",
    "dev_parse_rate",
    "sample_accuracy",
    "chance",
    "sample_forced",
    "sample_forced_accuracy",
    "sample_committed",
    "corrections_tried",
    "corrections_verified",
    "pairs_pairs",
    "pairs_correction",
    "pairs_self-consistency",
    "dpo_steps",
    "dpo_loss_last",
    "dpo_reward_margin_last",
    "rollout_engine",
)


def write_round_report(result: dict[str, Any], run_dir: RunDir, console: Console) -> None:
    table, selected = result["rounds"], result["selected"]
    atomic_write_json(run_dir.rounds_json, result)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    t = Table(title=f"self-correction rounds (policy: round {selected})", title_justify="left")
    for c in COLUMNS:
        t.add_column(c.replace("_", " "), justify="right", overflow="fold")  # never cut in a log
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
