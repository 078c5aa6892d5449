"""Evaluation: accuracy of a model on multiple-choice questions, and the ``eval`` stage.

:func:`evaluate` writes ``predictions.jsonl`` (one row per question: prompt, raw
output, parsed answer, correct) as it goes, so an interrupted evaluation resumes
where it stopped, then ``summary.json``. Every evaluation is a step
(:mod:`medcritical.steps`) keyed by the questions, the generation settings, the
prompts, the grader's version and the model (base fingerprint, adapter hash or
GGUF hash, engine with its library versions): a changed data split, adapter or
setting evaluates afresh, never mixes rows.

:func:`eval_policy` evaluates a policy (base + adapter, or an exported GGUF) as
the rounds and the stage do; :func:`run` is the ``eval`` stage: the untrained
base and every exported quant on the dev split, with each quant's free-running
answers compared with the merged model's (from the export's parity report).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .artifacts import JsonlLog, atomic_write_json, model_fingerprint, read_json, sha256_file
from .data import MCQ, eval_records, records_hash
from .engines import Engine
from .errors import UserError
from .grading import GRADER_VERSION, extract_answer, grade
from .prompts import HEADINGS, choose_lang, prompt_wording, question_messages
from .runtime import Ticker
from .steps import Step, derive_seed, pending_chunks


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """Accuracy overall and for single- vs multi-answer questions, and parse rate."""

    def acc(sel: list[dict]) -> float | None:
        return round(sum(r["correct"] for r in sel) / len(sel), 4) if sel else None

    single = [r for r in rows if not r["multi"]]
    multi = [r for r in rows if r["multi"]]
    parsed = sum(r["parsed"] is not None for r in rows)
    return {
        "n": len(rows),
        "accuracy": acc(list(rows)),
        "accuracy_single": acc(single),
        "accuracy_multi": acc(multi),
        "n_single": len(single),
        "n_multi": len(multi),
        "parse_rate": round(parsed / len(rows), 4) if rows else None,
        "parse_failure_rate": round(1 - parsed / len(rows), 4) if rows else None,
    }


def pick_from_logprobs(scores: dict[str, float], multi: bool) -> set[str]:
    """Single answer: the most likely letter. Multi-answer: every letter at least
    as likely as uniform over the options (at least two), since the question says
    two or more are correct."""
    best = sorted(scores, key=scores.get, reverse=True)
    if not multi:
        return {best[0]}
    z = max(scores.values())
    probs = {k: math.exp(v - z) for k, v in scores.items()}
    total = sum(probs.values())
    chosen = {k for k in best if probs[k] / total >= 1 / len(scores)}
    return chosen if len(chosen) >= 2 else set(best[:2])


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def evaluate(
    records: Sequence[MCQ],
    engine: Engine,
    out_dir: str | Path,
    *,
    mode: str = "generate",
    max_new_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    language: str = "auto",
    seed: int = 0,
    console: Console | None = None,
    label: str = "eval",
) -> dict[str, Any]:
    """Evaluate ``engine`` on ``records`` into ``out_dir``; returns the summary (also written).

    Whether the rows already in ``out_dir`` belong to this evaluation is the
    caller's step's business (:func:`eval_step`); this only resumes them.
    """
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    log = JsonlLog(out_dir / "predictions.jsonl")
    if log.torn:
        console.print(f"[yellow]{log.path}: dropped a torn last line from an interrupted run")
    ids = [r.id for r in records]
    chunks = list(pending_chunks(ids, batch_size, set(log.rows)))
    t0 = time.perf_counter()
    new = 0
    tick = Ticker(console, label)
    with _progress(console) as prog:
        task = prog.add_task(label, total=len(records), completed=0, stats="")

        def update() -> None:
            rows = [log.rows[i] for i in ids if i in log]
            s = summarize(rows)
            stats = f"acc {s['accuracy']:.1%}  parsed {s['parse_rate']:.0%}" if rows else ""
            prog.update(task, completed=len(rows), stats=stats)
            tick(len(rows), len(records), stats)

        update()
        for c, positions in chunks:
            chunk = [records[i] for i in positions]
            langs = [choose_lang(r.question, language) for r in chunk]
            msgs = [question_messages(r.question, r.options, r.multi, lg) for r, lg in zip(chunk, langs)]
            if mode == "loglik":
                prefixes = [HEADINGS[lg][2] for lg in langs]
                scores = engine.letter_logprobs(msgs, prefixes, [list(r.options) for r in chunk])
                outputs = [
                    prefixes[i] + "".join(sorted(pick_from_logprobs(s, r.multi)))
                    for i, (s, r) in enumerate(zip(scores, chunk))
                ]
            else:
                outputs = [
                    o[0]
                    for o in engine.generate(
                        msgs,
                        max_new_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                        seed=derive_seed(seed, "eval", c),
                        batch_size=batch_size,
                    )
                ]
            for r, m, out in zip(chunk, msgs, outputs):
                if r.id in log:
                    continue
                parsed = extract_answer(out, r.options.keys())
                log.append(
                    {
                        "id": r.id,
                        "multi": r.multi,
                        "prompt": engine.render(m),
                        "output": out,
                        "parsed": sorted(parsed) if parsed is not None else None,
                        "gold": list(r.answer),
                        "correct": grade(parsed, r.answer),
                    }
                )
                new += 1
            update()
    rows = [log.rows[r.id] for r in records]
    seconds = time.perf_counter() - t0
    summary = summarize(rows) | {
        "mode": mode,
        "engine": engine.name,
        "seconds": round(seconds, 2),
        "questions_per_second": round(new / max(seconds, 1e-9), 3),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def eval_step(
    out_dir: Path, material: dict[str, Any], stale_root: Path | None = None, label: str | None = None
) -> Step:
    """The step of an evaluation into ``out_dir`` keyed by ``material`` (questions, settings, model)."""
    return Step("eval", out_dir, material, stale_root=stale_root, label=label)


def print_summary(summary: dict[str, Any], title: str, console: Console) -> None:
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    t = Table(title=title, title_justify="left")
    for col in ("questions", "accuracy", "single", "multi", "parsed", "q/s"):
        t.add_column(col, justify="right")
    t.add_row(
        str(summary["n"]),
        pct(summary["accuracy"]),
        f"{pct(summary['accuracy_single'])} (n={summary['n_single']})",
        f"{pct(summary['accuracy_multi'])} (n={summary['n_multi']})",
        pct(summary["parse_rate"]),
        str(summary.get("questions_per_second", "-")),
    )
    console.print(t)


# ---- policies and the eval stage ------------------------------------------------------------------


def engine_material(recipe: Any) -> dict[str, Any]:
    """What the policy engine contributes to the key of a step it generates for: its settings
    (:func:`medcritical.policy.engine_settings`) and what makes its numbers on this machine: the transformers
    engine's resolved backend, dtype and libraries, the versions that build and run a policy's GGUF on
    llama.cpp, or vLLM's version in its venv."""
    from .policy import engine_settings

    settings = engine_settings(recipe)
    kind = settings["engine"]
    if kind == "transformers":
        from .training import stack

        return settings | stack(recipe.model)
    if kind in ("llamacpp", "llamacpp-server"):
        from .gguf.build import build_libraries

        return settings | {"libraries": build_libraries()}
    if kind == "vllm":
        from .serving.vllm import vllm_venv

        found = sorted((vllm_venv() / "lib").glob("python3*/site-packages/vllm*-*.dist-info"))
        return settings | {"vllm": found[-1].name.removesuffix(".dist-info") if found else None}
    return settings  # a server of your own: its settings are all that is known of it


