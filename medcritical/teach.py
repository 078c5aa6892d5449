"""The teach stage: verified chain-of-thought templates for the training questions.

For every train question a teacher writes a plan and step-by-step reasoning
(or, with ``backend: dataset``, they are built from the dataset's expert
explanation). A reply is kept only if it has both sections and its final
answer equals the key; in hinted mode it must also not reveal that it was told
the key. Each kept template becomes the SFT target (:func:`render_template`).

Outputs under ``<output_dir>/teach/``:

* ``templates.jsonl`` - one row per kept question (target plus provenance);
* ``rejected.jsonl`` - one row per rejected question, with every attempt;
* ``cache/`` - every teacher call (see :class:`medcritical.teachers.ReplyCache`);
* ``manifest.json`` - config, input hash, counts, versions.

Rows are appended as verdicts arrive and carry a ``decision_key`` (sha256 of
the question, its teacher prompt and every setting that can change a
verdict), so a rerun skips questions already decided under the same settings
and redoes the rest; unchanged calls then come from the cache for free.
Questions whose call failed are written nowhere and are retried on rerun.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import JsonlLog, atomic_write_text, is_complete, read_manifest, sha256_json, write_manifest
from .grading import extract_answer, grade
from .prompts import Lang, choose_lang, render_template, split_template, teacher_messages
from .teachers import TeacherRequest, find_leak

if TYPE_CHECKING:
    from rich.console import Console

    from .data import MCQ
    from .recipe import Recipe, TeachCfg
    from .teachers import CachedTeacher

STAGE = "teach"
OUTCOMES = ("kept", "wrong_answer", "unparseable", "leaked", "no_explanation", "errors")
# A greedy retry would repeat the rejected reply word for word, so retries of a
# temperature-0 recipe sample at this temperature instead.
RETRY_TEMPERATURE = 0.7
# Bumped when dataset_template changes, so its old templates count as stale.
DATASET_TEMPLATE_VERSION = 1


@dataclass(frozen=True)
class Verdict:
    """What a teacher reply is worth: ``outcome`` is kept, wrong_answer, unparseable or leaked."""

    outcome: str
    plan: str = ""
    steps: str = ""
    answer: tuple[str, ...] | None = None
    detail: str = ""


def judge(reply: str, mcq: MCQ, lang: Lang, hinted: bool) -> Verdict:
    """Classify a teacher reply (reasoning blocks already stripped).

    A leak is checked first: a hinted reply that cites the key is useless
    whatever else it says. A reply without both sections, or without a final
    answer the grader can read, is unparseable: it cannot be verified.
    """
    if hinted:
        phrase = find_leak(reply)
        if phrase:
            return Verdict("leaked", detail=phrase)
    parts = split_template(reply, lang)
    if parts is None:
        return Verdict("unparseable", detail="no plan and reasoning sections")
    pred = extract_answer(reply, mcq.options)
    if pred is None:
        return Verdict("unparseable", detail="no final answer")
    if not grade(pred, mcq.answer):
        return Verdict("wrong_answer", answer=tuple(sorted(pred)), detail=f"answered {''.join(sorted(pred))}")
    return Verdict("kept", plan=parts[0], steps=parts[1], answer=tuple(sorted(pred)))


def teacher_request(mcq: MCQ, lang: Lang, cfg: TeachCfg, seed: int, attempt: int) -> TeacherRequest:
    """The call for one attempt. The key enters the prompt only when ``cfg.hinted``.

    Attempt ``k`` uses seed ``seed + k`` so retries sample differently and each
    has its own cache entry.
    """
    temperature = cfg.temperature if attempt == 0 or cfg.temperature > 0 else RETRY_TEMPERATURE
    return TeacherRequest(
        messages=teacher_messages(mcq.question, mcq.options, mcq.multi, lang, hint=mcq.answer if cfg.hinted else None),
        temperature=temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        seed=seed + attempt,
    )


def stage_config(recipe: Recipe) -> dict[str, Any]:
    """Everything in the recipe the stage reads (the manifest's ``config``)."""
    return {"teach": recipe.teach.model_dump(mode="json"), "seed": recipe.seed, "language": recipe.language}


def _verdict_settings(recipe: Recipe) -> dict[str, Any]:
    """The settings that can change a verdict; concurrency, timeouts, retries,
    limit and the cache location cannot, so changing them keeps decisions."""
    c = recipe.teach
    if c.backend == "dataset":
        return {"backend": "dataset", "version": DATASET_TEMPLATE_VERSION, "language": recipe.language}
    keep = ("backend", "model", "base_url", "hinted", "temperature", "top_p", "max_tokens", "samples")
    return {**{k: getattr(c, k) for k in keep}, "seed": recipe.seed, "language": recipe.language}


def _decision_key(mcq: MCQ, lang: Lang, recipe: Recipe) -> str:
    prompt = None if recipe.teach.backend == "dataset" else teacher_request(mcq, lang, recipe.teach, recipe.seed, 0)
    return sha256_json(
        {"settings": _verdict_settings(recipe), "question": mcq.to_dict(), "prompt": prompt and prompt.messages}
    )


def _fresh_log(path: Path, keys: dict[str, str]) -> JsonlLog:
    """Open a log and drop rows decided under other settings or for questions
    no longer selected, so the file always describes the current run."""
    log = JsonlLog(path)
    fresh = [row for row in log.values() if keys.get(row["id"]) == row.get("decision_key")]
    if len(fresh) < len(log):
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in fresh))
        log = JsonlLog(path)
    return log


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _template_row(mcq: MCQ, lang: Lang, plan: str, steps: str, key: str, teacher: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": mcq.id,
        "question": mcq.question,
        "options": dict(mcq.options),
        "answer": list(mcq.answer),
        "multi": mcq.multi,
        "lang": lang,
        "source": mcq.source,
        "plan": plan,
        "steps": steps,
        "target": render_template(plan, steps, mcq.answer, lang),
        "teacher": teacher,
        "decision_key": key,
        "created_at": _now(),
    }


