"""Questions in, one normalized record out, and a split that never drifts.

Every source format (CMExam CSV, our JSONL, MedQA JSONL, a saved ``datasets``
table) becomes a list of :class:`MCQ`. A bad row is skipped and reported with
its row number, field and reason, so one broken line in a 60k-row file does
not stop a run; ``strict=True`` turns the first one into a :class:`UserError`.
The train/dev/test split hashes each id, so it stays the same across
processes, machines and Python versions, and adding rows never moves old ones.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import skills
from .errors import UserError
from .prompts import detect_lang
from .skills import rows as skills_rows

FORMATS = ("cmexam", "jsonl", "medqa", "hf-disk")
SPLITS = ("train", "dev", "test")

# Unicode spaces seen in real CMExam cells (no-break, em, ideographic space):
# the same text with a plain space, so tokenization and dedup do not differ.
_ODD_SPACE = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_ANSWER_SEP = re.compile(r"[\s,;、]")  # after NFKC: "A, B", "A、B", "Ａ，Ｂ" -> "AB"
_LETTER = re.compile(r"[A-Z]")
_CMEXAM_LINES = re.compile(r"\\n|\r\n|\r|\n")  # literal backslash-n or a real newline
_OPTION_SEP = " \t.．、:：)）"  # what may sit between an option's letter and its text


class BadRecord(ValueError):
    """A row that cannot become an :class:`MCQ`; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice question, the form every later stage reads."""

    id: str
    question: str
    options: dict[str, str]  # letter -> text, in letter order
    answer: tuple[str, ...]  # sorted letters, one or more, each a key of options
    explanation: str = ""
    source: str = ""

    @property
    def multi(self) -> bool:
        """True for multiple-answer questions, which are graded all-or-nothing."""
        return len(self.answer) > 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to JSONL (``answer`` as a list)."""
        return {
            "id": self.id,
            "question": self.question,
            "options": dict(self.options),
            "answer": list(self.answer),
            "explanation": self.explanation,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MCQ:
        """Validate and normalize a dict; raise :class:`BadRecord` naming the bad key.

        ``answer`` may be a list of letters or a string such as ``"AB"``; text is
        stripped; options are put in letter order. Every loader goes through
        here, so every format gets the same checks.
        """
        rid = _text(d, "id")
        question = _text(d, "question")
        if not rid:
            raise BadRecord("id", "empty")
        if not question:
            raise BadRecord("question", "empty")
        options = _options(d.get("options"))
        return cls(
            id=rid,
            question=question,
            options=options,
            answer=_answer(d.get("answer"), options),
            explanation=_text(d, "explanation", required=False),
            source=_text(d, "source", required=False),
        )


@dataclass(frozen=True)
class Skip:
    """A row left out: ``row`` is 1-based as an editor or spreadsheet shows it."""

    row: int
    field: str
    reason: str


@dataclass(frozen=True)
class LoadResult:
    """What loaded and what did not: the CLI reports ``skipped`` (:func:`describe_skips`)."""

    records: list[MCQ]
    skipped: list[Skip]


def _clean(s: str) -> str:
    return _ODD_SPACE.sub(" ", s).strip()


def _text(d: dict[str, Any], key: str, required: bool = True) -> str:
    value = d.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise BadRecord(key, "missing" if value is None else f"not a string: {value!r}")
    return _clean(value)


def _letter(raw: Any) -> str:
    """NFKC first, so a full-width ``Ｂ`` counts as ``B``."""
    return unicodedata.normalize("NFKC", raw).strip() if isinstance(raw, str) else ""


def _options(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise BadRecord("options", "missing" if raw is None else "not a letter -> text mapping")
    options: dict[str, str] = {}
    for key, value in raw.items():
        letter = _letter(key)
        if not _LETTER.fullmatch(letter):
            raise BadRecord("options", f"bad option letter {key!r}")
        if letter in options:
            raise BadRecord("options", f"duplicate option {letter}")
        if not isinstance(value, str):
            raise BadRecord("options", f"option {letter}: not a string")
        if not _clean(value):
            raise BadRecord("options", f"option {letter}: empty")
        options[letter] = _clean(value)
    if len(options) < 2:
        raise BadRecord("options", f"{len(options)} option(s), need at least 2")
    return dict(sorted(options.items()))


def _answer(raw: Any, options: dict[str, str]) -> tuple[str, ...]:
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        raw = ",".join(raw)
    if not isinstance(raw, str):
        raise BadRecord("answer", "missing" if raw is None else f"not letters: {raw!r}")
    letters = _ANSWER_SEP.sub("", _letter(raw))
    if not letters:
        raise BadRecord("answer", "empty")
    for letter in letters:
        if not _LETTER.fullmatch(letter):
            raise BadRecord("answer", f"bad answer letter {letter!r}")
        if letter not in options:
            raise BadRecord("answer", f"{letter} not among options {''.join(options)}")
    return tuple(sorted(set(letters)))


def _hash_id(prefix: str, question: str, options: str) -> str:
    return f"{prefix}-" + hashlib.sha1(f"{question}\n{options}".encode()).hexdigest()[:12]


def _renamed(err: BadRecord, names: dict[str, str]) -> BadRecord:
    """Report a field under the name it has in the user's file."""
    return BadRecord(names.get(err.field, err.field), err.reason)


# A loader yields (row, record or error, field to blame for a duplicate id).
_Rows = Iterator[tuple[int, MCQ | BadRecord, str]]

_CMEXAM_NAMES = {
    "question": "Question",
    "options": "Options",
    "answer": "Answer",
    "explanation": "Explanation",
}


def _cmexam_options(raw: str) -> dict[str, str]:
    """Split ``"A text\\nB text"`` (literal backslash-n, or real newlines) into a dict."""
    options: dict[str, str] = {}
    for line in _CMEXAM_LINES.split(raw):
        line = line.strip()
        if not line:
            continue
        letter = _letter(line[0])
        if not _LETTER.fullmatch(letter):
            raise BadRecord("options", f"line does not start with a letter: {line[:30]!r}")
        if letter in options:
            raise BadRecord("options", f"duplicate option {letter}")
        options[letter] = line[1:].lstrip(_OPTION_SEP)
    return options


def _read_cmexam(path: Path, source: str) -> _Rows:
    """CMExam's CSV. Row 1 is the header, so data starts at row 2 as in a spreadsheet."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("Question", "Options", "Answer") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"{path}: not a CMExam CSV: missing column(s) {', '.join(missing)}"
                f" (found: {', '.join(reader.fieldnames or []) or 'nothing'})"
            )
        for row, cells in enumerate(reader, start=2):
            question, opts = cells["Question"] or "", cells["Options"] or ""
            try:
                mcq = MCQ.from_dict(
                    {
                        "id": _hash_id("cmexam", question, opts),
                        # CMExam writes newlines as a literal backslash-n in every text cell.
                        "question": question.replace("\\n", "\n"),
                        "options": _cmexam_options(opts),
                        "answer": cells["Answer"] or "",
                        "explanation": (cells.get("Explanation") or "").replace("\\n", "\n"),
                        "source": source,
                    }
                )
            except BadRecord as e:
                yield row, _renamed(e, _CMEXAM_NAMES), "Question"
            else:
                yield row, mcq, "Question"


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRecord]]:
    """Objects by line number; blank lines are passed over but still counted."""
    with path.open(encoding="utf-8-sig") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield row, BadRecord("json", f"not valid JSON: {e.msg}")
                continue
            yield row, obj if isinstance(obj, dict) else BadRecord("json", "not an object")


def _read_jsonl(path: Path, source: str | None) -> _Rows:
    for row, obj in _json_lines(path):
        if isinstance(obj, dict):
            if source is not None:
                obj = {**obj, "source": source}
            try:
                obj = MCQ.from_dict(obj)
            except BadRecord as e:
                obj = e
        yield row, obj, "id"


def _read_medqa(path: Path, source: str) -> _Rows:
    """MedQA JSONL: ``answer_idx`` is the key letter, ``answer`` its text (unused)."""
    for row, obj in _json_lines(path):
        given = obj.get("id") if isinstance(obj, dict) else None
        dup_field = "question" if given is None else "id"
        if isinstance(obj, dict):
            try:
                mcq = MCQ.from_dict(
                    {
                        "id": "pending" if given is None else str(given),
                        "question": obj.get("question"),
                        "options": obj.get("options"),
                        "answer": obj.get("answer_idx"),
                        "source": source,
                    }
                )
            except BadRecord as e:
                obj = _renamed(e, {"answer": "answer_idx"})
            else:
                if given is None:  # hash the normalized text, as CMExam-style lines
                    lines = "\n".join(f"{k} {v}" for k, v in mcq.options.items())
                    mcq = replace(mcq, id=_hash_id("medqa", mcq.question, lines))
                obj = mcq
        yield row, obj, dup_field


def _read_hf_disk(path: Path, source: str | None) -> _Rows:
    """A ``save_to_disk`` directory with the normalized columns; row = index + 1."""
    ds = load_saved_dataset(path)
    for row, obj in enumerate(ds, start=1):
        # Arrow stores options as a struct with every letter any row uses; a
        # four-option row reads back with "E": None, which is no option at all.
        if isinstance(obj.get("options"), dict):
            obj["options"] = {k: v for k, v in obj["options"].items() if v is not None}
        if source is not None:
            obj["source"] = source
        try:
            yield row, MCQ.from_dict(obj), "id"
        except BadRecord as e:
            yield row, e, "id"


def load_saved_dataset(path: Path) -> Any:
    """A ``datasets`` folder saved with ``save_to_disk``: its one split (a folder of several is refused)."""
    import datasets  # slow to import: only when a saved folder is read

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{path}: not a saved datasets directory: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise UserError(f"{path}: holds splits {', '.join(ds)}; point at one of them ({path}/<split>)")
        ds = next(iter(ds.values()))
    return ds


def _sniff(path: Path) -> str:
    if path.is_dir():
        return "hf-disk"
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "cmexam"
    if suffix in (".jsonl", ".json"):
        for _, obj in _json_lines(path):
            return "medqa" if isinstance(obj, dict) and "answer_idx" in obj else "jsonl"
        return "jsonl"
    raise UserError(f"{path}: cannot tell the format from the name; choose one of {', '.join(FORMATS)}")


def load_questions(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    strict: bool = False,
    source: str | None = None,
) -> LoadResult:
    """Load a question file in any supported format as normalized :class:`MCQ` records.

    ``fmt="auto"`` picks by name: ``.csv`` is CMExam, a directory is a saved
    ``datasets`` table, ``.jsonl``/``.json`` is MedQA when its first object has
    ``answer_idx`` and our JSONL otherwise. Bad rows are skipped and listed in
    :attr:`LoadResult.skipped`; with ``strict`` the first one raises
    ``UserError("<path>: row <n>: <field>: <reason>")``. Rows are 1-based and
    count as the user sees them: a CSV's header is row 1, a JSONL row is its
    line number. A repeated id keeps the first row and skips the later one.
    ``source`` sets every record's source (default: the format name for CMExam
    and MedQA, the stored value for JSONL and hf-disk).
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file or directory")
    readers = {
        "cmexam": lambda: _read_cmexam(p, source if source is not None else "cmexam"),
        "jsonl": lambda: _read_jsonl(p, source),
        "medqa": lambda: _read_medqa(p, source if source is not None else "medqa"),
        "hf-disk": lambda: _read_hf_disk(p, source),
    }
    try:
        fmt = _sniff(p) if fmt == "auto" else fmt
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    if fmt not in readers:
        raise UserError(f"{path}: unknown format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    if fmt != "hf-disk" and p.is_dir():
        raise UserError(f"{path}: is a directory, not a {fmt} file")
    try:
        return _collect(path, readers[fmt](), strict)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def _collect(path: str | os.PathLike[str], rows: _Rows, strict: bool) -> LoadResult:
    records: list[MCQ] = []
    skipped: list[Skip] = []
    first_row: dict[str, int] = {}
    for row, item, dup_field in rows:
        if isinstance(item, MCQ) and item.id in first_row:
            item = BadRecord(dup_field, f"duplicate of row {first_row[item.id]}")
        if isinstance(item, BadRecord):
            if strict:
                raise UserError(f"{path}: row {row}: {item.field}: {item.reason}")
            skipped.append(Skip(row, item.field, item.reason))
            continue
        first_row[item.id] = row
        records.append(item)
    return LoadResult(records, skipped)


def describe_skips(result: LoadResult, path: str | os.PathLike[str], limit: int = 3) -> str | None:
    """One line for the CLI, e.g. ``data.csv: skipped 2 of 5811 rows (row 17: Answer: empty; ...)``.

    None when nothing was skipped, so the caller prints nothing.
    """
    if not result.skipped:
        return None
    total = len(result.records) + len(result.skipped)
    shown = [f"row {s.row}: {s.field}: {s.reason}" for s in result.skipped[:limit]]
    if len(result.skipped) > limit:
        shown.append("...")
    return f"{path}: skipped {len(result.skipped)} of {total} rows ({'; '.join(shown)})"


def _check_fractions(dev: float, test: float) -> None:
    if not (0 <= dev <= 1 and 0 <= test <= 1 and dev + test <= 1):
        raise UserError(f"split fractions dev={dev}, test={test}: each in [0, 1], sum at most 1")


def split_of(id: str, seed: int = 0, dev: float = 0.1, test: float = 0.1) -> str:
    """``"train"``, ``"dev"`` or ``"test"`` for one id, from sha256 of ``f"{seed}:{id}"``.

    A hash of the id alone (never Python's salted ``hash()``) keeps a question
    in the same split across runs, machines and file orderings, so a test
    question can never leak into a later training run.
    """
    _check_fractions(dev, test)
    digest = hashlib.sha256(f"{seed}:{id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < test:
        return "test"
    return "dev" if u < test + dev else "train"


def split_records(records: Iterable[MCQ], which: str, seed: int = 0, dev: float = 0.1, test: float = 0.1) -> list[MCQ]:
    """The records that :func:`split_of` puts in ``which``, in their original order."""
    if which not in SPLITS:
        raise UserError(f"unknown split {which!r}; choose one of {', '.join(SPLITS)}")
    return [r for r in records if split_of(r.id, seed, dev, test) == which]


def _line(record: MCQ) -> str:
    return json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"


def write_jsonl(records: Iterable[MCQ], path: str | os.PathLike[str]) -> None:
    """Write normalized JSONL atomically: a crash leaves the old file or none, never half.

    The bytes are the canonical lines of :func:`records_hash`, so the file's
    sha256 equals the hash recorded in a manifest.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as f:
            f.writelines(_line(r) for r in records)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def records_hash(records: Iterable[MCQ]) -> str:
    """sha256 over the canonical JSON lines: names the exact data a run used."""
    h = hashlib.sha256()
    for r in records:
        h.update(_line(r).encode())
    return h.hexdigest()


def skill_questions(n: int = 1200, seed: int = 0, skills: tuple[str, ...] = skills.SKILLS) -> list[MCQ]:
    """The generated skill questions (:mod:`medcritical.skills`) as MCQs, through the same checks as any file."""
    return [MCQ.from_dict(r) for r in skills_rows(n, seed, skills)]


def demo_path() -> Path:
    """The bundled 100-question demo set (normalized JSONL), for runs without data."""
    return Path(__file__).parent / "assets" / "demo.jsonl"


def load_recipe_data(cfg: Any, split: str = "all", console: Any = None) -> list[MCQ]:
    """Load every source of a recipe's ``data`` section and select one split.

    ``path: demo`` is the bundled demo set. Bad rows are skipped (or fatal
    with ``strict``) and each source's skip count is printed, never dropped
    silently.
    """
    records: list[MCQ] = []
    seen: set[str] = set()
    for src in cfg.sources:
        src = src if isinstance(src, dict) else src.model_dump()
        if src["path"] == "skills" or src["path"].startswith("skills:"):  # generated: medcritical.skills
            path = Path(src["path"])
            kinds = tuple(src["path"].partition(":")[2].split(",")) if ":" in src["path"] else skills.SKILLS
            if not set(kinds) <= set(skills.SKILLS):
                raise UserError(f"data.sources: {src['path']}: unknown skill; skills: {', '.join(skills.SKILLS)}")
            res = LoadResult(skill_questions(src.get("limit") or 1200, skills=kinds), [])
        else:
            path = demo_path() if src["path"] == "demo" else Path(src["path"])
            res = load_questions(path, fmt=src.get("format", "auto"), strict=cfg.strict)
        note = describe_skips(res, path)
        if note and console is not None:
            console.print(f"[yellow]{note}", highlight=False)
        new = [r for r in res.records if r.id not in seen]
        if len(new) < len(res.records) and console is not None:
            console.print(
                f"[yellow]{path}: {len(res.records) - len(new)} ids already loaded from an earlier source, skipped"
            )
        seen.update(r.id for r in new)
        if src.get("lang", "any") != "any":
            kept = [r for r in new if detect_lang(r.question) == src["lang"]]
            if console is not None:
                console.print(f"{path}: lang {src['lang']}: kept {len(kept)} of {len(new)} questions", highlight=False)
            new = kept
        records += new[: src.get("limit")] if src.get("limit") else new
    if split == "all":
        return records
    return split_records(records, split, seed=cfg.split_seed, dev=cfg.dev, test=cfg.test)


def eval_records(recipe: Any, console: Any = None) -> list[MCQ]:
    """The questions a recipe evaluates on: its ``eval.split``, at most ``eval.limit`` of them."""
    records = load_recipe_data(recipe.data, split=recipe.eval.split, console=console)[: recipe.eval.limit]
    if not records:
        raise UserError(f"eval: no questions in the {recipe.eval.split} split (check data.dev and the sources)")
    return records
