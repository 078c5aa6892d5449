"""Self-play: rollouts, self-corrections and preference pairs for one round.

The MedCritical loop, per round:

1. **Rollouts** - the current policy samples ``k`` answers per training
   question; each is graded against the key.
2. **Corrections** - for each wrong trajectory, the fine-tuned model (the SFT
   model or the current policy) reviews it, finds the faulty step and answers
   again. The key is never in that prompt (with ``hint: wrong`` it is only told
   the answer is wrong).
3. **Pairs** - chosen = a verified correction (``correction``, the paper's) or
   a correct sample (``self-consistency``) or both (``mixed``); rejected = the
   wrong trajectory; the prompt is the original question.

What may become ``chosen`` is strict: the reply must state the key on its
final answer line (:func:`~medcritical.grading.committed_answer`). The lenient
reader that scores evaluations (:func:`~medcritical.grading.extract_answer`)
may count a reply as right that commits to nothing ("The correct answer is:"
and nothing after it); DPO must never learn to prefer such a reply. A verified
correction must also be in the student's layout (plan and reasoning sections,
:func:`~medcritical.prompts.split_template`): what is trained as chosen is its
last template (a correction often quotes the wrong trajectory first), rendered
in the layout, as the answer to the bare question. The paper trains on the
correction trajectory; we train its final template, so the policy learns to
answer right the first time rather than to write critiques of answers it was
never shown. A right rollout sample is chosen in the layout when it wrote one,
else as written (``rounds.pairs.require_layout``). The rejected side is
rendered the same way, so both sides read alike where the student wrote alike.

**Every trajectory commits** (``rounds.force_answer``, on by default). A
small student often stops, or is cut off, before its answer line. Such a reply
gets the answer cue of its language ("Answer: " / "答案：") and the model
chooses among the question's option letters by its own next-token scores
(:func:`~medcritical.engines.sample_replies`; multi-answer questions by the rule
log-likelihood evaluation uses). The key never enters a prompt. The reply is
then graded on that answer; its log row says how the answer was reached
(``answered``: ``stated`` on its own answer line, ``forced``, or ``none``).
So both sides of a pair end in an answer line: they differ in content, not in
whether an answer was given. A reply that stated no answer is corrected with
a prompt that says so, not "this answer is wrong". ``force_answer: false``
keeps the older reading: the lenient parse grades, and only a reply with its
own answer line may be chosen.

Rollouts and corrections append JSONL keyed by id. Generation is cut in chunks
over the whole question list with a seed per (round, step, chunk)
(:func:`medcritical.steps.pending_chunks`), so a killed round redoes only its
unfinished chunk, with the same samples as a run that never stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .artifacts import JsonlLog, atomic_write_text
from .data import MCQ
from .engines import Engine, Reply, sample_replies
from .grading import committed_answer, extract_answer, grade
from .prompts import (
    ANSWER_CUE,
    answer_line,
    choose_lang,
    correction_messages,
    lead,
    question_messages,
    render_template,
    split_template,
)
from .recipe import Recipe
from .runtime import Ticker
from .steps import derive_seed, pending_chunks


def _bar(console: Console, label: str, total: int, done: int) -> tuple[Progress, Any]:
    prog = Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip
    return prog, prog.add_task(label, total=total, completed=done, stats="")


def as_chosen(text: str, q: MCQ, lang: str, layout: bool = True) -> tuple[str | None, str]:
    """``text`` rewritten as a chosen reply, or None with the reason it may not be one.

    It must state the key on its final answer line. In the student layout, the
    result is its last template with that answer line; a reply without the
    layout may be chosen as it is only when ``layout`` is False.
    """
    stated = committed_answer(text, q.options.keys())
    if stated is None:
        return None, "no_answer_line"
    if not grade(stated, q.answer):
        return None, "wrong_answer"
    parts = split_template(text, lang)  # type: ignore[arg-type]
    if parts is None:
        return (None, "no_layout") if layout else (text.strip(), "ok_as_written")
    return render_template(parts[0], parts[1], stated, lang), "ok"  # type: ignore[arg-type]


def layout_required(recipe: Recipe) -> bool:
    """``rounds.pairs.require_layout``; unset: required unless answers are forced (the older rule)."""
    want = recipe.rounds.pairs.require_layout
    return (not recipe.rounds.force_answer) if want is None else want


def pick_letters(scores: dict[str, float], multi: bool) -> set[str]:
    """The forced answer from the letters' scores, by the rule log-likelihood evaluation uses."""
    from .evaluate import pick_from_logprobs

    return pick_from_logprobs(scores, multi)