def policy_material(
    recipe: Any, records: Sequence[MCQ], *, adapter_hash: str | None = None, gguf_hash: str | None = None
) -> dict[str, Any]:
    """The key of a policy's evaluation: questions, generation settings, prompts, grader and what generates."""
    from .default_model import resolve_model
    from .steps import library_versions

    m: dict[str, Any] = {
        "questions": records_hash(records),
        "eval": recipe.eval.model_dump(),
        "language": recipe.language,
        "seed": recipe.seed,
        "prompts": prompt_wording(records, recipe.language),
        "grader": GRADER_VERSION,
    }
    if gguf_hash is not None:
        return m | {"gguf": gguf_hash, "engine": "llamacpp", "n_ctx": recipe.eval.n_ctx,
                    "libraries": library_versions("llama_cpp_python")}  # fmt: skip
    base = model_fingerprint(resolve_model(recipe.model.name_or_path))
    return m | {"base": base, "adapter": adapter_hash} | engine_material(recipe)


def eval_policy(
    recipe: Any,
    adapter: Path | None,
    out: Path,
    console: Console,
    *,
    adapter_hash: str | None = None,
    gguf: Path | None = None,
    gguf_hash: str | None = None,
    stale_root: Path | None = None,
    label: str | None = None,
    check: bool = False,
) -> dict[str, Any]:
    """``recipe.eval``'s accuracy of base + ``adapter`` (None: the untrained base) on its engine
    (:mod:`medcritical.policy`), or of ``gguf`` on llama.cpp; a step in ``out``.

    Returns ``summary.json``'s content (accuracy, parse_rate, engine, ...). ``check``: evaluate
    nothing; the step must be complete for these inputs (UserError otherwise).
    """
    from .artifacts import sha256_tree
    from .policy import open_policy

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    records = eval_records(recipe)
    if gguf is not None:
        material = policy_material(recipe, records, gguf_hash=gguf_hash or sha256_file(gguf))
    else:
        adapter_hash = adapter_hash or (sha256_tree(adapter) if adapter is not None else None)
        material = policy_material(recipe, records, adapter_hash=adapter_hash)
    name = label or (gguf.name if gguf is not None else "base" if adapter is None else str(adapter))
    step = eval_step(out, material, stale_root, label=f"eval {name}")
    if check:
        step.require()
    if check or step.begin(console) == "complete":
        return read_json(out / "summary.json")
    engine = open_policy(recipe, adapter, console, gguf=gguf, adapter_hash=adapter_hash)
    ev = recipe.eval
    try:
        res = evaluate(
            records, engine, out, mode=ev.mode, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
            top_p=ev.top_p, batch_size=ev.batch_size, language=recipe.language, seed=recipe.seed,
            console=console, label=f"eval {name}",
        )  # fmt: skip
        used = getattr(engine, "gguf", None)
    finally:
        engine.close()
    step.done(res, outputs=["predictions.jsonl"], gguf=str(used) if used else None)
    return res


