"""The standard medical benchmarks, read in the layout their publishers ship.

Each benchmark's own files (JSON, JSONL, CSV or parquet columns exactly as
published, or a ``datasets`` folder saved with ``save_to_disk``) become the
kit's :class:`~medcritical.data.MCQ` records through ``MCQ.from_dict``, so they
get the same checks as every other source. A file that is not the named
benchmark's schema is refused in one line naming the file and the missing
field; a bad row is skipped and reported by row and field, as in
:mod:`medcritical.data`. Nothing here downloads anything: the user points at
files obtained under each dataset's licence (docs/benchmarks-eval.md).

Ids are the benchmark's own where it has one, else ``<file stem>-<row>``: a
benchmark's repeated questions are kept (published numbers count them), and
an id never depends on the text.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import MCQ, BadRecord, LoadResult, _collect, _Rows, describe_skips, load_questions, load_saved_dataset
from .errors import UserError

LETTERS = "ABCDEFGHIJ"

# The medical subjects of the general exams, as their publishers name them (file names and `subject`).
MMLU_MEDICAL = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)
CEVAL_MEDICAL = ("basic_medicine", "clinical_medicine", "physician")
CMMLU_MEDICAL = (
    "anatomy",
    "clinical_knowledge",
    "college_medical_statistics",
    "college_medicine",
    "genetics",
    "nutrition",
    "professional_medicine",
    "traditional_chinese_medicine",
    "virology",
)

Row = dict[str, Any]


@dataclass(frozen=True)
class Bench:
    """One benchmark: how to recognize its files and turn one native row into an MCQ dict."""

    name: str
    title: str
    required: tuple[str, ...]  # fields every row has in the published schema
    convert: Callable[[Row, str, str], dict[str, Any]]  # (row, fallback id, subject) -> MCQ.from_dict input
    subjects: tuple[str, ...] = ()  # medical subjects of a multi-subject exam (files or a `subject` column)
    headerless: tuple[str, ...] = ()  # CSV without a header row: its columns, in order


def _letter_of(index: Any, field: str, n: int, base: int) -> str:
    """An option index (``base`` 0 or 1, as the file's publisher encodes it) as its letter."""
    if isinstance(index, bool) or not isinstance(index, int):
        if isinstance(index, str) and index.strip().lstrip("-").isdigit():
            index = int(index)
        else:
            raise BadRecord(field, "missing" if index is None else f"not an option number: {index!r}")
    if not base <= index < base + n:
        if index < base:
            raise BadRecord(field, f"{index}: no answer given (the unlabelled test split?)")
        raise BadRecord(field, f"{index}: expected {base}..{base + n - 1}")
    return LETTERS[index - base]


def _dict_options(raw: Any, field: str) -> dict[str, Any]:
    """Options as a letter -> text dict: a dict (Arrow structs add ``None`` for letters a row lacks,
    CMB leaves unused letters empty) or a list of ``{"key", "value"}`` pairs."""
    if isinstance(raw, list) and all(isinstance(x, dict) and {"key", "value"} <= x.keys() for x in raw):
        raw = {x["key"]: x["value"] for x in raw}
    if not isinstance(raw, dict):
        raise BadRecord(field, "missing" if raw is None else "not a letter -> text mapping")
    return {k: v for k, v in raw.items() if v is not None and not (isinstance(v, str) and not v.strip())}


def _str_id(row: Row, key: str, fallback: str) -> str:
    value = row.get(key)
    return fallback if value is None or str(value).strip() == "" else str(value)


def _medqa(row: Row, fallback: str, subject: str) -> dict[str, Any]:
    return {
        "id": _str_id(row, "id", fallback),
        "question": row.get("question"),
        "options": _dict_options(row.get("options"), "options"),
        "answer": row.get("answer_idx"),
    }


def _medmcqa(base: int) -> Callable[[Row, str, str], dict[str, Any]]:
    """MedMCQA's ``cop``: 1..4 in the publishers' JSON files, 0..3 in the Hugging Face copy."""

    def convert(row: Row, fallback: str, subject: str) -> dict[str, Any]:
        return {
            "id": _str_id(row, "id", fallback),
            "question": row.get("question"),
            "options": {"A": row.get("opa"), "B": row.get("opb"), "C": row.get("opc"), "D": row.get("opd")},
            "answer": _letter_of(row.get("cop"), "cop", 4, base),
            "explanation": row.get("exp") or "",
        }

    return convert


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


def _pubmedqa(row: Row, fallback: str, subject: str) -> dict[str, Any]:
    """``ori_pqal.json`` (PMID -> QUESTION, CONTEXTS, final_decision) or the Hugging Face columns
    (pubid, question, context.contexts, final_decision). The abstract's contexts come before the
    question, as in the reasoning-required setting."""
    if "QUESTION" in row:
        question, contexts, pid = row.get("QUESTION"), row.get("CONTEXTS"), "CONTEXTS"
    else:
        ctx = row.get("context")
        question, contexts, pid = row.get("question"), ctx.get("contexts") if isinstance(ctx, dict) else ctx, "context"
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise BadRecord(pid, "missing" if contexts is None else "not a list of passages")
    if not isinstance(question, str):
        raise BadRecord("QUESTION" if pid == "CONTEXTS" else "question", "missing")
    decision = row.get("final_decision")
    letter = {v: k for k, v in PUBMEDQA_OPTIONS.items()}.get(
        decision.strip().lower() if isinstance(decision, str) else ""
    )
    if letter is None:
        raise BadRecord("final_decision", f"expected yes, no or maybe, got {decision!r}")
    return {
        "id": _str_id(row, "pubid", fallback),
        "question": "Context:\n" + "\n".join(c.strip() for c in contexts) + f"\n\nQuestion: {question.strip()}",
        "options": dict(PUBMEDQA_OPTIONS),
        "answer": letter,
        "explanation": row.get("LONG_ANSWER") or row.get("long_answer") or "",
    }


def _mmlu(row: Row, fallback: str, subject: str) -> dict[str, Any]:
    """The publishers' CSV (question, A, B, C, D, answer letter; no header) or the Hugging Face
    columns (question, subject, choices list, answer index 0..3)."""
    if "choices" in row:
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise BadRecord("choices", "not a list of options")
        options = dict(zip(LETTERS, choices))
        answer = _letter_of(row.get("answer"), "answer", len(choices), 0)
    else:
        options = {k: row.get(k) for k in "ABCD"}
        answer = row.get("answer")
    return {"id": fallback, "question": row.get("question"), "options": options, "answer": answer}


def _ceval(row: Row, fallback: str, subject: str) -> dict[str, Any]:
    return {
        "id": f"{subject}-{row['id']}" if row.get("id") not in (None, "") else fallback,
        "question": row.get("question"),
        "options": {k: row.get(k) for k in "ABCD"},
        "answer": row.get("answer") or "",
        "explanation": row.get("explanation") or "",
    }


def _cmmlu(row: Row, fallback: str, subject: str) -> dict[str, Any]:
    index = row.get("") if row.get("") not in (None, "") else row.get("Unnamed: 0")
    return {
        "id": f"{subject}-{index}" if index not in (None, "") else fallback,
        "question": row.get("Question"),
        "options": {k: row.get(k) for k in "ABCD"},
        "answer": row.get("Answer") or "",
    }


_CMB_TYPES = {"单项选择题": False, "多项选择题": True}


def _cmb(row: Row, fallback: str, subject: str) -> dict[str, Any]:
    qtype = row.get("question_type")
    if qtype not in _CMB_TYPES:
        raise BadRecord("question_type", f"expected 单项选择题 or 多项选择题, got {qtype!r}")
    answer = row.get("answer")
    letters = re.sub(r"[^A-Z]", "", answer.upper()) if isinstance(answer, str) else ""
    if letters and (len(set(letters)) > 1) != _CMB_TYPES[qtype]:
        raise BadRecord("answer", f"{answer!r} does not fit question_type {qtype}")
    return {
        "id": _str_id(row, "id", fallback),
        "question": row.get("question"),
        "options": _dict_options(row.get("option"), "option"),
        "answer": answer,
        "explanation": row.get("explanation") or "",
    }


# MedXpertQA's question text ends with the choices again; the prompt lists the options itself.
_CHOICES_TAIL = re.compile(r"\s*Answer Choices:\s*\(A\).*\Z", re.S)


def _medxpertqa(row: Row, fallback: str, subject: str) -> dict[str, Any]:
    question = row.get("question")
    return {
        "id": _str_id(row, "id", fallback),
        "question": _CHOICES_TAIL.sub("", question) if isinstance(question, str) else question,
        "options": _dict_options(row.get("options"), "options"),
        "answer": row.get("label"),
    }


_MEDQA = Bench("medqa", "MedQA", ("question", "options", "answer_idx"), _medqa)
BENCHMARKS: dict[str, Bench] = {
    b.name: b
    for b in (
        _MEDQA,
        Bench("medmcqa", "MedMCQA", ("question", "opa", "opb", "opc", "opd", "cop"), _medmcqa(1)),
        Bench("pubmedqa", "PubMedQA", ("final_decision",), _pubmedqa),
        Bench(
            "mmlu",
            "MMLU",
            ("question", "answer"),
            _mmlu,
            MMLU_MEDICAL,
            headerless=("question", "A", "B", "C", "D", "answer"),
        ),  # fmt: skip
        Bench("cmb", "CMB-Exam", ("question", "option", "answer", "question_type"), _cmb),
        Bench("ceval", "C-Eval", ("id", "question", "A", "B", "C", "D", "answer"), _ceval, CEVAL_MEDICAL),
        Bench("cmmlu", "CMMLU", ("Question", "A", "B", "C", "D", "Answer"), _cmmlu, CMMLU_MEDICAL),
        Bench("medxpertqa", "MedXpertQA Text", ("id", "question", "options", "label"), _medxpertqa),
        Bench("cmexam", "CMExam", ("Question", "Options", "Answer"), _medqa),  # read by medcritical.data
    )
}
# The Hugging Face copy of MedMCQA stores cop as a class index from 0.
_MEDMCQA_HF = Bench("medmcqa", "MedMCQA", BENCHMARKS["medmcqa"].required, _medmcqa(0))
# The Chinese (MCMLE) and Taiwanese parts of MedQA share the US part's JSONL schema.
ALIASES = {"medqa-mcmle": "medqa", "medqa-usmle": "medqa", "c-eval": "ceval", "medxpertqa-text": "medxpertqa"}


# ---- reading files ------------------------------------------------------------------------


def _subject_of(path: Path, bench: Bench) -> str:
    """The subject a file holds, from its name as published (``anatomy_test.csv``, ``anatomy.csv``,
    ``clinical_medicine_val.csv``) or its folder (``clinical_medicine/val-0000.parquet``)."""
    for part in (path.stem, path.parent.name):
        for subject in sorted(bench.subjects, key=len, reverse=True):
            if part == subject or re.fullmatch(rf"{subject}_(dev|val|test|train)", part):
                return subject
    return path.stem


def _json_rows(path: Path) -> Iterator[tuple[int, Row | BadRecord]]:
    """A JSON array or object (PubMedQA: PMID -> entry; its key becomes ``pubid``), or JSON lines
    (MedMCQA's ``.json`` files hold one object per line)."""
    from .data import _json_lines

    text = path.read_text(encoding="utf-8-sig")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        yield from _json_lines(path)
        return
    if isinstance(whole, dict) and whole and all(isinstance(v, dict) for v in whole.values()):
        for row, (key, value) in enumerate(whole.items(), start=1):
            yield row, {"pubid": key, **value}
    elif isinstance(whole, list):
        for row, obj in enumerate(whole, start=1):
            yield row, obj if isinstance(obj, dict) else BadRecord("json", "not an object")
    elif isinstance(whole, dict):
        yield 1, whole
    else:
        raise UserError(f"{path}: neither a JSON array, a JSON object nor JSON lines")


def _csv_rows(path: Path, bench: Bench) -> Iterator[tuple[int, Row | BadRecord]]:
    """CSV rows by their spreadsheet row number (a header is row 1)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        if bench.headerless:
            n = len(bench.headerless)
            for row, cells in enumerate(reader, start=1):
                if row == 1 and (len(cells) != n or cells[-1].strip().upper() not in ("A", "B", "C", "D")):
                    raise UserError(
                        f"{path}: not an {bench.title} CSV: expected {n} columns ({', '.join(bench.headerless)} "
                        f"as a letter) and no header; row 1 has {len(cells)} ending in {cells[-1][:20]!r}"
                        if cells
                        else f"{path}: row 1 is empty"
                    )
                if len(cells) != n:
                    yield row, BadRecord("row", f"{len(cells)} columns, expected {n}")
                else:
                    yield row, dict(zip(bench.headerless, cells))
            return
        header = next(reader, None) or []
        for row, cells in enumerate(reader, start=2):
            yield row, dict(zip(header, cells))


def _arrow_rows(path: Path) -> Iterator[tuple[int, Row | BadRecord]]:
    if path.is_dir():
        rows = iter(load_saved_dataset(path))
    else:
        import pyarrow.parquet as pq

        try:
            rows = iter(pq.read_table(path).to_pylist())
        except Exception as e:  # pyarrow raises its own types for a file that is not parquet
            raise UserError(f"{path}: not a parquet file: {e}") from None
    yield from enumerate(rows, start=1)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _native_rows(path: Path, bench: Bench) -> Iterator[tuple[int, Row | BadRecord]]:
    suffix = path.suffix.lower()
    if _is_saved_dataset(path) or suffix == ".parquet":
        return _arrow_rows(path)
    if suffix == ".csv":
        return _csv_rows(path, bench)
    if suffix in (".json", ".jsonl"):
        return _json_rows(path)
    raise UserError(f"{path}: not a file {bench.title} ships as (.json, .jsonl, .csv, .parquet or a datasets folder)")


def _files(path: Path, bench: Bench) -> list[Path]:
    """A file, a saved dataset, or a folder of a multi-subject exam's per-subject files."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if not path.is_dir() or _is_saved_dataset(path):
        return [path]
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".csv", ".parquet", ".json", ".jsonl"))
    if bench.subjects:
        found = [p for p in found if _subject_of(p, bench) in bench.subjects]
    if not found:
        what = f" for the subjects {', '.join(bench.subjects)}" if bench.subjects else ""
        raise UserError(f"{path}: no {bench.title} files{what} in this folder")
    return found


