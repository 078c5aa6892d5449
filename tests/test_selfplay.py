"""Forced answers and pairs on the real llama.cpp engine (the embedded SmolLM2 GGUF), no model of our own.

A reply cut at a few tokens never reaches its answer line: with ``rounds.force_answer`` the model still
chooses a letter by its own scores after the answer cue, so the round makes pairs; without it, it does not.
"""

import json
from pathlib import Path

import pytest
from rich.console import Console

from medcritical import selfplay
from medcritical.artifacts import JsonlLog
from medcritical.data import skill_questions
from medcritical.default_model import default_gguf
from medcritical.engines import HFEngine, LlamaCppEngine, sample_replies
from medcritical.grading import committed_answer
from medcritical.prompts import ANSWER_CUE, answer_line, correction_messages, lead, question_messages
from medcritical.recipe import load_recipe

SHORT = [
    "language=en",
    "rounds.rollouts.k=4",
    "rounds.rollouts.max_new_tokens=6",  # never reaches "Answer: X"
    "rounds.rollouts.temperature=1.0",
    "rounds.rollouts.batch_size=16",
    "rounds.correction.attempts=1",
    "rounds.correction.max_new_tokens=6",
    "rounds.pairs.strategy=mixed",
]


class Recording:
    """The real engine, with every prompt it was handed kept (to check that no key is in any)."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    @property
    def name(self):
        return self.engine.name

    def replies(self, prompts, **kw):
        self.prompts += [json.dumps(p, ensure_ascii=False) for p in prompts]
        return self.engine.replies(prompts, **kw)


@pytest.fixture(scope="module")
def engine():
    eng = LlamaCppEngine(default_gguf(), n_ctx=2048)
    yield eng
    eng.close()


def _round(engine, tmp_path: Path, *extra: str):
    recipe = load_recipe(None, [f"output_dir={tmp_path}", *SHORT, *extra])
    qs = skill_questions(8)
    con = Console(stderr=True)
    rec = Recording(engine)
    rolled = selfplay.rollouts(recipe, rec, qs, tmp_path / "rollouts.jsonl", con)
    corrected = selfplay.corrections(recipe, rec, qs, rolled, tmp_path / "corrections.jsonl", con)
    pairs, stats = selfplay.build_pairs(recipe, qs, rolled, corrected)
    return qs, rolled, corrected, pairs, stats, rec


def test_replies_that_never_commit_still_make_pairs_by_forcing(engine, tmp_path: Path):
    qs, rolled, _, pairs, stats, rec = _round(engine, tmp_path)
    samples = [s for row in rolled.values() for s in row["samples"]]
    assert len(samples) == 32 and all(s["answered"] == "forced" and s["cut"] for s in samples)
    assert all(s["text"].startswith(lead("en")) and s["raw"] in s["text"] for s in samples)
    # every forced answer is one of the question's letters, the most likely one after the cue
    byid = {q.id: q for q in qs}
    for row in rolled.values():
        for s in row["samples"]:
            best = max(s["scores"], key=s["scores"].get)
            assert s["parsed"] == [best] and set(s["scores"]) == set(byid[row["id"]].options)
            assert s["text"].endswith(answer_line([best], "en"))
    assert stats["pairs"] > 0 and stats["self-consistency"] == stats["pairs"]
    for p in pairs:  # both sides end in an answer line, and differ in it
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        q = byid[p["id"].split("#")[0]]
        assert committed_answer(chosen, q.options) == set(q.answer)
        assert committed_answer(rejected, q.options) not in (None, set(q.answer))
        assert p["chosen_answered"] == p["rejected_answered"] == "forced"
    # the corrector was told the reply stated no answer, not that its answer was wrong
    asked = [r for r in rec.prompts if "never states a final answer" in r]
    assert asked and not any("This answer is wrong" in r for r in rec.prompts)
    assert all(not r["stated"] for r in JsonlLog(tmp_path / "corrections.jsonl").values())
    # no prompt ever holds the key: not its answer line, not the key's option text after an answer cue
    for q in qs:
        key_line = json.dumps(answer_line(q.answer, "en"))[1:-1]
        assert not any(key_line in p for p in rec.prompts)


def test_forced_answers_reproduce_with_the_same_seed(engine, tmp_path: Path):
    _round(engine, tmp_path / "a")
    _round(engine, tmp_path / "b")
    for name in ("rollouts.jsonl", "corrections.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_force_answer_off_keeps_the_older_reading(engine, tmp_path: Path):
    _, rolled, _, pairs, stats, _ = _round(engine, tmp_path, "rounds.force_answer=false")
    samples = [s for row in rolled.values() for s in row["samples"]]
    assert all(s["answered"] == "none" and "scores" not in s for s in samples)
    assert stats["pairs"] == 0 and stats["chosen_forced"] == 0  # six tokens never state an answer


def test_in_decoder_scores_equal_a_second_pass(engine):
    """The letters scored where each sequence ends equal llama.cpp's scores on prompt + reply + cue."""
    qs = skill_questions(3)
    msgs = [question_messages(q.question, q.options, q.multi, "en") for q in qs]
    got = sample_replies(
        engine, msgs, letters=[list(q.options) for q in qs], cue=[ANSWER_CUE["en"]] * 3, prefix=lead("en"),
        max_new_tokens=12, temperature=0.9, top_p=0.95, n=2, seed=5, batch_size=6,
    )  # fmt: skip
    for m, q, row in zip(msgs, qs, got):
        for r in row:
            again = engine.letter_logprobs([m], [r.text + ANSWER_CUE["en"]], [list(q.options)])[0]
            # The second pass re-tokenizes the reply's text, which can split otherwise than the tokens the
            # model sampled (seen: up to 0.55 nats apart on one letter); the choice must hold all the same.
            for x in q.options:
                assert r.scores[x] == pytest.approx(again[x], abs=1.0)
            picked = max(r.scores, key=r.scores.get)
            assert again[picked] >= max(again.values()) - 0.5


def test_transformers_scores_only_what_does_not_commit(tiny_llama: Path):
    from medcritical.models import load_model
    from medcritical.recipe import ModelCfg

    loaded = load_model(ModelCfg(load_in_4bit=False), path=str(tiny_llama))
    eng = HFEngine(loaded.model, loaded.tokenizer)
    qs = skill_questions(2)
    msgs = [question_messages(q.question, q.options, q.multi, "en") for q in qs]
    got = sample_replies(
        eng, msgs, letters=[list(q.options) for q in qs], cue=[ANSWER_CUE["en"]] * 2, prefix=[lead("en")] * 2,
        needs_score=lambda t: committed_answer(t, "ABCD") is None, max_new_tokens=5, temperature=1.0, n=2, seed=1,
    )  # fmt: skip
    for q, row in zip(qs, got):
        for r in row:
            assert r.text.startswith(lead("en").strip())
            assert set(r.scores) == set(q.options) and all(v < 0 for v in r.scores.values())


def test_correction_prompt_says_no_answer_was_stated():
    q = skill_questions(1)[0]
    unstated = correction_messages(q.question, q.options, False, "en", "### Plan\nCompare", "wrong", stated=False)
    stated = correction_messages(q.question, q.options, False, "en", "### Plan\nx\nAnswer: A", "wrong")
    assert "never states a final answer" in unstated[-1]["content"] and "wrong" not in unstated[-1]["content"]
    assert "This answer is wrong." in stated[-1]["content"]
    zh = correction_messages("题", {"A": "a", "B": "b"}, False, "zh", "### 思路", "wrong", stated=False)
    assert "没有给出最终答案" in zh[-1]["content"]
