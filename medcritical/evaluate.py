"""Evaluation: accuracy of a model on multiple-choice questions.

Writes ``predictions.jsonl`` (one row per question: prompt, raw output, parsed
answer, correct) appended as it goes, so an interrupted evaluation resumes
where it stopped, then ``summary.json`` and ``manifest.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .artifacts import JsonlLog, atomic_write_json, iter_batches, read_json, write_manifest
from .data import MCQ, records_hash
from .engines import Engine
from .errors import UserError
from .grading import extract_answer, grade
from .prompts import HEADINGS, choose_lang, question_messages


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


def _claim(out_dir: Path, config: dict) -> None:
    """Resume only the same evaluation: settings differ -> refuse, not mix rows."""
    path = out_dir / "settings.json"
    if path.exists() and read_json(path) != json.loads(json.dumps(config, default=str)):
        raise UserError(f"{out_dir}: holds an evaluation with other settings; choose another --output or delete it")
    atomic_write_json(path, config)


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
    config: dict | None = None,
    console: Console | None = None,
    label: str = "eval",
) -> dict[str, Any]:
    """Evaluate ``engine`` on ``records``; returns the summary (also written)."""
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    _claim(out_dir, config or {})
    log = JsonlLog(out_dir / "predictions.jsonl")
    wanted = {r.id for r in records}
    pending = [r for r in records if r.id not in log]
    if log.torn:
        console.print(f"[yellow]{log.path}: dropped a torn last line from an interrupted run")
    t0 = time.perf_counter()
    done_rows = [row for row in log.values() if row["id"] in wanted]
    with _progress(console) as prog:
        task = prog.add_task(label, total=len(records), completed=len(done_rows), stats="")

        def update(rows: list[dict]) -> None:
            s = summarize(rows)
            stats = f"acc {s['accuracy']:.1%}  parsed {s['parse_rate']:.0%}" if rows else ""
            prog.update(task, completed=len(rows), stats=stats)

        update(done_rows)
        for chunk in iter_batches(pending, max(batch_size, 1)):
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
                        seed=seed,
                        batch_size=batch_size,
                    )
                ]
            for r, m, out in zip(chunk, msgs, outputs):
                parsed = extract_answer(out, r.options.keys())
                row = {
                    "id": r.id,
                    "multi": r.multi,
                    "prompt": engine.render(m),
                    "output": out,
                    "parsed": sorted(parsed) if parsed is not None else None,
                    "gold": list(r.answer),
                    "correct": grade(parsed, r.answer),
                }
                log.append(row)
                done_rows.append(row)
            update(done_rows)
    rows = [log.rows[r.id] for r in records]
    summary = summarize(rows) | {
        "mode": mode,
        "engine": engine.name,
        "seconds": round(time.perf_counter() - t0, 2),
        "questions_per_second": round(len(pending) / max(time.perf_counter() - t0, 1e-9), 3),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    write_manifest(out_dir, "eval", config or {}, {"questions": records_hash(records)}, metrics=summary)
    return summary


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
