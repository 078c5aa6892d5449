"""Read the final answer a model gave to a multiple-choice exam question, and grade it.

Models answer in free text ("故选C", "The answer is (C)", "\\boxed{AC}", ``{"answer": "C"}``, a
bare "B"), and they name option letters while reasoning. Accuracy numbers and preference pairs
are only honest if the grader reads the answer the model *committed to* and says "unsure"
(``None``) otherwise, so a vague reply is never credited by luck.

Two readers:

* :func:`extract_answer` is the lenient reader for evaluation. Statements are grouped into
  families from strong to weak: answer tags / ``\\boxed`` / JSON answer fields, explicit answer
  markers ("答案：", "the answer is", "故选"), a line that is only the answer, the "B is
  correct" family (which must be unanimous), and a reply that is one echoed option. The
  strongest family that matches decides; inside it the last statement wins, because models
  restate and correct themselves.
* :func:`committed_answer` is the strict reader that decides whether a reply may be a
  ``chosen`` training example: only the student's own ``Answer: X`` / ``答案：X`` last line.

Both run in time linear in the reply, by construction: every quantifier in every regular
expression here has an explicit bound (so one match attempt reads at most a few hundred
characters; a test checks the patterns), and letter groups ("A、C", "B and D") are read by a
small scanner that looks a bounded number of characters ahead. Small models emit walls of
letters ("C, A, D, B, E, C, ...") on which a backtracking grader hangs.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import NamedTuple

MAX_LETTERS = 10  # no exam has more options; a longer letter list is noise, not an answer
# In the key of every step that grades (evaluations, rollouts, corrections, pairs, teacher replies, parity):
# bump it when either reader would read some reply differently, so grades made by the old reader are redone.
GRADER_VERSION = 1

# ---- normalization ---------------------------------------------------------------------

# LaTeX letter wrappers ("$\mathrm{B}$", "\text{B}") are unwrapped; markdown emphasis, code
# ticks and math delimiters are dropped, so "**Answer:** B" reads like "Answer: B".
_LATEX_WRAP = re.compile(r"\\(?:mathrm|mathbf|mathit|textbf|textit|text|operatorname)[ \t]{0,2}\{([^{}\n]{0,40})\}")
_DROP = ("*", "`", "$", "\r")


# A whole line in bold that echoes one option, "**A. 癫痫大发作**", is how models mark their
# choice; when a reply has exactly one such line it is read as the bare letter ("A"). Several
# are a bolded option list.
_BOLD_OPTION = re.compile(r"(?m)^[ \t]{0,4}\*\*[ \t]{0,2}\(?([A-Z])[.、:)][^*\n]{1,80}\*\*[ \t]{0,2}$")


def _normalize(text: str) -> str:
    # NFKC folds full-width letters and punctuation from Chinese input methods ("Ｂ", "：",
    # "，", "（") to ASCII so the rules need only one spelling.
    text = unicodedata.normalize("NFKC", text)
    text = _LATEX_WRAP.sub(r"\1", text)
    for delim in ("\\(", "\\)", "\\[", "\\]"):
        text = text.replace(delim, " ")
    bold = _BOLD_OPTION.findall(text) if "**" in text else []
    if len(bold) == 1:
        text = _BOLD_OPTION.sub(r"\1", text)
    for mark in _DROP:
        if mark in text:
            text = text.replace(mark, "")
    return text.strip()


# ---- the letter-group scanner ------------------------------------------------------------

_OPENS = "([【"
_CLOSES = ")]】"
# Words that may follow an option letter in English ("A and C", "A because ..."). After the
# article "A" / pronoun "I" any other lowercase word means English, not an option.
_CONNECTIVES = frozenset("and or because since as is was are were which so then".split())
_SEP_CHARS = ",、/;&+"
_SEP_WORDS = ("以及", "或者", "和", "与", "及", "或")
_HEDGES = ("或者", "或", "or")


def _word_char(c: str) -> bool:
    return c.isascii() and c.isalnum()


def _skip_blanks(text: str, i: int, limit: int = 3) -> int:
    end = min(len(text), i + limit)
    while i < end and text[i] in " \t":
        i += 1
    return i


def _word_at(text: str, i: int, limit: int = 12) -> str:
    """The ASCII-letter word starting at i (at most ``limit`` letters, lowercased)."""
    j = i
    end = min(len(text), i + limit)
    while j < end and text[j].isascii() and text[j].isalpha():
        j += 1
    return text[i:j].lower()


def _english_word_follows(text: str, k: int) -> bool:
    """True if a lowercase/numeric word that is not a connective follows position k."""
    j = _skip_blanks(text, k)
    if j == k or j >= len(text):
        return False
    if text[j].isdigit():
        return True
    return text[j].islower() and text[j].isascii() and _word_at(text, j) not in _CONNECTIVES


class _Item(NamedTuple):
    letters: str
    end: int


def _item(text: str, i: int, lower_ok: bool) -> _Item | None:
    """One option at i: optional "选项"/"option " prefix, brackets, letters, brackets, "项" suffix.

    Capitals inside words ("Aspirin", "HBsAg", "B12") do not count; a run of several capitals
    counts only in option order ("ABD", not "CBC" or "TSH") and not as an acronym before a
    word ("ACE inhibitors"). Lowercase letters count only when ``lower_ok`` (right after an
    explicit marker) and set off: "(c)", "d.", "d because", never "a patient".
    """
    n = len(text)
    j = i
    if j >= n or not (text[j].isascii() and text[j].isalpha() or text[j] in _OPENS or text[j] == "选"):
        return None
    if text.startswith("选项", j):
        j += 2
    elif text[j : j + 7].lower() == "option " and (j == 0 or not _word_char(text[j - 1])):
        j = _skip_blanks(text, j + 7)
    opened = 0
    while j < n and opened < 2 and text[j] in _OPENS:
        j = _skip_blanks(text, j + 1)
        opened += 1
    if j >= n or (j > 0 and _word_char(text[j - 1])):
        return None
    k = j
    while k < n and k - j <= MAX_LETTERS and text[k].isascii() and text[k].isalpha():
        k += 1
    run = text[j:k]
    if not run or len(run) > MAX_LETTERS:
        return None
    if k < n and (text[k].isdigit() or (text[k] in "'’-" and k + 1 < n and text[k + 1].isalpha())):
        return None  # "B12", "A's", "C-reactive"
    end, probe, closed = k, _skip_blanks(text, k, 2), 0
    while probe < n and closed < 2 and text[probe] in _CLOSES:
        end, closed = probe + 1, closed + 1
        probe = _skip_blanks(text, end, 2)
    if run.isupper():
        if len(run) > 1 and (any(a >= b for a, b in zip(run, run[1:])) or _english_word_follows(text, k)):
            return None
        if run in ("A", "I") and not closed and (text[k : k + 1] in ("'", "’") or _english_word_follows(text, k)):
            return None
    elif not (lower_ok and len(run) == 1):
        return None
    elif not (opened or closed or _sets_off(text, k)):
        return None
    # "C项", "E 项", "B选项" name the option too.
    j = _skip_blanks(text, end, 1)
    for suffix in ("选项", "项"):
        if text.startswith(suffix, j):
            end = j + len(suffix)
            break
    return _Item(run.upper(), end)


def _sets_off(text: str, k: int) -> bool:
    """A lowercase letter at k-1 stands alone: end, punctuation, or a connective follows."""
    j = _skip_blanks(text, k)
    if j >= len(text) or text[j] in ".,;:!?。,、)]\n":
        return True
    return j > k and _word_at(text, j) in _CONNECTIVES


def _sep(text: str, i: int) -> tuple[int, bool] | None:
    """A separator between two options at i: (end, is_hedge), or None."""
    j = _skip_blanks(text, i)
    spaced = j > i
    punct = j < len(text) and text[j] in _SEP_CHARS
    if punct:
        j = _skip_blanks(text, j + 1)
    for word in _SEP_WORDS:
        if text.startswith(word, j):
            return _skip_blanks(text, j + len(word)), word in _HEDGES
    word = _word_at(text, j, 4)
    if word in ("and", "or") and (punct or spaced):
        return _skip_blanks(text, j + len(word)), word == "or"
    return (j, False) if punct or spaced else None


class _Group(NamedTuple):
    letters: str
    end: int
    bad: bool  # hedges between options, or runs on past MAX_LETTERS


def _new_clause(text: str, k: int) -> bool:
    """After a letter: "is wrong", "项错误", "不对" start a new clause about another option."""
    j = _skip_blanks(text, k)
    return _word_at(text, j, 6) in ("is", "are", "was", "were") or text[j : j + 1] in ("错", "不")


def _hedge_follows(text: str, k: int) -> bool:
    """ "B or maybe C", "B或者C": a trailing alternative after the group."""
    j = _skip_blanks(text, k)
    if text[j : j + 1] == ",":
        j = _skip_blanks(text, j + 1)
    for word in _HEDGES:
        if text[j : j + len(word)].lower() == word and (word != "or" or not _word_char(text[j + 2 : j + 3])):
            j = _skip_blanks(text, j + len(word))
            for filler in ("maybe ", "possibly ", "perhaps ", "可能是", "可能", "是"):
                if text[j : j + len(filler)].lower() == filler:
                    j = _skip_blanks(text, j + len(filler))
                    break
            return _item(text, j, lower_ok=False) is not None
    return False


def _group(text: str, i: int, *, lower_ok: bool = False, clause_stop: bool = False) -> _Group | None:
    """Options at i joined by separators: "B", "ABD", "A、C", "(a) and (c)", "B C E".

    ``clause_stop`` ends the group before a letter that starts a new clause ("C, and A is
    wrong"); the weak "A and C are correct" family needs that verb after its letters.
    """
    first = _item(text, i, lower_ok)
    if first is None:
        return None
    letters, end, bad = first.letters, first.end, False
    while True:
        sep = _sep(text, end)
        if sep is None:
            break
        nxt = _item(text, sep[0], lower_ok)
        if nxt is None or (clause_stop and _new_clause(text, nxt.end)):
            break
        if len(letters) + len(nxt.letters) > MAX_LETTERS:
            return _Group(letters, end, True)
        letters, end, bad = letters + nxt.letters, nxt.end, bad or sep[1]
    return _Group(letters, end, bad or _hedge_follows(text, end))


def _pick(group: _Group, valid: set[str]) -> set[str] | None:
    found = set(group.letters)
    return None if group.bad or not found <= valid else found


# ---- families ------------------------------------------------------------------------------


class _Hit(NamedTuple):
    start: int
    end: int  # end of the letters, so a "None of the above" echoed right after them is theirs
    pick: set[str] | None


_TAG = re.compile(r"<answer>[ \t\n]{0,3}(?P<b>[^<]{0,200})</answer>", re.I)
_BOXED = re.compile(r"\\boxed[ \t]{0,2}\{[ \t]{0,2}(?P<b>[^{}\n]{0,80})\}")
_JSON = re.compile(
    r'"(?:final_?answers?|final answer|answers?|correct_?answers?|correct_?options?|choice|selected_?option)"'
    r'[ \t]{0,3}:[ \t\n]{0,3}(?:"(?P<b>[^"\n]{0,80})"|\[(?P<l>[^\[\]]{0,120})\])',
    re.I,
)
_JSON_STR = re.compile(r'"([^"\n]{0,40})"')


def _body_pick(body: str, valid: set[str]) -> set[str] | None | bool:
    """Letters that open a tag/box/JSON value ("E", "A, C", "c", "B. TSH"); False if none."""
    body = body.strip()
    g = _group(body, 0, lower_ok=True) if body else None
    if g is None or (g.end < len(body) and body[g.end] not in " .、:)\t\n"):
        return False
    return _pick(g, valid)


def _tagged(text: str, valid: set[str]) -> _Hit | None:
    """The last ``<answer>`` tag, ``\\boxed{}`` or JSON answer field that holds letters."""
    best = None
    for pattern in (_TAG, _BOXED, _JSON):
        for m in reversed(list(pattern.finditer(text))):
            if best is not None and m.start() < best.start:
                break
            if m.group("b") is not None:
                pick = _body_pick(m.group("b"), valid)
            else:  # a JSON list: every string in it must be one letter group
                picks = [_body_pick(s, valid) for s in _JSON_STR.findall(m.group("l"))]
                ok = picks and all(isinstance(p, set) for p in picks)
                pick = set().union(*picks) if ok else (False if not picks else None)
            if pick is not False:
                best = _Hit(m.start(), m.end(), pick)
                break
    return best


def _words(*words: str) -> list[str]:
    """Each word as written, Capitalized and in CAPITALS, after a word boundary. Every
    alternative of the patterns built from these starts with a plain character, so the regex
    engine jumps to the places where one can begin instead of trying each at every position
    (ten times faster on real replies)."""
    spellings = dict.fromkeys(w for word in words for w in (word, word.capitalize(), word.upper()))
    return [f"{w[0]}(?<![A-Za-z0-9_]{w[0]}){re.escape(w[1:])}" for w in spellings]


# Explicit answer statements. Chinese "选" needs a conclusion word before it ("故选C") or must
# open a clause ("，选 E 项。", "选择：D", "选项：D"), because "选" also appears in stems
# ("请选择：A. ...", "选项：A. 冠心病 B. 高血压").
_CONCLUSIONS = "故 所以 因此 因而 应当 应该 应 当 本题 此题 该题 综上所述 综上 最终 最后 我 则 改".split()
# After "answer": "s", "to the question", then "is"/"are"/":", or the end of the line (a heading).
_ANSWER_THEN = (
    r"(?i:s?(?:[ \t]{1,3}to[ \t]{1,3}(?:the|this|your)[ \t]{1,3}question)?[ \t]{0,3}"
    r"(?:(?:is|are|would be|should be|will be)\b|[:=—–]|-(?![a-z])|(?=[ \t]{0,3}\n)))"
)
_MARKER = re.compile(
    "|".join(
        [
            *("最终答案", "正确答案", "参考答案", "标准答案", "答案", r"答(?=[ \t]{0,3}:)", "正确的?选项"),
            *(rf"{w}[ \t]{{0,2}}选择?(?!项)" for w in _CONCLUSIONS),
            r"选(?<![^\s,.;:!?。]选)(?:(?P<bare>)(?![项择])|择(?=[ \t]{0,2}:)|(?P<opt>项)(?=[ \t]{0,2}:))",
            *(w + _ANSWER_THEN for w in _words("answer")),  # "answer:", "answers are", "answer to the question is"
            *(w + r"[ \t]{1,3}(?i:answer)" + _ANSWER_THEN for w in _words("final")),
            *(w + r"\.?[ \t]{0,2}[:=]" for w in _words("ans")),
            *(
                w + r"(?i:[ \t]{1,3}(?:option|choice|response|letter)s?[ \t]{0,3}(?:is|are|would be|should be|[:=]))"
                for w in _words("correct", "right", "best", "final")
            ),
            *(
                w + r"(?i:[ \t]{1,3}(?:would[ \t]{1,3}|will[ \t]{1,3}|'ll[ \t]{1,3})?(?:choose|select|pick|go with)\b)"
                for w in _words("i")
            ),
        ]
    )
)
# What may sit between a marker and the letters ("答案应该是：", "answer is likely option").
_FILLER = re.compile(
    r"[ \t:=\"'“”‘’\]】>—–-]{0,6}"
    r"(?:(?:应该|应当|应|就|仍然|仍|当|则)?(?:改为|改选|是|为|选择|选)[ \t:\"'“”‘’]{0,3})?"
    r"(?:(?i:actually|likely|probably|clearly|definitely|therefore|thus|indeed|still|now|most likely)[ \t,]{1,3})?"
    r"(?:(?i:the[ \t]{1,2})?(?:选项|(?i:options?|choices?|letters?))[ \t:]{0,3})?"
)
# A marker whose letter comes after the option text: "正确答案为急性胰腺炎（C项）",
# "The answer is thyroid-stimulating hormone (B)", "答案是肺炎链球菌，即B".
_LOOSE = re.compile(
    "|".join(
        [
            *(
                rf"{re.escape(o)}[ \t]{{0,2}}(?:选项|(?i:option)[ \t]{{1,2}})?(?P<a{i}>[A-Za-z])"
                r"[ \t]{0,2}项?[ \t]{0,2}[)\]】]"
                for i, o in enumerate("([【")
            ),
            *(
                w + rf"[ \t]{{0,2}}(?P<b{i}>[A-Z])(?![A-Za-z0-9])"
                for i, w in enumerate(["即", "也就是", "选项", *_words("i.e.", "i.e.,", "namely", "option", "choice")])
            ),
            r"项(?=[ \t]{0,2}(?:[。.,;)\n]|$))",  # "C项": the letter is the character before
        ]
    )
)
_LOOSE_SPAN = 48
_NEGATORS = ("incorrect", "wrong", "not", "false", "isn't", "错误", "错误的", "不", "非")
_NEGATED_FILLER = re.compile(r"(?i:\bnot\b|n't\b)|不是")
# A line holding only a marker ("## 最终答案", "**Answer:**", "The correct answer is:").
_HEADING_PREFIX = re.compile(
    r"[#> \t]{0,8}(?i:(?:so|thus|therefore)?[, \t]{0,3}(?:the|my)?[ \t]{0,2}(?:correct|final|best|right)?[ \t]{0,2})"
)
_OPTION_LINE = re.compile(r"[ \t#>]{0,4}\(?[A-Z][.、:)]")
# An echoed option with its text, "B. 肺炎链球菌".
_OPTION_WITH_TEXT = re.compile(r"[ \t#>]{0,4}\(?(?P<l>[A-Z])[.、:)][ \t]{0,3}[^ \t\n]")


def _line_end(text: str, i: int, limit: int) -> int:
    j = text.find("\n", i, i + limit)
    return j if j >= 0 else min(len(text), i + limit)


def _next_line(text: str, i: int) -> tuple[int, int] | None:
    """(start, end) of the first non-empty line after the line holding i (two blank lines at most)."""
    j = _line_end(text, i, 400)
    for _ in range(3):
        if j >= len(text) or text[j] != "\n":
            return None
        start = j + 1
        while start < min(len(text), j + 40) and text[start] in " \t#>":
            start += 1
        end = _line_end(text, start, 400)
        if end > start:
            return start, end
        j = end
    return None


def _after_heading(text: str, m: re.Match[str], pos: int, valid: set[str]) -> _Hit | None:
    """ "## 最终答案\\nD. 肝硬化", "Answer:\\nB": the marker is alone on its line, the answer below."""
    if text[pos : _line_end(text, pos, 40)].strip(" \t:"):
        return None
    line_start = text.rfind("\n", max(0, m.start() - 40), m.start()) + 1
    if (line_start == 0 and m.start() > 40) or not _HEADING_PREFIX.fullmatch(text, line_start, m.start()):
        return None
    nxt = _next_line(text, pos)
    if nxt is None:
        return None
    start, end = nxt
    g = _group(text, start)
    if g is None:
        return None
    rest = text[g.end : end].strip(" \t")
    if rest.strip(".。"):
        # "D. 肝硬化" echoes one option; "A. ...\nB. ..." below a marker is an option list.
        after = _next_line(text, end)
        if rest[0] not in ".、:)" or (after is not None and _OPTION_LINE.match(text, after[0])):
            return None
    return _Hit(start, g.end, _pick(g, valid))


def _negated(text: str, start: int) -> bool:
    """ "The incorrect answer is: B", "不正确的选项是B": not the answer."""
    before = text[max(0, start - 12) : start].rstrip(" \t").lower()
    return before.endswith(_NEGATORS)


def _strict(m: re.Match[str]) -> bool:
    """A clause-opening "选" or "选项：" marker, whose letters must end the statement."""
    return m.group("bare") is not None or m.group("opt") is not None


def _marked(text: str, valid: set[str]) -> _Hit | None:
    """The last explicit answer statement that names letters.

    A reply whose last statements name four different answers ("The correct answer is D. ...
    The correct answer is E. ... is C. ... is A.") is going through the options, not
    answering: None. Only the last 64 statements are looked at, which bounds the work on a
    wall of "选A，选A，...".
    """
    last = None
    seen: set[frozenset[str]] = set()
    for n, hit in enumerate(_marker_hits(text, valid)):
        last = last or hit
        if hit.pick:
            seen.add(frozenset(hit.pick))
        if len(seen) >= 4:
            return _Hit(last.start, last.end, None)
        if n == 63:
            break
    return last


def _marker_hits(text: str, valid: set[str]) -> Iterator[_Hit]:
    """Explicit answer statements from the last to the first. Each marker costs a few bounded
    steps, so a wall of markers with nothing after them stays linear."""
    loose: list[re.Match[str]] | None = None  # found on first need: most markers have their letters
    for m in reversed(list(_MARKER.finditer(text))):
        if _negated(text, m.start()):
            continue
        pos = _FILLER.match(text, m.end()).end()
        g = _group(text, pos, lower_ok=True, clause_stop=True) if pos < len(text) else None
        strict = _strict(m)
        if g is not None and strict:
            # A bare "选" must be a whole statement: "选 E 项。", not "选A的理由是"; "选项：D" must
            # end its line, or it heads the options ("选项：A. 冠心病 B. 高血压").
            tail = _skip_blanks(text, g.end)
            if tail < len(text) and text[tail] not in ("。\n" if m.group("opt") is not None else "。.,;!\n"):
                g = None
        if g is not None and not _fronts_option_list(text, g):
            yield _Hit(m.start(), g.end, _pick(g, valid))
            continue
        if g is not None or strict:
            continue
        if loose is None:
            loose = list(_LOOSE.finditer(text))
        hit = _loose(text, pos, loose, valid) or _after_heading(text, m, pos, valid)
        if hit is not None:
            yield _Hit(m.start(), hit.end, hit.pick)


def _fronts_option_list(text: str, g: _Group) -> bool:
    """ "答案：A. 房颤\\nB. 变异型心绞痛\\nC. ...": the marker heads an echoed option list, and the
    next line goes on with a later option, so A is the list's first item, not an answer."""
    if len(g.letters) != 1 or text[g.end : g.end + 1] not in (".", "、", ":", ")"):
        return False
    nl = text.find("\n", g.end, g.end + 400)
    m = _OPTION_WITH_TEXT.match(text, nl + 1) if nl >= 0 else None
    return m is not None and m.group("l") > g.letters


def _loose(text: str, pos: int, loose: list[re.Match[str]], valid: set[str]) -> _Hit | None:
    """The first letter-after-the-option-text form within the marker's sentence."""
    end = _line_end(text, pos, _LOOSE_SPAN)
    for stop in ("。", ". ", "? ", "! "):
        cut = text.find(stop, pos, end)
        end = cut if cut >= 0 else end
    for m in loose[bisect.bisect_left(loose, pos, key=lambda m: m.start()) :]:
        if m.end() > end:
            return None
        letter = next((g for g in m.groups() if g), None)
        if letter is None:  # "C项": the letter is the character before "项"
            c, before = text[m.start() - 1], text[m.start() - 2 : m.start() - 1]
            if m.start() <= pos or not (c.isascii() and c.isupper() and not _word_char(before)):
                continue
            letter = c
        if _NEGATED_FILLER.search(text, pos, m.start()):
            return None
        letter = letter.upper()
        return _Hit(pos, m.end(), {letter} if letter in valid else None)
    return None


def _dangling(text: str) -> bool:
    """The reply ends on a marker with nothing after it ("The correct answer is:"): cut off."""
    tail_start = max(0, len(text) - 60)
    last = None
    for m in _MARKER.finditer(text, tail_start):
        last = m
    if last is None or _strict(last) or _negated(text, last.start()):
        return False
    pos = _FILLER.match(text, last.end()).end()
    # A bare "答案" ("这就是答案。") ends a sentence; "答案：", "answer is", "故选" open one.
    opens = pos > last.end() or not last.group().endswith("答案")
    return opens and not text[pos:].strip(" \t\n:.。")


# What such a line can hold (a cheap filter before the scanner reads it).
_ANSWER_LINE = re.compile(r"[A-Za-z \t()\[\]【】,、/;&+和与及或者以选项.。]{1,60}")
_OPTION_WORD = re.compile(r"(?i:option|choice)|选项")


def _answer_lines(text: str, valid: set[str]) -> _Hit | None:
    """The last line that is nothing but the answer: "B", "B.", "(B)", "A, C", "> **D**"."""
    end = len(text)
    while end > 0:
        line_start = text.rfind("\n", 0, end) + 1
        start, line_end, end = line_start, end, line_start - 1
        heading = False
        while start < line_end and text[start] in " \t#>":
            heading = heading or text[start] == "#"
            start += 1
        if not _ANSWER_LINE.fullmatch(text, start, line_end):
            continue
        # "### Option B" or "Option B" over more text: the title of that option's analysis, not an answer
        # (a reply cut off right after such a title ends on it).
        if _OPTION_WORD.search(text, start, line_end) and (heading or text[line_end:].strip()):
            continue
        g = _group(text, start)
        rest = text[g.end : line_end].strip(" \t") if g is not None else "-"
        if rest.strip(".。"):
            continue
        # Next to an echoed option it is that list going on; "E." (an option label) even
        # after a blank line: small models echo the options until they are cut off.
        prev = _previous_line(text, line_start, skip_blank=bool(rest))
        if prev is not None and _OPTION_WITH_TEXT.match(text, *prev):
            continue
        if line_end < len(text) and _OPTION_WITH_TEXT.match(text, line_end + 1):
            continue
        return _Hit(start, g.end, _pick(g, valid))
    return None


def _previous_line(text: str, line_start: int, skip_blank: bool) -> tuple[int, int] | None:
    """(start, end) of the line before the one at ``line_start`` (past two blank lines if asked)."""
    for _ in range(3):
        if line_start == 0:
            return None
        end = line_start - 1
        line_start = text.rfind("\n", 0, end) + 1
        if not (skip_blank and not text[line_start:end].strip()):
            return line_start, end
    return None


# The weak family: "选项B正确", "A and C are correct", "B is the best answer". Letters are
# searched backwards from the verb within a bounded window.
_WEAK = re.compile(
    "|".join(
        [
            r"正确(?!吗|与否)",
            *(
                w + r"(?i:[ \t]{1,3}(?:the[ \t]{1,3})?(?:most[ \t]{1,3})?(?:correct|right|best|answer)\b)"
                for w in _words("is", "are")
            ),
        ]
    )
)
_WEAK_WINDOW = 60
# "The most likely diagnosis is C.", "The antidote is **A**.": a letter that ends the sentence.
_IS_LETTER = re.compile(
    "|".join(w + r"[ \t]{1,3}(?:option[ \t]{1,2})?(?=[(\[]?[A-Z])" for w in _words("is", "are", "was", "would be"))
)
_SENTENCE_END = re.compile(r"[ \t]{0,2}(?:[.。!]|\n|$)")


def _continues_left(text: str, s: int) -> bool:
    """Is the group starting at s the tail of a longer letter list ("..., B, A are correct")?"""
    j = s - 1
    while j >= max(0, s - 4) and text[j] in " \t":
        j -= 1
    if j < 0 or not (text[j] in _SEP_CHARS or text[j] in "和与及或" or text[max(0, j - 2) : j + 1] == "and"):
        return False
    j -= 3 if text[j] == "d" else 1
    while j >= max(0, s - 9) and text[j] in " \t":
        j -= 1
    return j >= 0 and text[j].isupper() and text[j].isascii() and (j == 0 or not _word_char(text[j - 1]))


_GROUP_CHARS = frozenset(" \t" + _OPENS + _CLOSES + _SEP_CHARS + "和与及或以者选项andoptiAOND")


def _weak(text: str, valid: set[str]) -> list[_Hit]:
    """Every weak statement, in order (the family counts only when they all agree)."""
    hits = []
    for m in _WEAK.finditer(text):
        # Where the letters must end: before "(也)(是)正确" or the blanks before "is correct".
        verb = m.start()
        if text[verb] == "正":
            for words in ("是为", "也均都亦"):
                if verb > 0 and text[verb - 1] in words:
                    verb -= 1
            floor = verb - 2
        else:
            floor = verb - 3
        while verb > max(0, floor) and text[verb - 1] in " \t":
            verb -= 1
        if verb == m.start() and text[verb] != "正":
            continue  # "is" must follow a blank
        # Walk back over characters a letter group can hold, then read groups forward from the
        # leftmost option there: the first that ends right at the verb is the longest.
        left = verb
        while left > max(0, verb - _WEAK_WINDOW) and (text[left - 1] in _GROUP_CHARS or text[left - 1].isupper()):
            left -= 1
        for s in range(left, verb):
            if not (text[s].isupper() or text[s] in _OPENS or text[s] in "选o"):
                continue
            g = _group(text, s)
            if g is not None and g.end == verb:
                pick = None if _continues_left(text, s) else _pick(g, valid)
                hits.append(_Hit(s, g.end, pick))
                break
    for m in _IS_LETTER.finditer(text):
        g = _group(text, m.end())
        if g is not None and _SENTENCE_END.match(text, g.end):
            hits.append(_Hit(m.start(), g.end, _pick(g, valid)))
    return sorted(hits, key=lambda h: (h.start, h.end))


_ECHO = re.compile(r"\(?(?P<g>[A-Z])[.、:)]")


def _echoed_option(text: str, valid: set[str]) -> _Hit | None:
    """The whole reply is one option echoed with its text: "B. 肺炎链球菌"."""
    m = _ECHO.match(text)
    if m is None or "\n" in text:
        return None
    return _Hit(0, m.end("g"), {m.group("g")} if m.group("g") in valid else None)


# ---- "no option is correct" ----------------------------------------------------------------

# Claims that no option is right ("None of these options are correct", "以上选项都不正确") undo
# an earlier answer; "None of the above" / "以上都不是" are also common option texts, so those
# count only when they are not echoed after an option letter ("E. None of the above").
_NONE_CLAIM = re.compile(
    "|".join(
        [
            *(
                w + r"(?i:[ \t]{1,2}of[ \t]{1,2}(?:the[ \t]{1,2})?(?:these|those|them|the)?[ \t]{0,2}"
                r"(?:given[ \t]{1,2}|listed[ \t]{1,2}|provided[ \t]{1,2}|answer[ \t]{1,2})?"
                r"(?:options|choices|answers)?[ \t]{0,2}(?:provided[ \t]{1,2}|given[ \t]{1,2}|listed[ \t]{1,2})?"
                r"(?:is|are|seems?|appears?)[ \t]{1,2}(?:to[ \t]{1,2}be[ \t]{1,2})?(?:[a-z]{2,12}ly[ \t]{1,2})?"
                r"(?:correct|right|true|valid|accurate|appropriate))"
                for w in _words("none")
            ),
            *(w + r"(?i:[ \t]{1,2}(?:correct|right|valid)[ \t]{1,2}(?:answer|option|choice))" for w in _words("no")),
            *(
                w + r"(?i:[ \t]{1,2}(?:of[ \t]{1,2}the[ \t]{1,2})?(?:options|choices|answers)[ \t]{1,2}(?:are|is)"
                r"[ \t]{1,2}(?:incorrect|wrong|false))"
                for w in _words("all", "each")
            ),
            *(w + "(?:选项|答案)?(?:都|均|全)(?:不对|不正确|错误|是错的|不是正确)" for w in ("以上", "所有", "各")),
            "没有(?:一个)?正确(?:的)?(?:答案|选项)",
            "无正确(?:答案|选项)",
        ]
    )
)
_NONE_LABEL = re.compile(
    "|".join(
        [
            *(w + r"(?i:[ \t]{1,2}of[ \t]{1,2}the[ \t]{1,2}above\b)" for w in _words("none")),
            "以上(?:都|均)不(?:是|对)",
            "以上皆非",
        ]
    )
)
_LABEL_BEFORE = re.compile(r"\(?[A-Z][.、:)][ \t]{0,2}$")
_ATTACHED = re.compile(r"[ \t]{0,2}[.、:)]?[ \t]{0,2}")


def _denied(text: str, hit: _Hit) -> bool:
    """Does a "no option is correct" statement come after the deciding answer?"""
    for pattern in (_NONE_CLAIM, _NONE_LABEL):
        for m in pattern.finditer(text, hit.start):
            if m.start() >= hit.end and _ATTACHED.fullmatch(text, hit.end, m.start()):
                continue  # "答案：E. 以上都不是": the answer's own option text
            if pattern is _NONE_LABEL and _LABEL_BEFORE.search(text[max(0, m.start() - 6) : m.start()]):
                continue  # an echoed option "E. None of the above"
            return True
    return False


# ---- public API ----------------------------------------------------------------------------


def _decide(text: str, valid: set[str]) -> tuple[bool, set[str] | None]:
    """(whether any answer statement was found, what it says).

    Families from strong to weak; the first that has a statement decides. Inside a family the
    last statement wins, except for the weak "B is correct" family, which must be unanimous.
    """
    if _dangling(text):
        return True, None
    for family in (_tagged, _marked, _answer_lines):
        hit = family(text, valid)
        if hit is not None:
            return True, None if _denied(text, hit) else hit.pick
    hits = _weak(text, valid)
    if hits and any(h.pick != hits[0].pick for h in hits):
        return True, None
    hit = hits[-1] if hits else _echoed_option(text, valid)
    if hit is None:
        return False, None
    return True, None if _denied(text, hit) else hit.pick


def _valid(letters: Iterable[str]) -> set[str]:
    return {
        (letter if letter.isascii() else unicodedata.normalize("NFKC", letter)).strip().upper() for letter in letters
    }


def extract_answer(text: str, letters: Iterable[str] = "ABCDE") -> set[str] | None:
    """Return the set of option letters the model finally answered, or None when unsure.

    ``letters`` are the question's valid options ("ABCDE" or ["A", "B", "C", "D"]). A final
    statement naming any other letter gives None rather than a partial answer, since the
    model evidently did not answer this question's options. None also when the reply hedges
    ("B or C"), names no option, or says that no option is correct.
    """
    valid = _valid(letters)
    text = _normalize(text)
    # Reasoning models think first; what follows the last </think> is the reply proper.
    cut = text.rfind("</think>")
    if cut >= 0 and text[cut + 8 :].strip():
        found, pick = _decide(text[cut + 8 :].strip(), valid)
        if found:
            return pick
    return _decide(text, valid)[1]


_COMMITTED = re.compile(
    r"[ \t#>]{0,4}(?:(?i:(?:final[ \t]{1,2})?answer)|(?:最终)?答案)[ \t]{0,2}:[ \t]{0,3}"
    r"(?P<g>[A-Z]{1,10}|[A-Z](?:[ \t]{0,2}[,、][ \t]{0,2}[A-Z]){1,9})[ \t]{0,2}[.。]?[ \t]{0,2}"
)


def committed_answer(text: str, letters: Iterable[str] = "ABCDE") -> set[str] | None:
    """The letters on the reply's last non-empty line, if that line is the student's answer line.

    The strict reader for training data: a ``chosen`` example must end the way the student is
    taught to end, ``Answer: B`` / ``答案：A、C`` (also ``**Answer:** B``, ``Final answer: AC``,
    full-width letters and colon, a trailing period). Anything else gives None: no such last
    line, a hedge, text after the letters, a repeated letter, or a letter outside ``letters``.
    """
    valid = _valid(letters)
    text = _normalize(text)
    m = _COMMITTED.fullmatch(text[text.rfind("\n") + 1 :])
    if m is None:
        return None
    found = [c for c in m.group("g") if c.isalpha()]
    if len(set(found)) < len(found) or not set(found) <= valid:
        return None
    return set(found)


def grade(predicted: set[str] | None, gold: Iterable[str]) -> bool:
    """True only when the predicted set equals the gold set exactly.

    Multi-answer questions give no partial credit: choosing {A} for gold "AB" is wrong on a
    real exam too. ``gold`` may be "AB", ["A", "B"] or "A,B"; separators are ignored so
    answer columns from data files work unchanged. An unsure prediction (None) is wrong.
    """
    if predicted is None:
        return False
    return predicted == {c for c in "".join(gold).upper() if c.isalpha()}
