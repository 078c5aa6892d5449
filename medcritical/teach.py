"""The teach stage: verified chain-of-thought templates for the training questions.

For every train question a teacher writes a plan and step-by-step reasoning
(or, with ``backend: dataset``, they are built from the dataset's expert
explanation). A reply is kept only if it has both sections (found by structure:
:func:`~medcritical.prompts.split_template` accepts any heading style) and its
final answer equals the key; in hinted mode it must also not reveal that it was
told the key. Each kept template becomes the SFT target
(:func:`~medcritical.prompts.render_template`); with ``teach.reasoning: keep``
the teacher's long chain of thought (its ``<think>`` block or the API's
reasoning field) comes first, in a ``<think>`` block.

Outputs under ``<run>/teach/`` (one step, :mod:`medcritical.steps`):

* ``templates.jsonl`` - one row per kept question (target plus provenance);
* ``rejected.jsonl`` - one row per rejected question, with every attempt;
* ``manifest.json`` - key, counts per outcome, versions.

Every teacher call is cached in ``<run>/cache/teach`` (or ``teach.cache_dir``),
outside the step, so a changed recipe that redoes the step pays only for calls
it has not made before. Rows are appended as verdicts arrive, so a killed run
resumes; questions whose call failed are written nowhere and retried on rerun.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .artifacts import JsonlLog, sha256_json
from .grading import GRADER_VERSION, extract_answer, grade
from .layout import RunDir
from .prompts import (
    Lang,
    choose_lang,
    langs_of,
    render_template,
    split_reasoning,
    split_template,
    teacher_messages,
    with_reasoning,
)
from .steps import Step
from .teachers import TeacherRequest, find_leak

if TYPE_CHECKING:
    from rich.console import Console

    from .data import MCQ
    from .recipe import Recipe, TeachCfg
    from .teachers import CachedTeacher

STAGE = "teach"
OUTCOMES = ("kept", "wrong_answer", "unparseable", "truncated", "leaked", "no_explanation", "errors")
# A greedy retry would repeat the rejected reply word for word, so retries of a
# temperature-0 recipe sample at this temperature instead.
RETRY_TEMPERATURE = 0.7
# Below this keep rate the stage shows a few rejected replies: a teacher whose format (not its knowledge)
# is the problem is then seen at once.
SHOW_REJECTED_BELOW = 0.5


@dataclass(frozen=True)
class Verdict:
    """What a teacher reply is worth: ``outcome`` is one of :data:`OUTCOMES` (not errors)."""

    outcome: str
    plan: str = ""
    steps: str = ""
    reasoning: str = ""
    answer: tuple[str, ...] | None = None
    detail: str = ""


def judge(
    text: str, mcq: MCQ, lang: Lang, hinted: bool, reasoning: str = "", finish_reason: str | None = None
) -> Verdict:
    """Classify a teacher reply (``text`` raw, ``<think>`` block included; ``reasoning``: the API's
    separate reasoning field).

    A leak is checked first, on the whole reply, chain of thought included: a
    hinted reply that cites the key is useless whatever else it says. The
    answer part (after the chain of thought) must have the template's two
    sections and a final answer the grader reads; a reply cut off by the token
    limit before that is ``truncated``.
    """
    thought, answer_part = split_reasoning(text, reasoning)
    if hinted:
        phrase = find_leak(thought + "\n" + answer_part)
        if phrase:
            return Verdict("leaked", detail=phrase)
    cut = finish_reason == "length"
    parts = split_template(answer_part, lang)
    if parts is None:
        return Verdict("truncated" if cut else "unparseable", detail="no plan and reasoning sections")
    pred = extract_answer(answer_part, mcq.options)
    if pred is None:
        return Verdict("truncated" if cut else "unparseable", detail="no final answer")
    if not grade(pred, mcq.answer):
        return Verdict("wrong_answer", answer=tuple(sorted(pred)), detail=f"answered {''.join(sorted(pred))}")
    return Verdict("kept", plan=parts[0], steps=parts[1], reasoning=thought, answer=tuple(sorted(pred)))


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


def teacher_identity(cfg: TeachCfg) -> dict[str, Any]:
    """What answers: an API's model name and address, or a local teacher by its files' content (not their path)
    with the resolved settings and library versions that run it."""
    from .artifacts import model_fingerprint
    from .steps import library_versions

    if cfg.backend == "openai":
        return {"model": cfg.model, "base_url": cfg.base_url}
    if cfg.backend == "gguf":
        return {"model": model_fingerprint(str(cfg.model)), "libraries": library_versions("llama_cpp_python")}
    from .default_model import resolve_model
    from .recipe import ModelCfg
    from .training import stack

    # as engines.open_engine loads it: the default model section, not in 4-bit
    return {"model": model_fingerprint(resolve_model(str(cfg.model))), **stack(ModelCfg(load_in_4bit=False))}


def step_material(recipe: Recipe, records: list[MCQ]) -> dict[str, Any]:
    """What decides the templates: the questions, the template layout, and every setting that can change a verdict.

    Concurrency, timeouts, retries and the cache location cannot, so changing
    them keeps the step complete.
    """
    from .data import records_hash

    c = recipe.teach
    langs = langs_of(records, recipe.language)
    material: dict[str, Any] = {
        "teach": {"backend": c.backend, "reasoning": c.reasoning},
        "questions": records_hash(records),
        "seed": recipe.seed,
        "language": recipe.language,
        # the layout the templates are rendered in, per language they are written in
        "layout": {lang: sha256_json(render_template("P", "S", "A", lang)) for lang in langs},
    }
    if c.backend != "dataset":
        material["teach"] |= {k: getattr(c, k) for k in ("hinted", "temperature", "top_p", "max_tokens", "samples")}
        material["teacher"] = teacher_identity(c)
        material["grader"] = GRADER_VERSION
        # the wording of the teacher's prompt in each language the questions are asked in
        material["teacher_prompt"] = {
            lang: sha256_json(teacher_request(records[0], lang, c, 0, 0).messages) for lang in langs
        }
    return material


def step(recipe: Recipe, run_dir: RunDir, records: list[MCQ]) -> Step:
    return Step("teach", run_dir.teach, step_material(recipe, records), stale_root=run_dir.stale, label="teach")


def check(recipe: Recipe, run_dir: RunDir, console: Console) -> None:
    """Refuse unless the templates are complete for this recipe."""
    from .data import load_recipe_data

    step(recipe, run_dir, load_recipe_data(recipe.data, split="train")[: recipe.teach.limit]).require()


def _template_row(mcq: MCQ, lang: Lang, v: Verdict, keep_reasoning: bool, teacher: dict[str, Any]) -> dict[str, Any]:
    target = render_template(v.plan, v.steps, mcq.answer, lang)
    if keep_reasoning:
        target = with_reasoning(v.reasoning, target)
    return {
        "id": mcq.id,
        "question": mcq.question,
        "options": dict(mcq.options),
        "answer": list(mcq.answer),
        "multi": mcq.multi,
        "lang": lang,
        "source": mcq.source,
        "plan": v.plan,
        "steps": v.steps,
        "reasoning_chars": len(v.reasoning) if keep_reasoning else 0,
        "target": target,
        "teacher": teacher,
    }


def _rejected_row(mcq: MCQ, lang: Lang, reason: str, attempts: list[dict]) -> dict[str, Any]:
    """``reason`` is the last attempt's outcome; ``attempts`` has every one."""
    return {"id": mcq.id, "reason": reason, "lang": lang, "attempts": attempts}