def agreement(predictions: Path, reference: dict[str, list[str] | None]) -> dict[str, Any]:
    """Free-running answers of an exported quant against the merged model's (``reference``: id -> answer),
    on the questions both answered greedily (the export's parity questions).

    Only questions where both gave an answer count towards ``answer_agreement``
    (two unparsable replies are not agreement); parse rates and accuracies on
    the same questions are reported apart.
    """
    rows = [r for r in JsonlLog(predictions).values() if r["id"] in reference]
    both = [r for r in rows if r["parsed"] is not None and reference[r["id"]] is not None]
    same = sum(r["parsed"] == reference[r["id"]] for r in both)
    n = len(rows)

    def share(k: int) -> float | None:
        return round(k / n, 4) if n else None

    return {
        "compared": n,
        "answered_both": len(both),
        "answer_agreement": round(same / len(both), 4) if both else None,
        "compared_accuracy": share(sum(r["correct"] for r in rows)),
        "compared_parse_rate": share(sum(r["parsed"] is not None for r in rows)),
        "merged_accuracy": share(sum(reference[r["id"]] == sorted(r["gold"]) for r in rows)),
        "merged_parse_rate": share(sum(reference[r["id"]] is not None for r in rows)),
    }


def run(recipe: Any, run_dir: Any, console: Console, check: bool = False) -> dict[str, Any]:
    """The ``eval`` stage: the untrained base and every exported quant on the dev split.

    Writes ``<run>/eval/summary.json``: ``base`` and ``quants`` (each quant's
    accuracy and parse rate on the split, and on the export's parity questions its
    accuracy and agreement beside the merged model's, see :func:`agreement`).
    ``check``: evaluate and write nothing; every evaluation must be complete for this recipe.
    """
    from .steps import Step

    base = eval_policy(recipe, None, run_dir.base_eval, console, stale_root=run_dir.stale, label="base", check=check)
    export = Step("export", run_dir.export, {})
    m = export.manifest() or {}
    if m.get("status") != "complete":
        raise UserError(f"{run_dir.export}: no complete export; run the export stage first")
    ggufs = m["metrics"]["ggufs"]  # quant -> {file, sha256, ...}
    report = read_json(run_dir.export / "report.json")
    reference = {r["id"]: r["answer"] for r in report["reference"]}
    quants = {}
    for q in recipe.export.quants:  # the 16-bit file is gated on logits in the export; quants ship
        if q not in ggufs:
            raise UserError(f"{run_dir.export}: has no {q} GGUF (made for other settings); run the export stage")
        info = ggufs[q]
        if not check:
            _reuse_policy_eval(recipe, run_dir, q, info, m["metrics"], console)
        res = eval_policy(
            recipe, None, run_dir.quant_eval(q), console, gguf=run_dir.export / info["file"],
            gguf_hash=info["sha256"], stale_root=run_dir.stale, label=q, check=check,
        )  # fmt: skip
        quants[q] = (
            res | {"file": info["file"], "quant": q} | agreement(run_dir.quant_eval(q) / "predictions.jsonl", reference)
        )
    summary = {"split": recipe.eval.split, "base": base, "quants": quants, "parity_questions": len(reference)}
    if check and (not (run_dir.eval / "summary.json").is_file() or read_json(run_dir.eval / "summary.json") != summary):
        raise UserError(f"{run_dir.eval / 'summary.json'}: not written from these evaluations")
    if not check:
        atomic_write_json(run_dir.eval / "summary.json", summary)
    return summary


