"""Tests for reading a model's final multiple-choice answer and grading it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medcritical import grading
from medcritical.grading import committed_answer, extract_answer, grade

STEM_ZH = (
    "患者，男，65岁，发热咳嗽3天，咳铁锈色痰。最可能的病原体是\n"
    "A. 金黄色葡萄球菌\nB. 肺炎链球菌\nC. 肺炎克雷伯菌\nD. 军团菌\nE. 支原体\n"
)
STEM_EN = (
    "A 30-year-old woman presents with fatigue. Which test is most appropriate?\n"
    "A. CBC\nB. TSH\nC. ECG\nD. Chest X-ray\n"
)

OPTIONS_EN = "Option A: CBC - nonspecific.\nOption B: TSH - screens thyroid.\nOption C: ECG - not indicated.\n"

CASES = [
    # Option headings are titles of an analysis, not answers (seen in a pipeline run: a reply cut off right
    # after "### Option B" was read as B).
    ("### Plan\nRecall.\n\n### Option A\nRecall the fact.\n\n### Option B", None),
    ("**Option B**\nIt is wrong because the stem says otherwise.", None),
    ("The answer:\nOption B", {"B"}),
    # Chinese explicit markers
    ("答案：B", {"B"}),
    ("答案: B", {"B"}),
    ("答案是B、D", {"B", "D"}),
    ("答案为 A,C", {"A", "C"}),
    ("正确答案是：C", {"C"}),
    ("铁锈色痰提示肺炎链球菌感染，故选C。", {"C"}),
    ("综合分析，故选择D项。", {"D"}),
    ("以上分析可知，所以选 B", {"B"}),
    ("最终答案：ABD", {"A", "B", "D"}),
    ("【答案】E\n【解析】支原体肺炎多见于青少年。", {"E"}),
    ("答案：Ｂ", {"B"}),  # full-width letter from a Chinese input method
    ("本题答案应该是B和D。", {"B", "D"}),
    ("正确选项为C。", {"C"}),
    ("答案：A、B、D", {"A", "B", "D"}),
    # English explicit markers
    ("The answer is (C)", {"C"}),
    ("The answer is C.", {"C"}),
    ("Answer: B", {"B"}),
    ("**Answer: A**", {"A"}),
    ("Reasoning about TSH levels...\n\n**Final answer:** D", {"D"}),
    ("Final Answer: \\boxed{B}", {"B"}),
    ("So we get $\\boxed{AC}$", {"A", "C"}),
    ("<think>B looks tempting but E fits better.</think>\n<answer>E</answer>", {"E"}),
    ("The correct answers are A and C", {"A", "C"}),
    ("Answer: A, B, D", {"A", "B", "D"}),
    ("The answer is C because TSH screens for hypothyroidism.", {"C"}),
    ("The best option is B.", {"B"}),
    # Bare and weak replies
    ("B", {"B"}),
    ("B.", {"B"}),
    ("(B)", {"B"}),
    ("B. 肺炎链球菌", {"B"}),
    ("B\n\n解析：铁锈色痰是肺炎链球菌肺炎的典型表现。", {"B"}),
    ("A项错误，选项B正确。", {"B"}),
    ("I think B is correct.", {"B"}),
    ("A and C are correct.", {"A", "C"}),
    # Traps: letters in reasoning, restatements, English capitals, echoed stems
    ("A is wrong because it is too slow. B is also wrong. The answer is C.", {"C"}),
    (OPTIONS_EN + "Therefore, the answer is B.", {"B"}),
    ("A patient with fatigue needs thyroid screening first. Answer: B", {"B"}),
    ("Answer: A patient this age rarely needs an ECG, so the answer is B.", {"B"}),
    ("答案：A\n等等，重新考虑，铁锈色痰更支持肺炎链球菌。\n答案：B", {"B"}),
    ("The answer is C, and A is incorrect because CBC is nonspecific.", {"C"}),
    ("答案是B，D项错误因为军团菌少见。", {"B"}),
    (STEM_ZH + "\n答案：B", {"B"}),
    (STEM_EN + "Answer:\nB", {"B"}),
    ("I think the answer is D.", {"D"}),
    # Unsure: None
    ("", None),
    ("   \n ", None),
    ("答案：F", None),  # letter outside the options
    ("The answer is B or C.", None),  # hedges between options
    ("答案是A或C", None),
    ("A项：可能。\nB项：也有可能。\nC项：不太像。", None),  # no conclusion
    (OPTIONS_EN, None),  # enumeration with no conclusion
    ("A正确……再想想，C正确", None),  # weak signals that disagree
    (STEM_ZH, None),  # echoed stem without an answer
    (STEM_EN, None),
    ("A patient with these symptoms needs further workup.", None),
    ("I think it depends on the clinical context.", None),
    ("The answer is Aspirin.", None),
    # Lowercase letters where the reply plainly commits; never the article "a" in running text
    ("the answer is d", {"D"}),
    ("Ans: (c)", {"C"}),
    ("the answer is a.", {"A"}),
    ("Answer: (a)", {"A"}),
    ("The answer is d because the others are contraindicated.", {"D"}),
    ("the answer is a patient-specific decision.", None),
    ("So the answer is a combination of factors.", None),
    # JSON answers
    ('{"final_answer": "C"}', {"C"}),
    ('```json\n{"answer": ["A", "C"]}\n```', {"A", "C"}),
    ('{"reasoning": "Option A is classic but wrong here.", "answer": "D"}', {"D"}),
    ('{"answer": "B or C"}', None),
    # Space-separated multi-answers, the letter after the option text, bare "选 E 项"
    ("答案：B C E", {"B", "C", "E"}),
    ("正确答案为急性胰腺炎（C项）", {"C"}),
    ("The answer is thyroid-stimulating hormone (B).", {"B"}),
    ("选 E 项", {"E"}),
    ("综上所述，选 E 项。", {"E"}),
    ("若选A，则无法解释发热。", None),
    # Headings and LaTeX
    ("## 最终答案\n**D. 肝硬化**", {"D"}),
    ("### Answer\nC. Coronary artery aneurysms", {"C"}),
    ("The correct answer is:\n\nB. TSH", {"B"}),
    ("The answer is $\\mathrm{B}$.", {"B"}),
    ("答案：\\text{B}", {"B"}),
    ("Final answer: $\\boxed{\\text{C}}$", {"C"}),
    # Self-correction: the last stated answer wins
    ("起初选A……故答案应改为C", {"C"}),
    ("The answer is C.\n\nWait, let me reconsider. Actually, the answer is D.", {"D"}),
    ("<think>So the answer is D.</think>\nAnswer: A", {"A"}),
    ("<think>\nThe answer is B.\n</think>\n\nC", {"C"}),
    # No option is correct, a cut-off marker, an "incorrect answer": None
    ("None of the options are correct", None),
    ("以上都不对", None),
    ("C. E. None of these options are correct.", None),
    ("The answer is B. However, none of the options is entirely correct.", None),
    ("答案：E. 以上都不是", {"E"}),  # the option text of E, not a claim
    ('{"choice": "E. None of the above"}', {"E"}),
    ("The correct answer is:", None),
    ("答案：B\n\n最终答案：", None),
    ("The incorrect answer is: B", None),
    ("不正确的选项是B", None),
    # Hedges and acronyms
    ("The answer is B or maybe C.", None),
    ("答案是B或者C", None),
    ("The answer is CBC.", None),  # a test name, not options C and B
    ("The answer is ACE inhibitor therapy.", None),
    ("The correct answer is B12 deficiency.", None),
    ("The answer is C-reactive protein.", None),
    # Degenerate lists are not answers
    ("### Plan:\n1. Define C, A, D, B, E, C, D, D, E, B, A, C are correct", None),
    ("A、B、C、D、E、A、B、C、D、E、A正确", None),
    # Seen in SmolLM2-135M replies (tests/fixtures/replies/smollm2.jsonl)
    ("A. 8–12 weeks\nB. 16–20 weeks\nC. 24–28 weeks\n\nThe answer is option D.", {"D"}),
    ("选择：D. 增生性炎\n\nD. 增生性炎：\n\nD. 增生性炎：", {"D"}),
    ("A. 胆总管结石\nB. 急性肝炎\nC. 胰头癌\nD. 壶腹癌\nE.", None),  # the option list, cut off
    ("D. 肺癌\n\nE. 支气管哮喘\n\nA.", None),
    ("答案：A. 房颤\nB. 变异型心绞痛\nC. 室性早搏\nE. 心绞痛", None),  # "答案：" heads an echoed list
    ("A. 27%\nthe most appropriate answer is\nA. 43%\nAnswer = True. So,\nD = True, the answer is wrong", None),
    ("Answer — B", {"B"}),
    ("A. 癫痫大发作\nB. 严重心律失常\nC. 左心功能衰竭\n\n**A. 癫痫大发作**\n\n癫痫大发作最常见。", {"A"}),
    ("**A. CBC**\nNonspecific.\n**B. TSH**\nScreens the thyroid.", None),  # a bolded option list
    ("D. 肾病\n选项：D\n\nD. 肾病\n选项：D", {"D"}),
    ("OPTIONS：A. 冠心病   B. 高血压性心脏   C. 风心病", None),
    ("选项：A. 冠心病   B. 高血压性心脏   C. 风心病", None),
    ("The answer to the question is A. Hypotension.", {"A"}),
    ("The antidote for acetaminophen overdose is **A**.", {"A"}),
    ("There is no answer that matches the given options. The correct answer is C. Hepatitis B", {"C"}),
    (  # four different answers in a row: going through the options, not answering
        "The correct answer is D. Bradykinin.\n\nThe correct answer is E. Beta-2 blockade.\n\n"
        "The correct answer is C. Histamine.\n\nThe correct answer is A. Aldosterone.",
        None,
    ),
    ("The answer is B. Wait, no: the answer is C. Hmm, in summary the answer is A.", {"A"}),
    ("We can reorder the options: A, B, C, and D, which is D, as it is the most common cause.", None),
    # The weak family in more shapes
    ("Both A and C are correct.", {"A", "C"}),
    ("Options A, C, and D are correct.", {"A", "C", "D"}),
    ("A正确，但C也正确？不确定。", None),
    ("B is the best answer here because epinephrine is first-line.", {"B"}),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extract_answer(text: str, expected: set[str] | None) -> None:
    assert extract_answer(text) == expected


def test_enough_realistic_cases() -> None:
    assert len(CASES) >= 45


def test_letters_limit_the_valid_options() -> None:
    four = ["A", "B", "C", "D"]
    assert extract_answer("答案：E", four) is None
    assert extract_answer("答案：D", four) == {"D"}
    assert extract_answer("Answer: A, E", four) is None  # one bad letter spoils the set


def test_grade_exact_set_match() -> None:
    assert grade({"A", "B"}, "AB") is True
    assert grade({"B", "A"}, ["A", "B"]) is True
    assert grade({"A", "B"}, "A,B") is True
    assert grade({"A"}, "AB") is False
    assert grade({"A", "B", "C"}, "AB") is False
    assert grade(None, "A") is False


def test_extract_then_grade() -> None:
    assert grade(extract_answer("故选A、C"), "AC") is True
    assert grade(extract_answer("故选A"), "AC") is False
    assert grade(extract_answer("no idea"), "A") is False


# ---- the strict reader for training data ---------------------------------------------------

COMMITTED = [
    ("### Plan\nThyroid first.\n### Reasoning\nB screens for it.\nAnswer: B", {"B"}),
    ("### 思路\n多选题。\n### 推理\nA、C正确。\n答案：A、C", {"A", "C"}),
    ("答案: D", {"D"}),
    ("答案：Ｅ", {"E"}),  # full-width letter and colon
    ("答案：Ａ、Ｃ", {"A", "C"}),
    ("**Answer:** B", {"B"}),
    ("**Answer: B**", {"B"}),
    ("Answer: A, C", {"A", "C"}),
    ("Answer: AC", {"A", "C"}),
    ("Answer: B.", {"B"}),
    ("答案：B。", {"B"}),
    ("ANSWER: C", {"C"}),
    ("Final answer: C", {"C"}),
    ("Reasoning...\nAnswer: B\n\n\n", {"B"}),  # trailing blank lines are not a line
    # Not the student's own answer line: None
    ("Answer: B because TSH screens for thyroid disease.", None),
    ("Answer: B or C", None),
    ("Answer: A and C", None),
    ("Answer: F", None),
    ("Answer: A, A", None),
    ("Answer:", None),
    ("Answer: the patient needs TSH", None),
    ("The answer is B", None),
    ("故选B", None),
    ("B", None),
    ("<answer>B</answer>", None),
    ("Answer: B\n\nHope this helps!", None),
    ("答案：B\n解析：铁锈色痰提示肺炎链球菌。", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), COMMITTED)
def test_committed_answer(text: str, expected: set[str] | None) -> None:
    assert committed_answer(text) == expected


def test_committed_answer_respects_letters() -> None:
    assert committed_answer("Answer: E", "ABCD") is None
    assert committed_answer("Answer: D", ["A", "B", "C", "D"]) == {"D"}


# ---- held-out realistic replies --------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "replies"


def _fixture_rows() -> list[dict]:
    return [json.loads(line) for path in sorted(FIXTURES.glob("*.jsonl")) for line in path.open(encoding="utf-8")]


def test_heldout_realistic_replies_read_right() -> None:
    """Replies labelled by reading them: real model output (SmolLM2 through ``medcritical.evaluate``,
    greedy and sampled) plus hand-written replies in other models' styles."""
    rows = _fixture_rows()
    assert len(rows) >= 150
    assert sum(r["source"] != "synthetic" for r in rows) >= 100
    for r in rows:
        assert set(r) == {"text", "letters", "expected", "source"}
        assert r["expected"] is None or r["expected"] == sorted(r["expected"])
    misses = [
        (r["source"], r["text"][-120:], r["expected"])
        for r in rows
        if extract_answer(r["text"], r["letters"]) != (set(r["expected"]) if r["expected"] else None)
    ]
    accuracy = 1 - len(misses) / len(rows)
    assert accuracy >= 0.95, f"{accuracy:.1%} read right; misses: {misses[:10]}"