def _grade(reply: Reply, q: MCQ, lang: str, force: bool) -> dict:
    """A graded reply. With ``force``, a reply without its own answer line is answered by its forced letters
    (``answered: forced``) and ``text`` gets that answer line; ``raw`` keeps what the model wrote."""
    raw = reply.text
    stated = committed_answer(raw, q.options.keys())
    text, answered = raw, "stated" if stated else "none"
    if stated is None and force and reply.scores:
        letters = pick_letters(reply.scores, q.multi)
        text, answered = raw.rstrip() + "\n\n" + answer_line(letters, lang), "forced"  # type: ignore[arg-type]
    parsed = extract_answer(text, q.options.keys())
    chosen, why = as_chosen(text, q, lang)
    row = {
        "text": text,
        "parsed": sorted(parsed) if parsed else None,
        "correct": grade(parsed, q.answer),
        "committed": chosen is not None,  # may be a chosen reply (see the module doc)
        "why": why,
        "answered": answered,
        "cut": reply.cut,
    }
    if answered == "forced":
        row |= {"raw": raw, "scores": {k: round(v, 4) for k, v in reply.scores.items()}}  # type: ignore[union-attr]
    return row


def as_rejected(sample: dict, lang: str) -> str:
    """A wrong sample as the rejected side: in the student layout when it wrote one, with its answer line
    (stated or forced); a reply with no answer at all (``force_answer: false``) stays as written."""
    parts = split_template(sample["text"], lang)  # type: ignore[arg-type]
    if parts is None or not sample.get("parsed"):
        return sample["text"]
    return render_template(parts[0], parts[1], sample["parsed"], lang)  # type: ignore[arg-type]


def _sample(
    recipe: Recipe, engine: Engine, msgs: list, chunk: Sequence[MCQ], langs: list, *, prefix: bool, **gen: Any
) -> list[list[Reply]]:
    """Replies to ``msgs`` (the chunk's prompts); with ``rounds.force_answer``, scored where they do not commit."""
    force = recipe.rounds.force_answer
    return sample_replies(
        engine, msgs,
        letters=[list(q.options) for q in chunk] if force else None,
        cue=[ANSWER_CUE[lg] for lg in langs] if force else None,
        needs_score=lambda text: committed_answer(text, "ABCDEFGHIJ") is None,
        prefix=[lead(lg) for lg in langs] if prefix else "",
        **gen,
    )  # fmt: skip


