"""Self-play: rollouts, self-corrections and preference pairs for one round.

The MedCritical loop, per round:

1. **Rollouts** — the current policy samples ``k`` answers per training
   question; each is graded against the key.
2. **Corrections** — for each wrong trajectory, the fine-tuned model (the SFT
   model or the current policy) reviews it, finds the faulty step and answers
   again. The key is never in that prompt (with ``hint: wrong`` it is only told
   the answer is wrong). A correction counts only if its answer matches the key.
3. **Pairs** — chosen = a verified correction (``correction``, the paper's) or
   a correct sample (``self-consistency``) or both (``mixed``); rejected = the
   wrong trajectory; the prompt is the original question.

Rollouts and corrections append JSONL keyed by id, so a killed round resumes
without regenerating what is already written. Each row names the engine that
generated it (``transformers`` or ``llamacpp``, see ``rounds.engine_kind``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .artifacts import JsonlLog, atomic_write_text, iter_batches
from .data import MCQ
from .engines import Engine
from .grading import extract_answer, grade
from .prompts import choose_lang, correction_messages, question_messages, render_template, split_template
from .recipe import Recipe


def _bar(console: Console, label: str, total: int, done: int) -> tuple[Progress, Any]:
    prog = Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip
    return prog, prog.add_task(label, total=total, completed=done, stats="")


def _grade(text: str, q: MCQ) -> dict:
    parsed = extract_answer(text, q.options.keys())
    return {"text": text, "parsed": sorted(parsed) if parsed else None, "correct": grade(parsed, q.answer)}


def rollouts(recipe: Recipe, engine: Engine, questions: Sequence[MCQ], path: Path, console: Console) -> JsonlLog:
    """Sample ``k`` graded answers per question into ``path`` (resumable)."""
    cfg = recipe.rounds.rollouts
    log = JsonlLog(path)
    todo = [q for q in questions if q.id not in log]
    name = engine.name if todo else None  # an engine built on first use loads here, before the bar
    prog, task = _bar(console, "rollouts", len(questions), len(questions) - len(todo))
    with prog:
        for chunk in iter_batches(todo, max(1, cfg.batch_size // cfg.k)):
            msgs = [
                question_messages(q.question, q.options, q.multi, choose_lang(q.question, recipe.language))
                for q in chunk
            ]
            outs = engine.generate(
                msgs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.k,
                seed=recipe.seed + len(log), batch_size=cfg.batch_size,
            )  # fmt: skip
            for q, samples in zip(chunk, outs):
                log.append({"id": q.id, "samples": [_grade(s, q) for s in samples], "engine": name})
            right = sum(s["correct"] for row in log.values() for s in row["samples"])
            total = sum(len(row["samples"]) for row in log.values())
            prog.update(task, completed=len(log), stats=f"sample acc {right / max(total, 1):.1%}")
    return log


def clean_correction(text: str, q: MCQ, lang: str) -> str:
    """Keep the re-answer in the student's layout, without the critique preamble."""
    parts = split_template(text, lang)
    parsed = extract_answer(text, q.options.keys())
    return render_template(parts[0], parts[1], parsed, lang) if parts and parsed else text


def to_correct(rows: Iterable[dict], byid: dict[str, MCQ], per_question: int | None) -> list[tuple[str, MCQ, str]]:
    """(key, question, text) of the wrong samples to correct: at most ``per_question`` per question,
    those with a parsed (wrong) answer before truncated ones, each in sample order."""
    wrong = []
    for row in rows:
        if row["id"] not in byid:
            continue
        bad = [(j, s) for j, s in enumerate(row["samples"]) if not s["correct"]]
        bad.sort(key=lambda js: js[1]["parsed"] is None)  # stable: sample order within each kind
        wrong += [(f"{row['id']}#{j}", byid[row["id"]], s["text"]) for j, s in bad[:per_question]]
    return wrong


