import csv
import hashlib
import json
from pathlib import Path

import pytest

from medcritical.data import (
    MCQ,
    LoadResult,
    Skip,
    demo_path,
    describe_skips,
    load_questions,
    load_recipe_data,
    records_hash,
    split_of,
    split_records,
    write_jsonl,
)
from medcritical.errors import UserError

CMEXAM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cmexam" / "val-dev.csv"
needs_cmexam = pytest.mark.skipif(not CMEXAM.exists(), reason=f"real CMExam file not present at {CMEXAM}")


def mcq(id: str, answer: tuple[str, ...] = ("A",), n: int = 4, **kw) -> MCQ:
    options = {chr(65 + i): f"option {i}" for i in range(n)}
    return MCQ(id=id, question=f"question {id}?", options=options, answer=answer, **kw)


def write_csv(path: Path, rows: list[list[str]], header=("Question", "Options", "Answer", "Explanation")):
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_lines(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
        encoding="utf-8",
    )
    return path


# --- the real CMExam file ------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> LoadResult:
    return load_questions(CMEXAM)


@needs_cmexam
def test_real_cmexam_counts_and_skips(real):
    with CMEXAM.open(encoding="utf-8-sig", newline="") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 5811
    assert len(real.records) + len(real.skipped) == 5811
    # Every row whose Answer cell is blank is skipped as "Answer: empty", at its spreadsheet row.
    blank = {i + 2 for i, c in enumerate(cells) if not c["Answer"].strip()}
    assert {s.row for s in real.skipped if (s.field, s.reason) == ("Answer", "empty")} == blank
    assert all(r.source == "cmexam" and r.id.startswith("cmexam-") for r in real.records)
    assert len({r.id for r in real.records}) == len(real.records)


@needs_cmexam
def test_real_cmexam_multi_answer(real):
    multi = [r for r in real.records if r.multi]
    assert 0.02 < len(multi) / len(real.records) < 0.04  # README: about 3%
    for r in multi:
        assert len(r.answer) > 1 and list(r.answer) == sorted(set(r.answer))
        assert set(r.answer) <= set(r.options)
    assert any(r.answer == ("A", "B", "C", "D") for r in multi)


@needs_cmexam
def test_real_cmexam_options_and_text(real):
    first = real.records[0]
    assert first.question == "夜间阵发性呼吸困难，可见于"
    assert first.options == {
        "A": "急性脑血管疾病",
        "B": "癔病",
        "C": "急性感染所致的毒血症",
        "D": "慢性阻塞性肺气肿",
        "E": "左心功能不全",
    }
    assert first.answer == ("E",)
    for r in real.records:
        assert 2 <= len(r.options) <= 5 and list(r.options) == sorted(r.options)
        assert all(t and t == t.strip() and "\\n" not in t for t in r.options.values())
        assert "\\n" not in r.explanation and "\u3000" not in r.explanation
    # Upstream rows that lack option A keep B-E (the answer still refers to them).
    assert any(list(r.options) == ["B", "C", "D", "E"] for r in real.records)
    # Explanations with CMExam's literal \n get real line breaks.
    assert any("\n" in r.explanation for r in real.records)


@needs_cmexam
def test_real_cmexam_strict(real, tmp_path):
    if real.skipped:
        first = real.skipped[0]
        with pytest.raises(UserError, match=rf"val-dev\.csv: row {first.row}: {first.field}:"):
            load_questions(CMEXAM, strict=True)
    else:
        assert len(load_questions(CMEXAM, strict=True).records) == 5811
    # The real rows with one answer blanked at spreadsheet row 17.
    with CMEXAM.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))[:40]
    rows[16][2] = ""
    path = write_csv(tmp_path / "data.csv", rows[1:], header=rows[0])
    with pytest.raises(UserError) as e:
        load_questions(path, strict=True)
    assert str(e.value) == f"{path}: row 17: Answer: empty"
    result = load_questions(path)
    assert result.skipped == [Skip(17, "Answer", "empty")]
    assert describe_skips(result, "data.csv") == "data.csv: skipped 1 of 39 rows (row 17: Answer: empty)"


# --- CMExam CSV fixtures -------------------------------------------------------------