def _rejected_row(mcq: MCQ, lang: Lang, reason: str, attempts: list[dict], key: str) -> dict[str, Any]:
    """``reason`` is the last attempt's outcome; ``attempts`` has every one."""
    return {
        "id": mcq.id,
        "reason": reason,
        "lang": lang,
        "attempts": attempts,
        "decision_key": key,
        "created_at": _now(),
    }


class _Tally:
    """Live counts for the progress bar; final counts are re-read from the logs."""

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress, self.task = progress, task
        self.counts: Counter[str] = Counter()
        self.cached = 0

    def done(self, outcome: str) -> None:
        self.counts[outcome] += 1
        rejected = sum(v for k, v in self.counts.items() if k not in ("kept", "errors"))
        stats = f"[green]kept {self.counts['kept']}[/] [yellow]rejected {rejected}[/]"
        if self.counts["errors"]:
            stats += f" [red]errors {self.counts['errors']}[/]"
        self.progress.update(self.task, advance=1, stats=stats + f" cached {self.cached}")


def _teach_dataset(
    todo: list[MCQ], langs: dict[str, Lang], keys: dict[str, str], logs: tuple[JsonlLog, JsonlLog], tally: _Tally
) -> None:
    from .teachers import dataset_template

    templates, rejected = logs
    for mcq in todo:
        lang = langs[mcq.id]
        parts = dataset_template(mcq, lang)
        if parts is None:
            rejected.append(_rejected_row(mcq, lang, "no_explanation", [], keys[mcq.id]))
            tally.done("no_explanation")
            continue
        teacher = {"backend": "dataset", "model": None, "version": DATASET_TEMPLATE_VERSION}
        templates.append(_template_row(mcq, lang, *parts, keys[mcq.id], teacher))
        tally.done("kept")


def _teach_model(
    todo: list[MCQ],
    langs: dict[str, Lang],
    keys: dict[str, str],
    logs: tuple[JsonlLog, JsonlLog],
    tally: _Tally,
    recipe: Recipe,
    cached: CachedTeacher,
) -> list[str]:
    """Attempt rounds: every undecided question once per round, up to ``samples``.

    Rounds (rather than a loop per question) let local engines batch a round's
    prompts. Returns the error messages of questions left undecided.
    """
    cfg = recipe.teach
    templates, rejected = logs
    history: dict[str, list[dict]] = {m.id: [] for m in todo}
    errors: list[str] = []
    pending = todo
    for attempt in range(cfg.samples):
        requests = [teacher_request(m, langs[m.id], cfg, recipe.seed, attempt) for m in pending]
        retry: set[int] = set()
        for i, reply in cached.complete(requests):
            mcq, lang, req = pending[i], langs[pending[i].id], requests[i]
            tally.cached = cached.hits
            if reply.error:
                errors.append(f"{mcq.id}: {reply.error}")
                tally.done("errors")
                continue
            v = judge(reply.content, mcq, lang, cfg.hinted)
            history[mcq.id].append(
                {
                    "attempt": attempt,
                    "outcome": v.outcome,
                    "detail": v.detail,
                    "cache_key": reply.key,
                    "finish_reason": reply.finish_reason,
                }
            )
            if v.outcome == "kept":
                teacher = {
                    "backend": cfg.backend,
                    "model": cfg.model,
                    "base_url": cfg.base_url,
                    "hinted": cfg.hinted,
                    "temperature": req.temperature,
                    "top_p": req.top_p,
                    "max_tokens": req.max_tokens,
                    "seed": req.seed,
                    "attempt": attempt,
                    "cache_key": reply.key,
                    "cached": reply.cached,
                    "finish_reason": reply.finish_reason,
                    "seconds": round(reply.seconds, 3),
                }
                templates.append(_template_row(mcq, lang, v.plan, v.steps, keys[mcq.id], teacher))
                tally.done("kept")
            elif attempt == cfg.samples - 1:
                rejected.append(_rejected_row(mcq, lang, v.outcome, history[mcq.id], keys[mcq.id]))
                tally.done(v.outcome)
            else:
                retry.add(i)
        pending = [m for i, m in enumerate(pending) if i in retry]
        if not pending:
            break
    return errors


