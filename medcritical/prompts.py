"""Prompts for every stage, in Chinese or English, through the chat template.

All prompts are lists of chat messages; :func:`render` turns them into text with
the tokenizer's own chat template, so training, evaluation and the GGUF
(which carries the same template) format prompts identically.

The student's answer layout (the SFT target, see :func:`render_template`)::

    ### Plan
    <knowledge points and general approach>
    ### Reasoning
    <step-by-step analysis of each option>
    Answer: B

with ``### 思路`` / ``### 推理`` / ``答案：B`` in Chinese. The last line is what
:func:`medcritical.grading.extract_answer` reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

Lang = Literal["zh", "en"]
_CJK = re.compile(r"[\u4e00-\u9fff]")

SYSTEM = {
    "zh": "你是一名严谨的医学专家。请先给出解题思路，再逐项分析选项，最后一行写出答案。",
    "en": (
        "You are a careful medical expert. First outline your approach, then reason "
        "step by step through the options, and give the final answer on the last line."
    ),
}
_INSTRUCT = {
    "zh": {
        "single": "以下是一道单项选择题，只有一个正确答案。",
        "multi": "以下是一道多项选择题，有两个或以上正确答案。",
        "tail": "请按“### 思路”“### 推理”作答，最后一行写“答案：”加选项字母。",
    },
    "en": {
        "single": "The following is a multiple-choice question with exactly one correct option.",
        "multi": "The following is a multiple-choice question with two or more correct options.",
        "tail": (
            'Answer with a "### Plan" and a "### Reasoning" section, and end with a line '
            '"Answer: " followed by the option letter(s).'
        ),
    },
}
HEADINGS = {"zh": ("### 思路", "### 推理", "答案："), "en": ("### Plan", "### Reasoning", "Answer: ")}


def detect_lang(text: str) -> Lang:
    return "zh" if _CJK.search(text) else "en"


def choose_lang(question: str, setting: str) -> Lang:
    """``setting`` is the recipe's ``language``: zh, en or auto (per question)."""
    return detect_lang(question) if setting == "auto" else setting  # type: ignore[return-value]


def format_question(question: str, options: dict[str, str]) -> str:
    lines = [question.strip()]
    lines += [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines)


def question_messages(question: str, options: dict[str, str], multi: bool, lang: Lang) -> list[dict[str, str]]:
    """The student's prompt: system message plus the question and options.

    Whether a question is multi-answer is part of the exam (CMExam marks
    多选题), so the prompt says it; the key itself never appears.
    """
    t = _INSTRUCT[lang]
    user = "\n\n".join([t["multi" if multi else "single"], format_question(question, options), t["tail"]])
    return [{"role": "system", "content": SYSTEM[lang]}, {"role": "user", "content": user}]


def answer_line(letters: Iterable[str], lang: Lang) -> str:
    return HEADINGS[lang][2] + "".join(sorted(letters))


def render_template(plan: str, steps: str, letters: Iterable[str], lang: Lang) -> str:
    """The SFT target: plan, reasoning and exactly one final answer line."""
    plan_h, steps_h, _ = HEADINGS[lang]
    return f"{plan_h}\n{plan.strip()}\n\n{steps_h}\n{steps.strip()}\n\n{answer_line(letters, lang)}"


def split_template(text: str, lang: Lang) -> tuple[str, str] | None:
    """Inverse of :func:`render_template` for a teacher's reply: (plan, steps).

    The final answer line is cut from the steps; it is re-rendered from the
    parsed answer so every target ends the same way.
    """
    plan_h, steps_h, _ = HEADINGS[lang]
    alt = HEADINGS["en" if lang == "zh" else "zh"]
    for p_h, s_h in ((plan_h, steps_h), alt[:2]):
        i, j = text.find(p_h), text.find(s_h)
        if 0 <= i < j:
            plan = text[i + len(p_h) : j].strip()
            steps = text[j + len(s_h) :].strip()
            steps = re.sub(r"\n[^\n]*(答案|[Aa]nswer)[^\n]*\s*$", "", "\n" + steps).strip()
            if plan and steps:
                return plan, steps
    return None


def teacher_messages(
    question: str, options: dict[str, str], multi: bool, lang: Lang, hint: Iterable[str] | None = None
) -> list[dict[str, str]]:
    """The teacher's prompt: write a plan and detailed reasoning.

    ``hint`` (the key) is only given in hinted mode; the teacher is told to
    reason as if it did not know it, and replies that reveal the hint are
    rejected by the teach stage.
    """
    msgs = question_messages(question, options, multi, lang)
    if lang == "zh":
        extra = (
            "请写出高质量的解题模板：“### 思路”部分概括本题涉及的知识点和这类题的一般解法；"
            "“### 推理”部分逐步分析每个选项的对错。"
        )
        if hint:
            extra += f"（供你参考：正确答案是{''.join(sorted(hint))}。请独立推理，不要提到你被告知了答案。）"
    else:
        extra = (
            'Write a high-quality solution template: in "### Plan" summarize the knowledge '
            'points and the general approach for this kind of question; in "### Reasoning" '
            "analyse every option step by step."
        )
        if hint:
            extra += (
                f" (For your reference only: the key is {''.join(sorted(hint))}. Reason "
                "independently and never mention that you were told the answer.)"
            )
    msgs[-1] = {"role": "user", "content": msgs[-1]["content"] + "\n\n" + extra}
    return msgs


def correction_messages(
    question: str,
    options: dict[str, str],
    multi: bool,
    lang: Lang,
    wrong_answer: str,
    hint: Literal["none", "wrong"] = "wrong",
) -> list[dict[str, str]]:
    """Ask the model to review a trajectory, find the faulty step and redo it.

    With ``hint="wrong"`` the prompt says the answer is wrong (the key is never
    given); with ``"none"`` it only asks for a careful review.
    """
    msgs = question_messages(question, options, multi, lang)
    if lang == "zh":
        verdict = "这个解答是错误的。" if hint == "wrong" else "请检查这个解答是否正确。"
        ask = (
            f"下面是对这道题的一个解答：\n\n{wrong_answer}\n\n{verdict}"
            "请找出其中有错误的推理步骤，说明错在哪里，然后按“### 思路”“### 推理”重新作答，"
            "最后一行写“答案：”加选项字母。"
        )
    else:
        verdict = "This answer is wrong." if hint == "wrong" else "Check whether this answer is correct."
        ask = (
            f"Here is an answer to this question:\n\n{wrong_answer}\n\n{verdict} Find the faulty "
            'reasoning step, explain the error, then answer again with "### Plan" and '
            '"### Reasoning" sections, ending with a line "Answer: " and the option letter(s).'
        )
    return msgs + [{"role": "user", "content": ask}]


def render(tokenizer: Any, messages: list[dict[str, str]], generation: bool = True) -> str:
    """Messages -> prompt text with the model's own chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