def test_cmexam_rows(tmp_path):
    good = ["甲的问题\u3000", "A 甲\\nB 乙\\nC 丙\u2003", " Ｂ ", "第一行\\n第二行\\n"]
    path = write_csv(
        tmp_path / "x.csv",
        [
            good,  # row 2
            ["多选题", "A 一\nB 二\\nC 三\n\nD 四", "ＡＢD", ""],  # real newlines, full-width
            ["空答案", "A 一\\nB 二", "", "x"],  # row 4
            ["答案越界", "A 一\\nB 二", "F", ""],
            good,  # row 6: exact duplicate of row 2
            ["一个选项", "A 一", "A", ""],
            ["", "A 一\\nB 二", "A", ""],
            ["坏行", "A 一\\n第二个", "A", ""],
            ["重复字母", "A 一\\nA 二", "A", ""],
            ["空选项", "A 一\\nB", "A", ""],
            ["分隔符", "A. 一\\nB、二\\nC：三", "C", ""],  # row 12
        ],
    )
    result = load_questions(path)
    assert [(s.row, s.field) for s in result.skipped] == [
        (4, "Answer"),
        (5, "Answer"),
        (6, "Question"),
        (7, "Options"),
        (8, "Question"),
        (9, "Options"),
        (10, "Options"),
        (11, "Options"),
    ]
    reasons = {s.row: s.reason for s in result.skipped}
    assert reasons[4] == "empty" and reasons[6] == "duplicate of row 2"
    assert "F" in reasons[5] and "AB" in reasons[5]
    a, b, c = result.records
    assert a.question == "甲的问题" and a.options == {"A": "甲", "B": "乙", "C": "丙"}
    assert a.answer == ("B",)
    assert a.explanation == "第一行\n第二行"
    assert a.id == "cmexam-" + hashlib.sha1(f"{good[0]}\n{good[1]}".encode()).hexdigest()[:12]
    assert b.options == {"A": "一", "B": "二", "C": "三", "D": "四"}
    assert b.answer == ("A", "B", "D") and b.multi and not c.multi
    assert c.options == {"A": "一", "B": "二", "C": "三"}
    with pytest.raises(UserError, match=r"x\.csv: row 4: Answer: empty"):
        load_questions(path, strict=True)


def test_cmexam_bad_answer_letter_is_bad_row(tmp_path):
    path = write_csv(tmp_path / "x.csv", [["问", "A 一\\nB 二", "b", ""]])
    assert load_questions(path).skipped == [Skip(2, "Answer", "bad answer letter 'b'")]


def test_cmexam_file_problems(tmp_path):
    with pytest.raises(UserError, match="missing column.*Answer"):
        load_questions(write_csv(tmp_path / "a.csv", [["q", "A x\\nB y"]], header=("Question", "Options")))
    bad = tmp_path / "b.csv"
    bad.write_bytes(b"Question,Options,Answer\n\xff\xfe,A x,A\n")
    with pytest.raises(UserError, match=r"b\.csv: cannot read"):
        load_questions(bad)
    with pytest.raises(UserError, match="is a directory"):
        load_questions(tmp_path, fmt="cmexam")


# --- our JSONL -----------------------------------------------------------------------