def _counts(records: list[MCQ], templates: JsonlLog, rejected: JsonlLog, errors: int) -> dict[str, int]:
    ids = {m.id for m in records}
    counts = Counter(r["reason"] for r in rejected.values() if r["id"] in ids)
    counts["kept"] = sum(r["id"] in ids for r in templates.values())
    counts["errors"] = errors
    return {k: counts[k] for k in OUTCOMES}


def _print_table(metrics: dict[str, Any], title: str, console: Console) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("outcome")
    table.add_column("questions", justify="right")
    table.add_column("share", justify="right")
    n = max(1, metrics["questions"])
    for k in OUTCOMES:
        table.add_row(k, str(metrics[k]), f"{metrics[k] / n:.1%}")
    console.print(table)
    if metrics["cache_hits"] or metrics["teacher_calls"]:
        console.print(
            f"teacher calls: {metrics['teacher_calls']} made, {metrics['cache_hits']} from the cache", highlight=False
        )


def run_teach(recipe: Recipe, console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) the teach stage; return its metrics (also in the manifest).

    Metrics: ``questions``; the outcome counts kept, wrong_answer, unparseable,
    leaked, no_explanation (over all selected questions, resumed ones
    included) and errors (questions whose call failed in this run; they stay
    undecided); ``teacher_calls`` and ``cache_hits`` for this run; ``keep_rate``;
    ``seconds``. With errors the manifest's status is ``incomplete``.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .data import load_recipe_data, records_hash

    console = console or Console(stderr=True)
    cfg = recipe.teach
    stage_dir = Path(recipe.output_dir) / STAGE
    records = load_recipe_data(recipe.data, split="train", console=console)[: cfg.limit]
    config, inputs = stage_config(recipe), {"train": records_hash(records)}
    if is_complete(stage_dir, config, inputs):
        console.print(f"teach: {stage_dir} is up to date", highlight=False)
        return (read_manifest(stage_dir) or {})["metrics"]

    start = time.monotonic()
    # Until this run ends, the stage's files describe no finished run.
    write_manifest(stage_dir, STAGE, config, inputs, status="running")
    langs = {m.id: choose_lang(m.question, recipe.language) for m in records}
    keys = {m.id: _decision_key(m, langs[m.id], recipe) for m in records}
    templates = _fresh_log(stage_dir / "templates.jsonl", keys)
    rejected = _fresh_log(stage_dir / "rejected.jsonl", keys)
    todo = [m for m in records if m.id not in templates and m.id not in rejected]
    if len(todo) < len(records):
        console.print(
            f"teach: resuming, {len(records) - len(todo)} of {len(records)} questions already decided", highlight=False
        )

    cached = None
    if todo and cfg.backend != "dataset":
        from .teachers import CachedTeacher, ReplyCache, make_teacher

        with console.status(f"opening teacher {cfg.backend} {cfg.model}..."):
            teacher = make_teacher(cfg, seed=recipe.seed)
        cached = CachedTeacher(teacher, ReplyCache(Path(cfg.cache_dir) if cfg.cache_dir else stage_dir / "cache"))

    errors: list[str] = []
    columns = (
        TextColumn("[bold]teach"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        tally = _Tally(progress, progress.add_task("teach", total=len(todo), stats=""))
        if cached is None:
            _teach_dataset(todo, langs, keys, (templates, rejected), tally)
        else:
            errors = _teach_model(todo, langs, keys, (templates, rejected), tally, recipe, cached)

    metrics: dict[str, Any] = {"questions": len(records), **_counts(records, templates, rejected, len(errors))}
    metrics.update(
        keep_rate=round(metrics["kept"] / len(records), 4) if records else None,
        teacher_calls=cached.calls if cached else 0,
        cache_hits=cached.hits if cached else 0,
        seconds=round(time.monotonic() - start, 2),
    )
    if errors:
        metrics["error_examples"] = errors[:3]
        console.print(
            f"[red]teach: {len(errors)} questions failed ({escape(errors[0])}); rerun to retry them", highlight=False
        )
    write_manifest(
        stage_dir,
        STAGE,
        config,
        inputs,
        metrics,
        status="incomplete" if errors else "complete",
        outputs={"templates": "templates.jsonl", "rejected": "rejected.jsonl"},
    )
    _print_table(metrics, f"teach: {cfg.backend}" + (f" {cfg.model}" if cfg.model else ""), console)
    return metrics


def _cmd_teach(args: argparse.Namespace) -> int:
    from .cli import _recipe, err_console, out_console

    recipe = _recipe(args)
    run_teach(recipe, console=err_console)
    out_console.print(
        f"templates: {Path(recipe.output_dir) / STAGE / 'templates.jsonl'}", highlight=False, soft_wrap=True
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``medcritical teach RECIPE [key.sub=value ...]``."""
    from .cli import _add_recipe

    p = sub.add_parser("teach", help="write verified chain-of-thought templates for the train questions")
    _add_recipe(p)
    p.set_defaults(func=_cmd_teach)