def _reuse_policy_eval(
    recipe: Any, run_dir: Any, quant: str, info: dict[str, Any], export: dict[str, Any], console: Console
) -> None:
    """Evaluate an exported quant once: when the rounds already evaluated the very file it was stamped from
    (the selected policy's q8_0 on llama.cpp, same questions and settings), copy that evaluation into the
    quant's step instead of generating it again. Stamping adds metadata only; the tensors and chat template
    are the same bytes (the source's hash is checked), so every answer would be the same.
    """
    import shutil

    from .steps import Step

    source = Path(info.get("source", ""))
    if not info.get("source_sha256") or not source.is_file():
        return
    round_no = export.get("round", -1)
    done = run_dir.sft_eval if round_no == 0 else run_dir.round(round_no).eval if round_no > 0 else None
    prior = Step("eval", done, {}).manifest() if done is not None else None
    if not prior or prior.get("status") != "complete" or prior.get("gguf") != str(source):
        return
    records = eval_records(recipe)
    if prior["key"] != eval_step(done, policy_material(recipe, records, adapter_hash=export["adapter_sha256"])).key:
        return  # evaluated with other settings or questions
    out = run_dir.quant_eval(quant)
    step = eval_step(out, policy_material(recipe, records, gguf_hash=info["sha256"]), run_dir.stale, label="eval")
    if step.complete or sha256_file(source) != info["source_sha256"] or step.begin(console) == "complete":
        return
    shutil.copyfile(done / "predictions.jsonl", out / "predictions.jsonl")
    summary = read_json(done / "summary.json")
    atomic_write_json(out / "summary.json", summary)
    step.done(summary, outputs=["predictions.jsonl"], gguf=str(run_dir.export / info["file"]), reused_from=str(done))
    console.print(f"[green]eval {info['file']}: the same tensors as {done}'s policy GGUF; its evaluation reused[/]")


def check(recipe: Any, run_dir: Any, console: Console) -> None:
    """Refuse unless every evaluation of the eval stage is complete for this recipe."""
    run(recipe, run_dir, console, check=True)
