"""Read the final answer a model gave to a multiple-choice exam question, and grade it.

Models answer in free text ("故选C", "The answer is (C)", "\\boxed{AC}", a bare "B"), and
they name option letters while reasoning. Accuracy numbers are only honest if the grader
reads the answer the model *committed to* and says "unsure" (``None``) otherwise, so a
vague reply is never credited by luck.

Patterns are grouped into families from strong (answer tags, explicit answer markers) to
weak (a bare letter, "选项B正确"). The strongest family that matches anywhere decides;
inside it the last match wins, because models restate and correct themselves.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# One option letter or a run like "ABD", optionally wrapped in brackets or markdown bold.
# The lookarounds keep capitals inside words ("Aspirin", "HBsAg") from counting, and the
# article "A" / pronoun "I" followed by an ordinary word ("A patient", "I think") is English,
# not an option, unless the word is a connective that typically follows a letter.
_ITEM = (
    r"[(\[【*]*(?<![A-Za-z])"
    r"(?!(?:A|I)(?:['’]|[ \t]+(?!(?:and|or|because|since|as|is|was)\b)[a-z0-9]))"
    r"[A-Z]{1,10}(?![A-Za-z])[)\]】*]*"
)
# Separators of a multi-letter answer: "A、B", "A, B", "A and C", "B和D". "or"/"或" is
# captured on purpose so that the parser can reject an answer that hedges between options.
_SEP = r"[ \t]*(?:[,、/&+;][ \t]*(?:(?:and|or)\b|和|与|及|或)?|(?:and|or)\b|和|与|及|或)[ \t]*"
# After an answer marker, a later letter that starts a new clause ("C, and B is wrong",
# "B，D项错误") is reasoning about another option, not part of the answer.
_NEW_CLAUSE = r"(?![ \t]*(?:(?:is|are|was|were)\b|(?:选项|项)?(?:错|不)))"
_GROUP = rf"{_ITEM}(?:{_SEP}{_ITEM}{_NEW_CLAUSE})*"
# The weak "A and C are correct" family needs the clause verb right after the letters.
_LOOSE_GROUP = rf"{_ITEM}(?:{_SEP}{_ITEM})*"

# Explicit answer statements. Conclusion words are required before Chinese "选" because a
# bare "选" also appears in question stems ("请选择：A. ...").
_MARKER = (
    r"答案|答(?=[ \t]*:)|正确选项"
    r"|(?:故|所以|因此|因而|应当|应该|应|本题|综上|最终|最后|我)[ \t]*选择?(?!项)"
    r"|(?i:\banswers?[ \t*]*(?:(?:is|are|would be|should be)\b|[:=])"
    r"|\b(?:correct|right|best)[ \t]+(?:option|choice)s?[ \t]+(?:is|are)\b)"
)
# What may sit between a marker and the letters ("答案应该是：", "answer is likely option").
# No newline: a marker at the end of an echoed stem must not grab the "A." option below it.
_FILLER = (
    r"[ \t:*_\"'“”】\]=]*(?:(?:应该|应当|应|就)?(?:是|为|选)[ \t:*]*)?"
    r"(?:(?i:likely|probably|clearly|therefore|thus)[ \t]+)?"
    r"(?:选项|(?i:options?|choices?))?[ \t]*"
)

# Each family: its patterns (each with a group "g" holding the letters) and whether all its
# matches must agree. Weak signals are unanimous because "A正确……C正确" in a reply with no
# conclusion is not a commitment to either.
_FAMILIES: tuple[tuple[tuple[re.Pattern[str], ...], bool], ...] = (
    (
        (
            re.compile(rf"<(?i:answer)>\s*(?P<g>{_GROUP})[^<]*</(?i:answer)>"),
            re.compile(rf"\\boxed\{{[ \t]*(?:\\text(?:bf)?\{{)?[ \t]*(?P<g>{_GROUP})[^{{}}\n]*\}}"),
        ),
        False,
    ),
    ((re.compile(rf"(?:{_MARKER}){_FILLER}(?P<g>{_GROUP})"),), False),
    # A line that is nothing but the answer: "B", "B.", "(B)", "**A, C**".
    ((re.compile(rf"(?m)^[ \t>#*]*(?P<g>{_GROUP})[ \t]*[.。]?[ \t*]*$"),), False),
    (
        (
            re.compile(rf"(?P<g>{_LOOSE_GROUP})[ \t]*(?:选项|项)?[ \t]*(?:是|为)?正确(?!吗)"),
            re.compile(
                rf"(?P<g>{_LOOSE_GROUP})[ \t]+(?:is|are)[ \t]+(?:the[ \t]+)?(?:most[ \t]+)?"
                r"(?:correct|right|best)\b"
            ),
        ),
        True,
    ),
    # The whole reply is one option echoed with its text: "B. 肺炎链球菌".
    ((re.compile(r"\A\(?(?P<g>[A-Z])[.、:)][^\n]*\Z"),), False),
)


def _parse(group: str, valid: set[str]) -> set[str] | None:
    """Turn a captured letter group into a set, or None if it hedges or names a bad letter."""
    if re.search(r"\bor\b|或", group):
        return None
    found = set(re.findall(r"[A-Z]", group))
    return found if found and found <= valid else None


def extract_answer(text: str, letters: Iterable[str] = "ABCDE") -> set[str] | None:
    """Return the set of option letters the model finally answered, or None when unsure.

    ``letters`` are the question's valid options ("ABCDE" or ["A", "B", "C", "D"]). A final
    statement naming any other letter gives None rather than a partial answer, since the
    model evidently did not answer this question's options.
    """
    valid = {letter.strip().upper() for letter in letters}
    # NFKC folds full-width letters and punctuation from Chinese input methods ("Ｂ", "：",
    # "，") to ASCII so the patterns need only one spelling.
    text = unicodedata.normalize("NFKC", text).strip()
    for patterns, unanimous in _FAMILIES:
        hits = sorted((m.start(), m.group("g")) for p in patterns for m in p.finditer(text))
        if not hits:
            continue
        picks = [_parse(group, valid) for _, group in (hits if unanimous else hits[-1:])]
        return picks[0] if all(pick == picks[0] for pick in picks) else None
    return None


def grade(predicted: set[str] | None, gold: Iterable[str]) -> bool:
    """True only when the predicted set equals the gold set exactly.

    Multi-answer questions give no partial credit: choosing {A} for gold "AB" is wrong on a
    real exam too. ``gold`` may be "AB", ["A", "B"] or "A,B"; separators are ignored so
    answer columns from data files work unchanged. An unsure prediction (None) is wrong.
    """
    if predicted is None:
        return False
    return predicted == {c for c in "".join(gold).upper() if c.isalpha()}