def test_jsonl_rows(tmp_path):
    ok = {"id": "q1", "question": "Q?", "options": {"B": "b", "A": "a"}, "answer": "AB"}
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            ok,  # row 1
            "",  # row 2: blank, passed over but counted
            {"id": "q2", "question": " Q2 ", "options": {"A": "a", "B": "b"}, "answer": ["B"]},
            "{not json",  # row 4
            ["a", "list"],
            {"id": "q3", "options": {"A": "a", "B": "b"}, "answer": "A"},
            {"id": "q4", "question": "Q", "options": ["a", "b"], "answer": "A"},
            {"id": "q5", "question": "Q", "options": {"A": "a", "B": "b"}, "answer": "C"},
            {"id": "q6", "question": "Q", "options": {"A": "a"}, "answer": "A"},
            {"id": "q7", "question": "Q", "options": {"a": "a", "B": "b"}, "answer": "B"},
            {"id": "q8", "question": "Q", "options": {"A": "a", "B": " "}, "answer": "A"},
            {"id": "q9", "question": "Q", "options": {"A": "a", "B": "b"}},
            {**ok, "question": "again"},  # row 13: same id as row 1
            {"question": "Q", "options": {"A": "a", "B": "b"}, "answer": "A"},
            {"id": "q10", "question": "Q", "options": {"A": "a", "B": "b"}, "answer": 1},
        ],
    )
    result = load_questions(path)
    assert [(s.row, s.field) for s in result.skipped] == [
        (4, "json"),
        (5, "json"),
        (6, "question"),
        (7, "options"),
        (8, "answer"),
        (9, "options"),
        (10, "options"),
        (11, "options"),
        (12, "answer"),
        (13, "id"),
        (14, "id"),
        (15, "answer"),
    ]
    assert result.skipped[9].reason == "duplicate of row 1"
    assert result.skipped[2].reason == "missing"
    q1, q2 = result.records
    assert q1.options == {"A": "a", "B": "b"} and list(q1.options) == ["A", "B"]
    assert q1.answer == ("A", "B") and q1.explanation == "" and q1.source == ""
    assert q2.question == "Q2" and q2.answer == ("B",)
    assert load_questions(path, source="mine").records[0].source == "mine"
    with pytest.raises(UserError, match=r"d\.jsonl: row 4: json: not valid JSON"):
        load_questions(path, strict=True)


def test_round_trip_and_write(tmp_path):
    records = [
        mcq("a", explanation="why\nbecause", source="s"),
        mcq("b", ("B", "D"), n=5),
        MCQ("c", "中文？", {"A": "是", "B": "否"}, ("B",)),
    ]
    for r in records:
        assert MCQ.from_dict(r.to_dict()) == r
        assert json.loads(json.dumps(r.to_dict()))["answer"] == list(r.answer)
    path = tmp_path / "out" / "n.jsonl"
    write_jsonl(records, path)
    assert not path.with_name("n.jsonl.tmp").exists()
    assert "中文" in path.read_text(encoding="utf-8")
    assert load_questions(path) == LoadResult(records, [])
    assert records_hash(records) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert records_hash(records) != records_hash(records[:2])
    write_jsonl(records[:1], path)  # replaces, never appends
    assert load_questions(path).records == records[:1]


# --- MedQA ---------------------------------------------------------------------------


def test_medqa(tmp_path):
    row = {
        "question": "A 45-year-old man ...?",
        "options": {"A": "x", "B": "y", "C": "z", "D": "w"},
        "answer_idx": "C",
        "answer": "z",
        "meta_info": "step1",
    }
    path = write_lines(
        tmp_path / "medqa.jsonl",
        [
            row,
            {**row, "answer_idx": "E"},
            {**row, "id": 7, "answer_idx": "A"},
            {**row, "question": "  A 45-year-old man ...?  "},  # same normalized text as row 1
        ],
    )
    result = load_questions(path)  # auto: first object has answer_idx
    assert [(s.row, s.field) for s in result.skipped] == [(2, "answer_idx"), (4, "question")]
    first, given = result.records
    lines = "A x\nB y\nC z\nD w"
    digest = hashlib.sha1(f"{row['question']}\n{lines}".encode()).hexdigest()[:12]
    assert first.id == f"medqa-{digest}" and first.answer == ("C",) and first.source == "medqa"
    assert given.id == "7" and given.answer == ("A",)
    # As plain JSONL the same file has no ids and no "answer" letters.
    assert load_questions(path, fmt="jsonl").records == []


# --- hf-disk -------------------------------------------------------------------------