class _Tally:
    """Live counts for the progress bar; final counts are re-read from the logs."""

    def __init__(self, progress: Any, task: Any, total: int) -> None:
        from .runtime import Ticker

        self.progress, self.task, self.total = progress, task, total
        self.counts: Counter[str] = Counter()
        self.cached = 0
        self.tick = Ticker(progress.console, "teach")

    def done(self, outcome: str) -> None:
        self.counts[outcome] += 1
        rejected = sum(v for k, v in self.counts.items() if k not in ("kept", "errors"))
        stats = f"[green]kept {self.counts['kept']}[/] [yellow]rejected {rejected}[/]"
        if self.counts["errors"]:
            stats += f" [red]errors {self.counts['errors']}[/]"
        self.progress.update(self.task, advance=1, stats=stats + f" cached {self.cached}")
        self.tick(sum(self.counts.values()), self.total, f"kept {self.counts['kept']} rejected {rejected}")


def _teach_dataset(todo: list[MCQ], langs: dict[str, Lang], logs: tuple[JsonlLog, JsonlLog], tally: _Tally) -> None:
    from .teachers import dataset_template

    templates, rejected = logs
    for mcq in todo:
        lang = langs[mcq.id]
        parts = dataset_template(mcq, lang)
        if parts is None:
            rejected.append(_rejected_row(mcq, lang, "no_explanation", []))
            tally.done("no_explanation")
            continue
        v = Verdict("kept", plan=parts[0], steps=parts[1], answer=mcq.answer)
        templates.append(_template_row(mcq, lang, v, False, {"backend": "dataset", "model": None}))
        tally.done("kept")


