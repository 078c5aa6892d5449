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

from .artifacts import sha256_json

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
# What follows a reply that ends without an answer line, so the model chooses among the option letters
# (``rounds.force_answer``): the answer line's own words, after a blank line.
ANSWER_CUE = {lang: "\n\n" + h[2] for lang, h in HEADINGS.items()}


def lead(lang: Lang) -> str:
    """How a rollout's reply starts (``rounds.rollouts.lead``): the layout's first heading."""
    return HEADINGS[lang][0] + "\n"


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


# Section headings as teachers really write them: any markdown heading level, a bold label, or a
# "Label:" line, in Chinese or English, with the usual synonyms. Parsed by structure, line by line.
_PLAN_LABELS = (
    "思路|解题思路|总体思路|整体思路|分析思路|解题计划|计划|规划|高层计划|概要|解题方法|方法|知识点"
    "|plan|high-level plan|overall plan|approach|strategy|overview|outline|key points|knowledge points"
)
_REASONING_LABELS = (
    "推理|推理过程|详细推理|详细步骤|解题步骤|步骤|逐步分析|逐项分析|选项分析|详细分析|分析|解析"
    "|reasoning|detailed reasoning|step-by-step reasoning|step-by-step analysis|step by step|step-by-step"
    "|steps|analysis|detailed analysis|option analysis|options analysis|solution|detailed steps"
)
_ANSWER_LABELS = "答案|最终答案|结论|answer|final answer|conclusion"
# One line: optional markdown heading marks, optional bold, an optional number ("1.", "一、"), the
# label, optional closing bold, an optional colon, then the rest of the line. Every repetition is
# bounded, so a line is matched in time linear in its length.
_HEADING = re.compile(
    r"^[ \t]{0,3}(?P<hash>#{1,6}[ \t]{0,4})?(?P<bold>\*\*|__)?[ \t]{0,2}(?:(?:\d{1,2}|[一二三四五])[.)、．][ \t]{0,2})?"
    rf"(?P<label>{_PLAN_LABELS}|{_REASONING_LABELS}|{_ANSWER_LABELS})"
    r"[ \t]{0,2}(?P<close>\*\*|__)?[ \t]{0,2}(?P<colon>[:：])?[ \t]{0,2}(?:\*\*|__)?(?P<rest>[^\n]*)$",
    re.IGNORECASE,
)
_KINDS = (
    ("plan", re.compile(rf"(?:{_PLAN_LABELS})", re.I)),
    ("reasoning", re.compile(rf"(?:{_REASONING_LABELS})", re.I)),
    ("answer", re.compile(rf"(?:{_ANSWER_LABELS})", re.I)),
)
# A final answer statement ("故选C。", "The answer is C.", "Therefore, the correct answer is B"), cut from the
# steps because the target's own answer line replaces it.
_ANSWER_TAIL = re.compile(
    r"^[\W_]{0,6}(?:(?:故|所以|因此|综上所述?|最终|本题)[，, ]{0,2}(?:应)?(?:答案|选|正确答案)|答案|正确答案"
    r"|(?i:(?:so|thus|therefore|hence)?[, ]{0,2}(?:the )?(?:final |correct |best )?(?:answer|option|choice)\b))"
)


def _heading(line: str) -> tuple[str, str] | None:
    """(kind, rest of the line) when ``line`` is a section heading, else None.

    A line counts as a heading when it is a markdown heading, a bold label, or
    ``Label:``; a sentence that merely starts with a label word ("Analysis shows
    that ...") does not.
    """
    if len(line) > 200:
        return None
    m = _HEADING.match(line)
    if not m or not (m["hash"] or (m["bold"] and m["close"]) or m["colon"]):
        return None
    if m["rest"].strip() and not (m["colon"] or m["hash"]):
        return None
    label = m["label"]
    kind = next(k for k, pat in _KINDS if pat.fullmatch(label))
    return kind, m["rest"].strip()


def split_template(text: str, lang: Lang | None = None) -> tuple[str, str] | None:
    """A reply in the template layout -> (plan, steps), or None when it has no such layout.

    Inverse of :func:`render_template`, tolerant of how teachers and students
    really write: any heading level (``## 思路``), bold labels (``**Plan**``,
    ``**Step-by-step analysis:**``), ``Label:`` lines, Chinese or English
    synonyms, in either language whatever ``lang`` is (kept for callers; the
    layout is found by structure). The *last* plan heading followed by a
    reasoning heading wins: a correction that quotes the wrong trajectory first
    and then answers again keeps only its new template. The steps end at an
    answer heading or at the final answer line, which is re-rendered from the
    parsed answer so every target ends the same way.
    """
    lines = text.splitlines()
    heads = [(i, h) for i, line in enumerate(lines) if (h := _heading(line)) is not None]
    for b in range(len(heads) - 1, 0, -1):
        j, (kind, rest_j) = heads[b]
        if kind != "reasoning" or heads[b - 1][1][0] != "plan":
            continue
        a = b - 1
        while a > 0 and heads[a - 1][1][0] == "plan":  # "### Plan" then "Approach:" inside it: one section
            a -= 1
        i, (_, rest) = heads[a]
        end = next((k for k, h in heads[b + 1 :] if h[0] in ("answer", "plan")), len(lines))
        plan = "\n".join([rest, *lines[i + 1 : j]]).strip()
        body = [rest_j, *lines[j + 1 : end]]
        while body and not body[-1].strip():
            body.pop()
        if len([x for x in body if x.strip()]) > 1 and _ANSWER_TAIL.match(body[-1]) and len(body[-1]) < 120:
            body.pop()  # the final answer line: re-rendered from the parsed answer
        steps = "\n".join(body).strip()
        if plan and steps:
            return plan, steps
    return None