def test_strict_reader_agrees_with_the_grader() -> None:
    """A reply the strict reader accepts as committed is graded as that answer too."""
    texts = [r["text"] for r in _fixture_rows()] + [t for t, _ in CASES + COMMITTED]
    for text in texts:
        committed = committed_answer(text)
        assert committed is None or extract_answer(text) == committed, text


# ---- the graders cannot hang -------------------------------------------------------------------

SEPARATORS = [", ", "、", " and ", "/", " ", "和", " or ", ",", "; ", "，"]
ENDINGS = ["", "正确", "正确吗", " are correct", " is the best answer", " is not correct", "。答案：", "\nAnswer: "]
WALLS = [
    "(",
    "(((((",
    "答案",
    "答案答案答案：",
    "**********",
    "Answer: ",
    "Answer: Answer: Answer:",
    "A",
    "A ",
    "A、",
    "A正确",
    "B is correct ",
    "<answer>",
    "\\boxed{",
    '"answer": ',
    '{"answer": ["A", ',
    "选",
    "，选A",
    "\n",
    "None of the options are correct. ",
    "A. ",
    "(A)",
    "option ",
    "$\\mathrm{",
    "【",
    "答案：A或",
    "The answer is ",
    "<think>",
    "</think>",
    "and ",
    "A and ",
    "I think ",
    "以上都不对",
]