def rollouts(
    recipe: Recipe, engine: Engine, questions: Sequence[MCQ], path: Path, console: Console, round_no: int = 1
) -> JsonlLog:
    """Sample ``k`` graded answers per question into ``path`` (resumable, see the module doc)."""
    cfg = recipe.rounds.rollouts
    log = JsonlLog(path)
    ids = [q.id for q in questions]
    chunks = list(pending_chunks(ids, max(1, cfg.batch_size // cfg.k), set(log.rows)))
    name = engine.name if chunks else None  # an engine built on first use loads here, before the bar
    prog, task = _bar(console, f"rollouts r{round_no}", len(questions), len(log))
    tick = Ticker(console, f"rollouts r{round_no}")
    with prog:
        for c, positions in chunks:
            chunk = [questions[i] for i in positions]
            langs = [choose_lang(q.question, recipe.language) for q in chunk]
            msgs = [question_messages(q.question, q.options, q.multi, lg) for q, lg in zip(chunk, langs)]
            outs = _sample(
                recipe, engine, msgs, chunk, langs, prefix=cfg.lead,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.k,
                seed=derive_seed(recipe.seed, "rollouts", round_no, c), batch_size=cfg.batch_size,
            )  # fmt: skip
            force = recipe.rounds.force_answer
            for q, lg, samples in zip(chunk, langs, outs):
                if q.id not in log:
                    log.append({"id": q.id, "samples": [_grade(s, q, lg, force) for s in samples], "engine": name})
            right = sum(s["correct"] for row in log.values() for s in row["samples"])
            total = sum(len(row["samples"]) for row in log.values())
            prog.update(task, completed=len(log), stats=f"sample acc {right / max(total, 1):.1%}")
            tick(len(log), len(questions), f"sample acc {right / max(total, 1):.1%}")
    return log


def _stated(sample: dict) -> bool:
    """Whether the model itself gave an answer (its answer line, or one the lenient reader finds)."""
    how = sample.get("answered")  # absent in logs written before answers were forced
    return how == "stated" or (how in (None, "none") and sample["parsed"] is not None)


def to_correct(rows: Iterable[dict], byid: dict[str, MCQ], per_question: int | None) -> list[tuple[str, MCQ, dict]]:
    """(key, question, sample) of the wrong samples to correct: at most ``per_question`` per question,
    those that stated a (wrong) answer before those that stated none, each in sample order."""
    wrong = []
    for row in rows:
        if row["id"] not in byid:
            continue
        bad = [(j, s) for j, s in enumerate(row["samples"]) if not s["correct"]]
        bad.sort(key=lambda js: not _stated(js[1]))  # stable: sample order within each kind
        wrong += [(f"{row['id']}#{j}", byid[row["id"]], s) for j, s in bad[:per_question]]
    return wrong


def corrections(
    recipe: Recipe,
    engine: Engine,
    questions: Sequence[MCQ],
    rolled: JsonlLog,
    path: Path,
    console: Console,
    round_no: int = 1,
) -> JsonlLog:
    """Ask the model to correct wrong trajectories (:func:`to_correct`); a correction is verified
    when it may be a chosen reply (:func:`as_chosen`)."""
    cfg = recipe.rounds.correction
    byid = {q.id: q for q in questions}
    log = JsonlLog(path)
    order = {q.id: i for i, q in enumerate(questions)}
    rows = sorted((r for r in rolled.values() if r["id"] in order), key=lambda r: order[r["id"]])
    wrong = to_correct(rows, byid, cfg.per_question)
    keys = [w[0] for w in wrong]
    chunks = list(pending_chunks(keys, max(1, recipe.rounds.rollouts.batch_size // cfg.attempts), set(log.rows)))
    name = engine.name if chunks else None  # an engine built on first use loads here, before the bar
    prog, task = _bar(console, f"corrections r{round_no}", len(wrong), len(log))
    tick = Ticker(console, f"corrections r{round_no}")
    with prog:
        for c, positions in chunks:
            chunk = [wrong[i] for i in positions]
            langs = [choose_lang(q.question, recipe.language) for _, q, _ in chunk]
            msgs = [
                correction_messages(q.question, q.options, q.multi, lg, s.get("raw", s["text"]), cfg.hint, _stated(s))
                for (_, q, s), lg in zip(chunk, langs)
            ]
            outs = _sample(
                recipe, engine, msgs, [q for _, q, _ in chunk], langs, prefix=False,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, n=cfg.attempts,
                seed=derive_seed(recipe.seed, "corrections", round_no, c), batch_size=recipe.rounds.rollouts.batch_size,
            )  # fmt: skip
            for (key, q, s), lg, attempts in zip(chunk, langs, outs):
                if key in log:
                    continue
                graded = [_grade(a, q, lg, recipe.rounds.force_answer) for a in attempts]
                ok = next((g for g in graded if g["committed"]), None)
                log.append(
                    {
                        "id": key,
                        "question_id": q.id,
                        "rejected": as_rejected(s, lg),
                        "rejected_answered": s.get("answered"),
                        "stated": _stated(s),
                        "attempts": graded,
                        "verified": ok is not None,
                        "verified_lenient": any(g["correct"] for g in graded),
                        "chosen": as_chosen(ok["text"], q, lg)[0] if ok else None,
                        "chosen_answered": ok["answered"] if ok else None,
                        "engine": name,
                    }
                )
            verified = sum(r["verified"] for r in log.values())
            prog.update(task, completed=len(log), stats=f"verified {verified}/{len(log)}")
            tick(len(log), len(wrong), f"verified {verified}/{len(log)}")
    return log


def build_pairs(
    recipe: Recipe, questions: Sequence[MCQ], rolled: JsonlLog, corrected: JsonlLog, tokenizer: Any = None
) -> tuple[list[dict], dict[str, int]]:
    """Preference pairs by the recipe's strategy, deduplicated, capped and length-filtered.

    Counts what was left out and why: ``duplicates``, ``too_long`` (would be cut
    before the answer line at ``pairs.max_length``), ``over_cap``, and
    ``not_committed`` (right by the lenient reader, but no layout or no final
    answer line: never chosen).
    """
    cfg = recipe.rounds.pairs
    byid = {q.id: q for q in questions}
    order = {q.id: i for i, q in enumerate(questions)}
    # per question: (chosen, rejected, kind, how each side's answer was reached)
    candidates: dict[str, list[tuple[str, str, str, str | None, str | None]]] = {}
    stats = {"candidates": 0, "not_committed": 0, "duplicates": 0, "too_long": 0, "over_cap": 0}
    if cfg.strategy in ("correction", "mixed"):
        for c in corrected.values():
            if c["verified"]:
                candidates.setdefault(c["question_id"], []).append(
                    (c["chosen"], c["rejected"], "correction", c.get("chosen_answered"), c.get("rejected_answered"))
                )
            elif c.get("verified_lenient"):
                stats["not_committed"] += 1
    if cfg.strategy in ("self-consistency", "mixed"):
        need_layout = layout_required(recipe)
        for row in rolled.values():
            if row["id"] not in byid:
                continue
            q = byid[row["id"]]
            lang = choose_lang(q.question, recipe.language)
            good = [
                (s, c) for s in row["samples"] if s["correct"] and (c := as_chosen(s["text"], q, lang, need_layout)[0])
            ]
            stats["not_committed"] += sum(s["correct"] for s in row["samples"]) - len(good)
            # wrong samples in the student layout first: the pair then differs in content, not in format
            bad = sorted((s for s in row["samples"] if not s["correct"]),
                         key=lambda s: split_template(s["text"], lang) is None)  # fmt: skip
            for (g, chosen), b in zip(good, bad):
                candidates.setdefault(row["id"], []).append(
                    (chosen, as_rejected(b, lang), "self-consistency", g.get("answered"), b.get("answered"))
                )
    stats["candidates"] = sum(map(len, candidates.values()))
    for key in ("correction", "self-consistency", "chosen_forced", "rejected_forced", "rejected_no_answer",
                "chosen_layout", "rejected_layout"):  # fmt: skip
        stats[key] = 0
    pairs = []
    for qid in sorted(candidates, key=lambda i: order.get(i, len(order))):
        q = byid[qid]
        lang = choose_lang(q.question, recipe.language)
        msgs = question_messages(q.question, q.options, q.multi, lang)
        seen, kept = set(), 0
        prompt_len = (
            len(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
            if tokenizer
            else 0
        )
        for chosen, rejected, kind, chosen_by, rejected_by in candidates[qid]:
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
            stats[kind] += 1
            stats["chosen_forced"] += chosen_by == "forced"
            stats["rejected_forced"] += rejected_by == "forced"
            stats["rejected_no_answer"] += committed_answer(rejected, q.options.keys()) is None
            stats["chosen_layout"] += split_template(chosen, lang) is not None
            stats["rejected_layout"] += split_template(rejected, lang) is not None
            pairs.append(
                {
                    "id": f"{qid}#{kept}",
                    "prompt": msgs,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "kind": kind,
                    "chosen_answered": chosen_by,
                    "rejected_answered": rejected_by,
                }
            )
    stats["pairs"] = len(pairs)
    return pairs, stats


def write_pairs(pairs: list[dict], path: Path) -> None:
    import json

    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