def _check_schema(path: Path, bench: Bench, first: Row) -> None:
    """The first row must carry the published schema's fields; else the file is refused in one line."""
    keys = set(first)
    need = bench.required
    if bench.name == "pubmedqa":  # the original JSON (PMID -> QUESTION, CONTEXTS) or the HF columns
        need = ("QUESTION", "CONTEXTS", *need) if "QUESTION" in keys else ("question", "context", *need)
    elif bench.name == "mmlu" and "choices" in keys:
        need = ("question", "choices", "answer")
    missing = [k for k in need if k not in keys]
    if missing:
        found = ", ".join(sorted(map(str, keys))) or "nothing"
        raise UserError(f"{path}: not a {bench.title} file: missing field {missing[0]} (found: {found})")


def _rows(path: Path, bench: Bench) -> _Rows:
    rows = _native_rows(path, bench)
    subject = _subject_of(path, bench)
    stem = path.name if path.is_dir() else path.stem
    if bench.name == "medmcqa" and (path.is_dir() or path.suffix.lower() == ".parquet"):
        bench = _MEDMCQA_HF
    checked = False
    for row, obj in rows:
        if isinstance(obj, BadRecord):
            yield row, obj, "id"
            continue
        if not checked:
            _check_schema(path, bench, obj)
            checked = True
        if bench.subjects and "subject" in obj and obj["subject"] not in bench.subjects:
            continue  # a table of every subject (MMLU's "all"): keep the medical ones
        try:
            mcq = MCQ.from_dict({**bench.convert(obj, f"{stem}-{row}", obj.get("subject") or subject),
                                 "source": f"{bench.name}/{obj.get('subject') or subject}"
                                 if bench.subjects else bench.name})  # fmt: skip
        except BadRecord as e:
            yield row, e, "id"
        else:
            yield row, mcq, "id"