def _degenerate_replies() -> list[str]:
    """Letter lists with every separator, markers and brackets in walls, 20,000-character replies."""
    replies = []
    for sep in SEPARATORS:
        for n in (18, 40, 400):
            letters = sep.join(("CADBE" * 100)[:n])
            for ending in ENDINGS:
                replies.append("### Plan:\n1. Define " + letters + ending)
                replies.append("答案：" + letters + ending)
    replies += [(wall * (20_000 // len(wall) + 1))[:20_000] for wall in WALLS]
    replies.append("患者发热咳嗽，A项可能，B项也可能。" * 1_000 + "\n答案：B")
    replies.append("The answer is B. " * 1_200)
    return replies


_TIMER = """
import json, sys, time
from medcritical.grading import committed_answer, extract_answer
from tests.test_grading import _degenerate_replies
worst = (0.0, "", "")
for text in _degenerate_replies():
    for fn in (extract_answer, committed_answer):
        t0 = time.process_time()
        fn(text)
        worst = max(worst, (time.process_time() - t0, fn.__name__, text[:60]))
print(json.dumps(worst))
"""


def test_degenerate_replies_cannot_hang_the_graders() -> None:
    """A hang guard, not a speed claim: each call must take under a second of CPU time.

    The calls run in a child process with a time limit, so a grader that backtracks forever
    fails this test instead of hanging it; CPU time rather than wall time, so busy neighbours
    on a shared machine do not count against the grader.
    """
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", _TIMER], cwd=root, capture_output=True, text=True, timeout=300, check=True
    )
    seconds, name, text = json.loads(out.stdout)
    assert seconds < 1.0, f"{name} took {seconds:.2f} s on {text!r}"


# ---- no pattern can backtrack without bound -------------------------------------------------

try:  # Python 3.11+
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants
    import sre_parse

_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT} | (
    {sre_constants.POSSESSIVE_REPEAT} if hasattr(sre_constants, "POSSESSIVE_REPEAT") else set()
)


def _children(op, av) -> list:
    """The sub-patterns under one parsed node."""
    if op in _REPEATS:
        return [av[2]]
    if op == sre_constants.SUBPATTERN:
        return [av[-1]]
    if op == sre_constants.BRANCH:
        return list(av[1])
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [av[1]]
    if op == sre_constants.GROUPREF_EXISTS:
        return [p for p in av[1:] if p is not None]
    if hasattr(sre_constants, "ATOMIC_GROUP") and op == sre_constants.ATOMIC_GROUP:
        return [av]
    return []


def _repetition_problems(pattern: str, max_bound: int = 200, max_nested: int = 1_000) -> list[str]:
    """Why a pattern could backtrack without bound: an unbounded quantifier over a group that
    itself repeats (``(?:X+)*``), any unbounded quantifier at all (this module bounds every
    one), or nested bounded quantifiers whose bounds multiply past ``max_nested``."""
    problems = []

    def walk(sub, outer: int) -> bool:
        repeats = False
        for op, av in sub:
            if op in _REPEATS:
                repeats = True
                bound = av[1]
                unbounded = bound == sre_constants.MAXREPEAT
                inner = walk(av[2], outer * (max_nested + 1 if unbounded else max(bound, 1)))
                if unbounded:
                    kind = "nested unbounded repetition" if inner else "unbounded repetition"
                    problems.append(f"{kind} in {pattern!r}")
                elif bound > max_bound:
                    problems.append(f"bound {bound} > {max_bound} in {pattern!r}")
                elif outer > 1 and outer * bound > max_nested:
                    problems.append(f"nested bounds multiply past {max_nested} in {pattern!r}")
            else:
                for child in _children(op, av):
                    repeats |= walk(child, outer)
        return repeats

    walk(sre_parse.parse(pattern), 1)
    return problems


def test_the_repetition_check_catches_backtracking_patterns() -> None:
    assert _repetition_problems(r"(?:a+)*b")
    assert _repetition_problems(r"[A-Z](?:[ ,]*(?:and)?[ ,]*[A-Z])*正确")  # the old weak family, in short
    assert _repetition_problems(r"x[^<]*y")
    assert _repetition_problems(r"(?:(?:a{0,50}){0,50})")
    assert not _repetition_problems(r"答案[ \t:]{0,3}(?:[A-Z](?:[ \t]{0,2}[,、][ \t]{0,2}[A-Z]){0,9})")


def test_grading_patterns_have_bounded_repetition() -> None:
    patterns = [v for v in vars(grading).values() if isinstance(v, re.Pattern)]
    assert len(patterns) >= 10  # the check looks at the real patterns
    problems = [problem for p in patterns for problem in _repetition_problems(p.pattern)]
    assert not problems, problems