def split_reasoning(text: str, reasoning: str = "") -> tuple[str, str]:
    """A reasoning model's reply -> (its chain of thought, what it wrote after it).

    The chain is the ``<think>...</think>`` block, or everything before
    ``</think>`` (QwQ's chat template opens ``<think>`` inside the prompt, so its
    replies often carry only the closing tag), or the API's separate reasoning
    field (``reasoning``, vLLM's ``reasoning_content``). A ``<think>`` that never
    closes means the reply was cut off while thinking: it has no answer part.
    """
    if "</think>" in text:
        head, tail = text.rsplit("</think>", 1)
        head = head.split("<think>", 1)[1] if "<think>" in head else head
        return (reasoning + "\n" + head).strip() if reasoning else head.strip(), tail.strip()
    if "<think>" in text:
        before, thought = text.split("<think>", 1)
        return (reasoning + "\n" + thought).strip() if reasoning else thought.strip(), before.strip()
    return reasoning.strip(), text.strip()


def with_reasoning(reasoning: str, template: str) -> str:
    """The SFT target with the teacher's long chain of thought kept (``teach.reasoning: keep``):
    the chain in a ``<think>`` block, then the template."""
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{template}" if reasoning.strip() else template


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
    stated: bool = True,
) -> list[dict[str, str]]:
    """Ask the model to review a trajectory, find the faulty step and redo it.

    With ``hint="wrong"`` the prompt says the answer is wrong (the key is never
    given); with ``"none"`` it only asks for a careful review. A trajectory
    that never ``stated`` an answer (it stopped, or was cut off, before its
    answer line) is shown as it is and the prompt says exactly that.
    """
    msgs = question_messages(question, options, multi, lang)
    if not stated:
        verdict = {"zh": "这个解答没有给出最终答案。", "en": "This answer never states a final answer."}[lang]
    elif lang == "zh":
        verdict = "这个解答是错误的。" if hint == "wrong" else "请检查这个解答是否正确。"
    else:
        verdict = "This answer is wrong." if hint == "wrong" else "Check whether this answer is correct."
    if lang == "zh":
        ask = (
            f"下面是对这道题的一个解答：\n\n{wrong_answer}\n\n{verdict}"
            "请找出其中有错误的推理步骤，说明错在哪里，然后按“### 思路”“### 推理”重新作答，"
            "最后一行写“答案：”加选项字母。"
        )
    else:
        ask = (
            f"Here is an answer to this question:\n\n{wrong_answer}\n\n{verdict} Find the faulty "
            'reasoning step, explain the error, then answer again with "### Plan" and '
            '"### Reasoning" sections, ending with a line "Answer: " and the option letter(s).'
        )
    return msgs + [{"role": "user", "content": ask}]


def langs_of(records: Iterable[Any], setting: str) -> list[Lang]:
    """The languages ``records`` (questions) are asked in under the recipe's ``language`` setting."""
    return sorted({choose_lang(r.question, setting) for r in records})


def prompt_wording(records: Iterable[Any], setting: str) -> dict[str, str]:
    """Per language ``records`` are asked in, a hash of every prompt the student is given (system prompt,
    instructions, correction prompt) and of the layout it answers in, for the keys of the steps that use them:
    a reworded Chinese prompt redoes what Chinese questions made, and nothing in an English-only run."""
    opts = {"A": "a", "B": "b"}
    return {
        lang: sha256_json(
            [question_messages("Q", opts, multi, lang) for multi in (False, True)]
            + [correction_messages("Q", opts, False, lang, "W", hint) for hint in ("none", "wrong")]
            + [correction_messages("Q", opts, False, lang, "W", stated=False), ANSWER_CUE[lang], lead(lang)]
            + [render_template("P", "S", "A", lang)]
        )
        for lang in langs_of(records, setting)
    }


def render(tokenizer: Any, messages: list[dict[str, str]], generation: bool = True) -> str:
    """Messages -> prompt text with the model's own chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