def _teach_model(
    todo: list[MCQ],
    langs: dict[str, Lang],
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
            v = judge(reply.text, mcq, lang, cfg.hinted, reply.reasoning, reply.finish_reason)
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
                    "finish_reason": reply.finish_reason,
                }
                templates.append(_template_row(mcq, lang, v, cfg.reasoning == "keep", teacher))
                tally.done("kept")
            elif attempt == cfg.samples - 1:
                rejected.append(_rejected_row(mcq, lang, v.outcome, history[mcq.id]))
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


def _show_rejected(rejected: JsonlLog, cache_dir: Any, console: Console, n: int = 3) -> None:
    """A few rejected replies, shortened: whether the teacher's format or its knowledge is the problem."""
    from rich.markup import escape

    from .teachers import ReplyCache

    cache = ReplyCache(cache_dir)
    shown = 0
    for row in rejected.values():
        last = row["attempts"][-1] if row["attempts"] else None
        reply = cache.get(last["cache_key"]) if last and last.get("cache_key") else None
        if reply is None:
            continue
        text = " ".join(reply.text.split())
        short = text if len(text) <= 400 else text[:250] + " [...] " + text[-140:]
        console.print(f"[yellow]rejected ({row['reason']}: {last['detail']})[/] {row['id']}: {escape(short)}")
        shown += 1
        if shown == n:
            break


def run(recipe: Recipe, run_dir: RunDir, console: Console) -> dict[str, Any]:
    """Run (or resume) the teach stage; return its metrics (also in the manifest).

    Metrics: ``questions``; the outcome counts (:data:`OUTCOMES`; errors are
    questions whose call failed in this run: they stay undecided); ``teacher_calls``
    and ``cache_hits`` for this run; ``keep_rate``; ``seconds``. With errors the
    step stays partial and the stage fails, so the next run retries them.
    """
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .data import load_recipe_data
    from .errors import UserError

    cfg = recipe.teach
    records = load_recipe_data(recipe.data, split="train", console=console)[: cfg.limit]
    st = step(recipe, run_dir, records)
    if st.begin(console) == "complete":
        console.print(f"teach: up to date ({run_dir.templates})", highlight=False)
        return st.metrics()

    start = time.monotonic()
    langs = {m.id: choose_lang(m.question, recipe.language) for m in records}
    templates, rejected = JsonlLog(run_dir.templates), JsonlLog(run_dir.rejected)
    todo = [m for m in records if m.id not in templates and m.id not in rejected]
    if len(todo) < len(records):
        console.print(
            f"teach: resuming, {len(records) - len(todo)} of {len(records)} questions already decided", highlight=False
        )
    cache_dir = cfg.cache_dir or run_dir.teacher_cache
    cached = None
    if todo and cfg.backend != "dataset":
        from .teachers import CachedTeacher, ReplyCache, make_teacher

        with console.status(f"opening teacher {cfg.backend} {cfg.model}..."):
            teacher = make_teacher(cfg, seed=recipe.seed)
        cached = CachedTeacher(teacher, ReplyCache(cache_dir))

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
        tally = _Tally(progress, progress.add_task("teach", total=len(todo), stats=""), len(todo))
        if cached is None:
            _teach_dataset(todo, langs, (templates, rejected), tally)
        else:
            errors = _teach_model(todo, langs, (templates, rejected), tally, recipe, cached)

    metrics: dict[str, Any] = {"questions": len(records), **_counts(records, templates, rejected, len(errors))}
    metrics.update(
        keep_rate=round(metrics["kept"] / len(records), 4) if records else None,
        teacher_calls=cached.calls if cached else 0,
        cache_hits=cached.hits if cached else 0,
        seconds=round(time.monotonic() - start, 2),
        with_reasoning=sum(r.get("reasoning_chars", 0) > 0 for r in templates.values()),
    )
    _print_table(metrics, f"teach: {cfg.backend}" + (f" {cfg.model}" if cfg.model else ""), console)
    if cfg.backend != "dataset" and records and metrics["kept"] < SHOW_REJECTED_BELOW * len(records):
        console.print(
            f"[yellow]teach: only {metrics['kept']} of {len(records)} replies kept; a few rejected ones "
            "(if they are fine answers in another layout, the teacher's format is the problem):[/]"
        )
        _show_rejected(rejected, cache_dir, console)
    if cfg.reasoning == "keep" and metrics["kept"] and not metrics["with_reasoning"]:
        console.print("[yellow]teach.reasoning is keep, but no kept reply had a chain of thought to keep[/]")
    if errors:
        metrics["error_examples"] = errors[:3]
        st.progress(metrics, {})
        raise UserError(f"teach: {len(errors)} teacher calls failed ({escape(errors[0])}); run again to retry them")
    st.done(metrics, outputs=["templates.jsonl", "rejected.jsonl"])
    return metrics