def corrections(
    recipe: Recipe, engine: Engine, questions: Sequence[MCQ], rolled: JsonlLog, path: Path, console: Console
) -> JsonlLog:
    """Ask the model to correct wrong trajectories (:func:`to_correct`); keep those verified by the key."""
    cfg = recipe.rounds.correction
    byid = {q.id: q for q in questions}
    log = JsonlLog(path)
    wrong = to_correct(rolled.values(), byid, cfg.per_question)
    todo = [w for w in wrong if w[0] not in log]
    name = engine.name if todo else None  # an engine built on first use loads here, before the bar
    prog, task = _bar(console, "corrections", len(wrong), len(wrong) - len(todo))
    with prog:
        for chunk in iter_batches(todo, max(1, recipe.rounds.rollouts.batch_size // cfg.attempts)):
            langs = [choose_lang(q.question, recipe.language) for _, q, _ in chunk]
            msgs = [
                correction_messages(q.question, q.options, q.multi, lg, text, cfg.hint)
                for (_, q, text), lg in zip(chunk, langs)
            ]
            outs = engine.generate(
                msgs, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, n=cfg.attempts,
                seed=recipe.seed + 7919 + len(log), batch_size=recipe.rounds.rollouts.batch_size,
            )  # fmt: skip
            for (key, q, text), lg, attempts in zip(chunk, langs, outs):
                graded = [_grade(a, q) for a in attempts]
                ok = next((g for g in graded if g["correct"]), None)
                log.append(
                    {
                        "id": key,
                        "question_id": q.id,
                        "rejected": text,
                        "attempts": graded,
                        "verified": ok is not None,
                        "chosen": clean_correction(ok["text"], q, lg) if ok else None,
                        "engine": name,
                    }
                )
            verified = sum(r["verified"] for r in log.values())
            prog.update(task, completed=len(log), stats=f"verified {verified}/{len(log)}")
    return log


def build_pairs(
    recipe: Recipe, questions: Sequence[MCQ], rolled: JsonlLog, corrected: JsonlLog, tokenizer: Any = None
) -> tuple[list[dict], dict[str, int]]:
    """Preference pairs by the recipe's strategy, deduplicated, capped and length-filtered."""
    cfg = recipe.rounds.pairs
    byid = {q.id: q for q in questions}
    candidates: dict[str, list[tuple[str, str, str]]] = {}
    if cfg.strategy in ("correction", "mixed"):
        for c in corrected.values():
            if c["verified"]:
                candidates.setdefault(c["question_id"], []).append((c["chosen"], c["rejected"], "correction"))
    if cfg.strategy in ("self-consistency", "mixed"):
        for row in rolled.values():
            good = [s["text"] for s in row["samples"] if s["correct"]]
            bad = [s["text"] for s in row["samples"] if not s["correct"]]
            for g, b in zip(good, bad):
                candidates.setdefault(row["id"], []).append((g, b, "self-consistency"))
    stats = {"candidates": sum(map(len, candidates.values())), "duplicates": 0, "too_long": 0, "over_cap": 0}
    pairs = []
    for qid, cands in candidates.items():
        q = byid[qid]
        lang = choose_lang(q.question, recipe.language)
        msgs = question_messages(q.question, q.options, q.multi, lang)
        seen, kept = set(), 0
        prompt_len = (
            len(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)) if tokenizer else 0
        )
        for chosen, rejected, kind in cands:
            if chosen.strip() == rejected.strip() or (chosen, rejected) in seen:
                stats["duplicates"] += 1
                continue
            seen.add((chosen, rejected))
            if tokenizer is not None:
                longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (chosen, rejected))
                if prompt_len + longest > cfg.max_length:
                    stats["too_long"] += 1
                    continue
            if kept >= cfg.max_per_question:
                stats["over_cap"] += 1
                continue
            kept += 1
            pairs.append(
                {
                    "id": f"{qid}#{kept}",
                    "prompt": msgs,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "kind": kind,
                }
            )
    stats["pairs"] = len(pairs)
    return pairs, stats


def write_pairs(pairs: list[dict], path: Path) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
