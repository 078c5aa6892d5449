"""Tests for reading a model's final multiple-choice answer and grading it."""

from __future__ import annotations

import pytest

from medcritical.grading import extract_answer, grade

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