def _bench(name: str) -> Bench:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def load_benchmark(name: str, path: str | Path, strict: bool = False) -> list[tuple[Path, LoadResult]]:
    """Every file of benchmark ``name`` under ``path``, each as its :class:`LoadResult`.

    ``path`` is one published file, a ``datasets`` folder saved to disk, or (for
    MMLU, C-Eval and CMMLU) a folder of per-subject files, of which the medical
    subjects are read. A file in another schema raises ``UserError`` naming the
    file and the missing field; bad rows are skipped (``strict``: the first raises).
    """
    bench = _bench(name)
    out = []
    for f in _files(Path(path), bench):
        if bench.name == "cmexam":
            res = load_questions(f, fmt="cmexam", strict=strict, source="cmexam")
        else:
            try:
                res = _collect(f, _rows(f, bench), strict)
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                raise UserError(f"{f}: cannot read: {e}") from None
        out.append((f, res))
    return out


def benchmark_records(name: str, path: str | Path, strict: bool = False, console: Any = None) -> list[MCQ]:
    """All questions of ``name`` under ``path``; each file's skipped rows said in one line on ``console``."""
    records: list[MCQ] = []
    for f, res in load_benchmark(name, path, strict):
        note = describe_skips(res, f)
        if note and console is not None:
            console.print(f"[yellow]{note}", highlight=False)
        records += res.records
    if not records:
        raise UserError(f"{path}: no {_bench(name).title} questions with an answer key in it")
    return records