def test_hf_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    records = [mcq("a", n=4), mcq("b", ("A", "E"), n=5), mcq("c", ("C",), n=3)]
    rows = [r.to_dict() for r in records] + [{**mcq("d").to_dict(), "answer": ["Z"]}]
    ds = Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    result = load_questions(tmp_path / "ds")  # auto: a directory
    assert result.records == records  # 4-option rows do not gain an empty "E"
    assert [(s.row, s.field) for s in result.skipped] == [(4, "answer")]

    DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "one"))
    assert load_questions(tmp_path / "one", fmt="hf-disk").records == records
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(UserError, match="train, test"):
        load_questions(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a saved datasets directory"):
        load_questions(tmp_path / "empty")


# --- format detection and errors -----------------------------------------------------


def test_auto_detection_and_errors(tmp_path):
    ok = mcq("a").to_dict()
    assert load_questions(write_lines(tmp_path / "x.json", [ok])).records == [mcq("a")]
    assert load_questions(write_csv(tmp_path / "x.csv", [["q", "A a\\nB b", "A", ""]])).records
    with pytest.raises(UserError, match="cannot tell the format"):
        load_questions(write_lines(tmp_path / "x.txt", [ok]))
    with pytest.raises(UserError, match=r"nope\.csv: no such file"):
        load_questions(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="unknown format 'xml'"):
        load_questions(tmp_path / "x.json", fmt="xml")
    assert load_questions(write_lines(tmp_path / "e.jsonl", [])) == LoadResult([], [])


def test_describe_skips():
    assert describe_skips(LoadResult([mcq("a")], []), "d.csv") is None
    skips = [Skip(i, "Answer", "empty") for i in (3, 5, 9, 11)]
    assert describe_skips(LoadResult([mcq("a")], skips), "d.csv", limit=2) == (
        "d.csv: skipped 4 of 5 rows (row 3: Answer: empty; row 5: Answer: empty; ...)"
    )


def test_demo_path():
    assert demo_path().name == "demo.jsonl" and demo_path().parent.name == "assets"
    if demo_path().exists():  # bundled by another module; must load cleanly when present
        assert load_questions(demo_path(), strict=True).records


# --- split ---------------------------------------------------------------------------


def test_split_deterministic_and_pinned():
    ids = [f"q{i}" for i in range(50)]
    assert [split_of(i) for i in ids] == [split_of(i) for i in ids]
    # Pinned: a change here would move questions between train and test.
    assert [split_of(f"q{i}") for i in range(12)] == PINNED


PINNED = [
    "train",
    "train",
    "train",
    "train",
    "test",
    "train",
    "train",
    "train",
    "train",
    "train",
    "train",
    "train",
]


def test_split_fractions_and_seeds():
    ids = [f"id-{i}" for i in range(5000)]
    for dev, test in [(0.1, 0.1), (0.2, 0.05), (0.0, 0.3)]:
        got = [split_of(i, 0, dev, test) for i in ids]
        assert abs(got.count("dev") / 5000 - dev) <= 0.02
        assert abs(got.count("test") / 5000 - test) <= 0.02
    a = [split_of(i, seed=0) for i in ids]
    b = [split_of(i, seed=1) for i in ids]
    assert sum(x != y for x, y in zip(a, b)) > 500


def test_split_records_disjoint_and_covering():
    records = [mcq(f"r{i}") for i in range(1000)]
    parts = {w: split_records(records, w, seed=3, dev=0.15, test=0.1) for w in ("train", "dev", "test")}
    ids = [r.id for part in parts.values() for r in part]
    assert sorted(ids) == sorted(r.id for r in records)  # covering, no id twice
    assert all(parts[w] for w in parts)
    assert parts["dev"] == [r for r in records if split_of(r.id, 3, 0.15, 0.1) == "dev"]
    with pytest.raises(UserError, match="unknown split"):
        split_records(records, "val")
    with pytest.raises(UserError, match="fractions"):
        split_of("x", dev=0.7, test=0.5)


def test_source_lang_filter_keeps_one_language_and_says_how_many():
    from rich.console import Console

    from medcritical.prompts import detect_lang
    from medcritical.recipe import load_recipe

    console = Console(record=True, width=200)
    recipe = load_recipe(None, ["data.sources=[{path: demo, lang: en}]"])
    kept = load_recipe_data(recipe.data, console=console)
    assert len(kept) == 50 and {detect_lang(r.question) for r in kept} == {"en"}
    assert "lang en: kept 50 of 100 questions" in console.export_text()
    zh = load_recipe_data(load_recipe(None, ["data.sources=[{path: demo, lang: zh}]"]).data)
    assert len(zh) == 50 and not {r.id for r in zh} & {r.id for r in kept}
    with pytest.raises(UserError, match="lang"):
        load_recipe(None, ["data.sources=[{path: demo, lang: fr}]"])