# ---- the results table ----------------------------------------------------------------------

SCORING = "exact match of the option letter(s) extracted from the reply (multi-answer: all or nothing)"


def parse_benches(specs: list[str], yaml_file: str | None = None) -> list[tuple[str, Path]]:
    """``NAME=PATH`` options, then a YAML file mapping names to paths (relative to the file)."""
    pairs: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--bench {spec!r}: expected NAME=PATH, e.g. medqa=data/US/test.jsonl")
        pairs.append((name.strip(), Path(path.strip())))
    if yaml_file:
        import yaml

        try:
            doc = yaml.safe_load(Path(yaml_file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"{yaml_file}: cannot read: {str(e).splitlines()[0]}") from None
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise UserError(f"{yaml_file}: expected a mapping of benchmark name to path, e.g. 'medqa: US/test.jsonl'")
        pairs += [(str(k), Path(yaml_file).parent / v) for k, v in doc.items()]
    for name, _ in pairs:
        _bench(name)  # an unknown name fails before any model loads
    labels = [n.lower() for n, _ in pairs]
    dup = next((n for n in labels if labels.count(n) > 1), None)
    if dup:
        raise UserError(f"benchmark {dup} named twice; evaluate one file or folder per benchmark")
    return pairs


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% Wilson score interval of ``correct / n``: honest near 0 and 1 and for small n."""
    if n == 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def output_tokens(engine: Any, text: str) -> int | None:
    """How many tokens a reply is, in the engine's own tokenizer (None: the engine has none here)."""
    if hasattr(engine, "tokenize"):
        return len(engine.tokenize(text))
    tok = getattr(engine, "tok", None)
    return len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else None


def count_cut(engine: Any, predictions: Path, max_new_tokens: int) -> int | None:
    """Replies that ran to the length cap, counted by re-tokenizing each reply (engines return text).
    Within one token: decoding strips the reply's edges, so a cut reply can re-tokenize one short."""
    from .artifacts import read_jsonl

    counts = [output_tokens(engine, r["output"]) for r in read_jsonl(predictions)]
    if any(c is None for c in counts):
        return None
    return sum(c >= max_new_tokens - 1 for c in counts)


def bench_row(name: str, path: Path, out: Path, summary: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """One line of the table: accuracy with its interval, parse rate, replies cut, and the setting
    (``out``: the evaluation's directory, whose predictions give the exact count correct)."""
    from .artifacts import read_jsonl

    n = summary["n"]
    correct = sum(bool(r["correct"]) for r in read_jsonl(out / "predictions.jsonl"))
    low_high = wilson(correct, n)
    return {
        "benchmark": _bench(name).name,
        "path": str(path),
        "n": n,
        "correct": correct,
        "accuracy": summary["accuracy"],
        "ci95": [round(x, 4) for x in low_high] if low_high else None,
        "parse_rate": summary["parse_rate"],
        "cut_at_cap": summary.get("cut_at_cap"),
        "setting": {
            "mode": settings["mode"],
            "shots": 0,
            "language": settings["language"],
            "engine": summary.get("engine"),
            "max_new_tokens": settings["max_new_tokens"] if settings["mode"] == "generate" else None,
            "temperature": settings["temperature"],
        },
    }


def _cells(row: dict[str, Any]) -> list[str]:
    s = row["setting"]
    ci = "-" if row["ci95"] is None else f"{row['ci95'][0]:.1%}-{row['ci95'][1]:.1%}"
    cut = "-" if row["cut_at_cap"] is None else f"{row['cut_at_cap']}/{row['n']}"
    cap = f", cap {s['max_new_tokens']}" if s["max_new_tokens"] else ""
    return [
        row["benchmark"],
        str(row["n"]),
        "-" if row["accuracy"] is None else f"{row['accuracy']:.1%}",
        ci,
        "-" if row["parse_rate"] is None else f"{row['parse_rate']:.1%}",
        cut,
        f"{s['mode']}, {s['shots']}-shot, lang {s['language']}, {s['engine']}{cap}",
    ]


HEADER = ["benchmark", "n", "accuracy", "95% CI (Wilson)", "parsed", "cut at cap", "setting"]


def write_table(rows: list[dict[str, Any]], model: str, out: Path) -> tuple[Path, Path]:
    """``benchmarks.json`` and ``benchmarks.md`` in ``out``: the same numbers, for programs and people."""
    from .artifacts import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "benchmarks.json", {"model": model, "scoring": SCORING, "benchmarks": rows})
    lines = [
        f"# {model} on medical benchmarks",
        "",
        f"Scoring: {SCORING}. Prompting: zero-shot, the kit's own prompt (docs/benchmarks-eval.md).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(_cells(r)) + " |" for r in rows),
        "",
    ]
    atomic_write_text(out / "benchmarks.md", "\n".join(lines))
    return out / "benchmarks.json", out / "benchmarks.md"


def print_table(rows: list[dict[str, Any]], model: str, console: Any) -> None:
    """The table on the console; cells fold rather than being cut, so a log keeps every number."""
    from rich.table import Table

    t = Table(title=f"{model} on medical benchmarks", title_justify="left")
    for col in HEADER:
        t.add_column(col, justify="left" if col in ("benchmark", "setting") else "right", overflow="fold")
    for r in rows:
        t.add_row(*_cells(r))
    console.print(t)
    console.print(f"scoring: {SCORING}", highlight=False, soft_wrap=True)
