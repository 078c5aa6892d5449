"""Each benchmark read from a few rows written by hand in its publishers' schema (field names and
answer encoding as they document them), and a file in another schema refused in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from medcritical.benchmarks import BENCHMARKS, benchmark_records, load_benchmark
from medcritical.errors import UserError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _one(name: str, path: Path, strict: bool = False):
    [(_, res)] = load_benchmark(name, path, strict=strict)
    return res


def test_medqa_us_5_and_4_options_and_mcmle(tmp_path: Path):
    us = _jsonl(
        tmp_path / "US_test.jsonl",
        [
            {"question": "A 23-year-old woman ... Which is the most likely diagnosis?", "answer": "Lupus",
             "options": {"A": "Gout", "B": "Lupus", "C": "Sarcoidosis", "D": "Lyme disease", "E": "Scurvy"},
             "meta_info": "step1", "answer_idx": "B"},
            {"question": "Which drug is first line?", "answer": "Metformin",
             "options": {"A": "Insulin", "B": "Metformin", "C": "Glipizide", "D": "Acarbose"},
             "meta_info": "step2&3", "answer_idx": "B", "metamap_phrases": ["drug", "first line"]},
        ],
    )  # fmt: skip
    res = _one("medqa", us)
    assert [len(r.options) for r in res.records] == [5, 4]
    assert [r.answer for r in res.records] == [("B",), ("B",)]
    assert [r.id for r in res.records] == ["US_test-1", "US_test-2"]
    mcmle = _jsonl(
        tmp_path / "mcmle_test.jsonl",
        [{"question": "男，45岁。最可能的诊断是", "options": {"A": "胃炎", "B": "胆囊炎", "C": "胰腺炎", "D": "肝炎",
          "E": "肠梗阻"}, "answer": "胰腺炎", "meta_info": "卫生法规", "answer_idx": "C"}],
    )  # fmt: skip
    [q] = benchmark_records("medqa-mcmle", mcmle)
    assert q.answer == ("C",) and q.source == "medqa" and q.options["E"] == "肠梗阻"


def test_medmcqa_cop_is_one_based_in_the_published_json_zero_based_in_hf(tmp_path: Path):
    row = {"id": "e9ad821a-c438-4965-9f77-760819dfa155", "question": "Chronic urethral obstruction causes:",
           "opa": "Hyperplasia", "opb": "Hyperophy", "opc": "Atrophy", "opd": "Dyplasia", "cop": 3,
           "choice_type": "single", "exp": "Atrophy of the kidney.", "subject_name": "Anatomy",
           "topic_name": "Urinary tract"}  # fmt: skip
    res = _one("medmcqa", _jsonl(tmp_path / "dev.json", [row, {**row, "id": "t1", "cop": 0}]))
    assert [r.answer for r in res.records] == [("C",)]
    assert res.records[0].explanation == "Atrophy of the kidney."
    assert res.skipped[0].field == "cop" and "no answer" in res.skipped[0].reason

    import datasets

    saved = tmp_path / "medmcqa_hf"
    datasets.Dataset.from_list([{**row, "cop": 2}]).save_to_disk(str(saved))  # ClassLabel a..d -> 0..3
    [q] = benchmark_records("medmcqa", saved)
    assert q.answer == ("C",)


def test_pubmedqa_original_json_and_hf_columns(tmp_path: Path):
    ori = tmp_path / "ori_pqal.json"
    ori.write_text(
        json.dumps(
            {
                "21645374": {
                    "QUESTION": "Do mitochondria play a role in remodelling lace plant leaves?",
                    "CONTEXTS": ["Programmed cell death (PCD) is ...", "The following organelle ..."],
                    "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": ["Mitochondria"], "YEAR": "2011",
                    "reasoning_required_pred": "yes", "reasoning_free_pred": "yes", "final_decision": "yes",
                    "LONG_ANSWER": "Results depicted mitochondrial dynamics ...",
                },
                "16418930": {
                    "QUESTION": "Is there a benefit?", "CONTEXTS": ["We studied 12 patients."],
                    "final_decision": "maybe", "LONG_ANSWER": "Unclear.",
                },
            }
        ),
        encoding="utf-8",
    )  # fmt: skip
    a, b = benchmark_records("pubmedqa", ori)
    assert a.id == "21645374" and a.answer == ("A",) and b.answer == ("C",)
    assert a.options == {"A": "yes", "B": "no", "C": "maybe"}
    assert a.question.startswith("Context:\nProgrammed cell death") and a.question.endswith("lace plant leaves?")

    import pyarrow as pa
    import pyarrow.parquet as pq

    hf = tmp_path / "pqa_labeled.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"pubid": 25429730, "question": "Does X help?", "long_answer": "No.", "final_decision": "no",
              "context": {"contexts": ["Background ..."], "labels": ["BACKGROUND"], "meshes": ["Humans"]}}]
        ),
        hf,
    )  # fmt: skip
    [q] = benchmark_records("pubmedqa", hf)
    assert q.id == "25429730" and q.answer == ("B",)


def test_mmlu_headerless_csv_folder_keeps_the_medical_subjects(tmp_path: Path):
    test = tmp_path / "data" / "test"
    test.mkdir(parents=True)
    _csv(test / "anatomy_test.csv", [["Which bone is in the arm?", "Femur", "Humerus", "Tibia", "Fibula", "B"]])
    _csv(test / "professional_medicine_test.csv", [["A 5-year-old ...", "w", "x", "y", "z", "D"], ["Q2", "a", "b", "c", "d", "A"]])  # fmt: skip
    _csv(test / "astronomy_test.csv", [["What is a star?", "a", "b", "c", "d", "A"]])
    records = benchmark_records("mmlu", test)
    assert [r.source for r in records] == ["mmlu/anatomy", "mmlu/professional_medicine", "mmlu/professional_medicine"]
    assert records[0].answer == ("B",) and records[0].options["B"] == "Humerus"
    assert records[0].id == "anatomy_test-1"  # no header: the first line is row 1


def test_mmlu_hf_parquet_answer_index_and_subject_filter(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"question": "Gene?", "subject": "medical_genetics", "choices": ["a", "b", "c", "d"], "answer": 3},
                {"question": "Tax?", "subject": "econometrics", "choices": ["a", "b", "c", "d"], "answer": 0},
            ]
        ),
        path,
    )
    [q] = benchmark_records("mmlu", path)
    assert q.answer == ("D",) and q.source == "mmlu/medical_genetics"


def test_cmb_single_and_multiple_answer(tmp_path: Path):
    path = tmp_path / "CMB-val-merge.json"
    rows = [
        {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "口腔执业医师",
         "question": "此男孩可能患", "answer": "D", "question_type": "单项选择题",
         "option": {"A": "小叶型肺炎", "B": "浸润性肺结核", "C": "继发性肺结核", "D": "原发性肺结核", "E": "粟粒型肺结核", "F": ""}},
        {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "临床执业医师",
         "question": "属于抗结核一线药物的是", "answer": "AB", "question_type": "多项选择题",
         "option": {"A": "异烟肼", "B": "利福平", "C": "青霉素", "D": "阿莫西林"}, "explanation": "异烟肼、利福平为一线。"},
        {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "临床执业医师",
         "question": "单选却给了两个答案", "answer": "AB", "question_type": "单项选择题",
         "option": {"A": "x", "B": "y"}},
    ]  # fmt: skip
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    res = _one("cmb", path)
    assert [r.answer for r in res.records] == [("D",), ("A", "B")]
    assert "F" not in res.records[0].options  # an unused letter left empty is no option
    assert res.records[1].multi and res.records[1].explanation.startswith("异烟肼")
    assert (res.skipped[0].row, res.skipped[0].field) == (3, "answer")


def test_ceval_val_csv_and_unlabelled_test(tmp_path: Path):
    val = tmp_path / "val"
    val.mkdir()
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    _csv(val / "clinical_medicine_val.csv", [header, ["0", "下列哪项是休克早期表现", "血压下降", "脉压减小", "尿量增多", "意识丧失", "B"]])  # fmt: skip
    _csv(val / "physician_val.csv", [header, ["0", "医师法规定", "a", "b", "c", "d", "A"]])
    _csv(val / "law_val.csv", [header, ["0", "法律", "a", "b", "c", "d", "A"]])
    records = benchmark_records("ceval", val)
    assert [(r.id, r.answer) for r in records] == [("clinical_medicine-0", ("B",)), ("physician-0", ("A",))]
    test = _csv(tmp_path / "basic_medicine_test.csv", [header, ["0", "题", "a", "b", "c", "d", ""]])
    res = _one("c-eval", test)
    assert res.records == [] and (res.skipped[0].row, res.skipped[0].field) == (2, "answer")


def test_cmmlu_csv_with_its_unnamed_index_column(tmp_path: Path):
    path = _csv(
        tmp_path / "traditional_chinese_medicine.csv",
        [["", "Question", "A", "B", "C", "D", "Answer"], ["0", "麻黄汤的君药是", "麻黄", "桂枝", "杏仁", "甘草", "A"],
         ["1", "六味地黄丸主治", "肾阴虚", "肾阳虚", "脾虚", "肝郁", "A"]],
    )  # fmt: skip
    records = benchmark_records("cmmlu", path)
    assert [r.id for r in records] == ["traditional_chinese_medicine-0", "traditional_chinese_medicine-1"]
    assert records[0].source == "cmmlu/traditional_chinese_medicine" and records[0].options["A"] == "麻黄"


def test_medxpertqa_text_drops_the_choices_repeated_in_the_question(tmp_path: Path):
    options = {k: f"choice {k}" for k in "ABCDEFGHIJ"}
    q = "A 62-year-old man ... Which is the best next step? Answer Choices: (A) choice A (B) choice B (C) choice C"
    path = _jsonl(
        tmp_path / "test.jsonl",
        [{"id": "Text-0", "question": q, "options": options, "label": "G", "medical_task": "Treatment",
          "body_system": "Cardiovascular", "question_type": "Reasoning"}],
    )  # fmt: skip
    [r] = benchmark_records("medxpertqa", path)
    assert r.id == "Text-0" and r.answer == ("G",) and len(r.options) == 10
    assert r.question.endswith("best next step?")


def test_cmexam_goes_through_the_existing_reader(tmp_path: Path):
    path = _csv(
        tmp_path / "val.csv",
        [["Question", "Options", "Answer", "Explanation"], ["以下哪项正确", "A 甲\\nB 乙\\nC 丙", "B", "因为乙"]],
    )
    [r] = benchmark_records("cmexam", path)
    assert r.answer == ("B",) and r.options == {"A": "甲", "B": "乙", "C": "丙"}


@pytest.mark.parametrize(
    ("name", "rows", "field"),
    [
        ("medmcqa", [{"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}], "opa"),
        ("medqa", [{"id": "x", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}], "options"),
        ("medxpertqa", [{"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}], "id"),
        ("cmb", [{"question": "q", "options": {"A": "a", "B": "b"}, "answer": "A"}], "option"),
        ("pubmedqa", [{"QUESTION": "q", "CONTEXTS": ["c"], "final_answer": "yes"}], "final_decision"),
    ],
)
def test_wrong_schema_is_refused_in_one_line_naming_file_and_field(tmp_path: Path, name, rows, field):
    path = _jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(UserError) as e:
        load_benchmark(name, path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a {BENCHMARKS[name].title} file: missing field {field} ")


def test_wrong_csv_layouts_are_refused(tmp_path: Path):
    cmmlu_file = _csv(tmp_path / "anatomy.csv", [["", "Question", "A", "B", "C", "D", "Answer"], ["0", "q", "a", "b", "c", "d", "A"]])  # fmt: skip
    with pytest.raises(UserError, match=r"anatomy.csv: not a C-Eval file: missing field id "):
        load_benchmark("ceval", cmmlu_file)
    with pytest.raises(UserError, match=r"anatomy.csv: not an MMLU CSV: expected 6 columns .* row 1 has 7"):
        load_benchmark("mmlu", cmmlu_file)
    with pytest.raises(UserError, match=r"unknown benchmark 'medqaa'; choose one of medqa, medmcqa"):
        load_benchmark("medqaa", cmmlu_file)
    (tmp_path / "other").mkdir()
    _csv(tmp_path / "other" / "astronomy_test.csv", [["q", "a", "b", "c", "d", "A"]])
    with pytest.raises(UserError, match=r"other: no MMLU files for the subjects anatomy, clinical_knowledge"):
        load_benchmark("mmlu", tmp_path / "other")


def test_bad_rows_are_skipped_or_fatal_with_strict(tmp_path: Path):
    row = {"id": "a", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 5}
    path = _jsonl(tmp_path / "train.json", [{**row, "cop": 1}, row])
    res = _one("medmcqa", path)
    assert len(res.records) == 1 and res.skipped[0].row == 2 and "expected 1..4" in res.skipped[0].reason
    with pytest.raises(UserError, match=r"train.json: row 2: cop: 5: expected 1..4"):
        load_benchmark("medmcqa", path, strict=True)


def test_eval_bench_table_on_the_embedded_gguf(tmp_path: Path, capsys):
    """Two benchmarks on the real llama.cpp engine: one table (JSON + Markdown) with the interval,
    parse rate, replies cut at the cap and the setting; the same command again evaluates nothing."""
    from medcritical.cli import main
    from medcritical.default_model import default_gguf

    medqa = _jsonl(
        tmp_path / "US_test.jsonl",
        [{"question": f"Which vitamin deficiency causes scurvy? ({i})", "options": {"A": "Vitamin C", "B": "Vitamin D",
          "C": "Vitamin K", "D": "Iron"}, "answer_idx": "A", "meta_info": "step1"} for i in range(3)],
    )  # fmt: skip
    cmb = tmp_path / "cmb.json"
    cmb.write_text(
        json.dumps([{"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "临床", "question": "坏血病缺乏",
                     "answer": "A", "question_type": "单项选择题", "option": {"A": "维生素C", "B": "维生素D"}}],
                   ensure_ascii=False),
        encoding="utf-8",
    )  # fmt: skip
    benches = tmp_path / "benches.yaml"
    benches.write_text("cmb: cmb.json\n", encoding="utf-8")
    out = tmp_path / "ev"
    args = ["eval", "--model", str(default_gguf()), "--bench", f"medqa={medqa}", "--benches", str(benches),
            "--max-new-tokens", "4", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    table = json.loads((out / "benchmarks.json").read_text())
    medqa_row, cmb_row = table["benchmarks"]
    assert (medqa_row["benchmark"], medqa_row["n"], cmb_row["benchmark"], cmb_row["n"]) == ("medqa", 3, "cmb", 1)
    low, high = medqa_row["ci95"]
    assert 0 <= low <= medqa_row["accuracy"] <= high <= 1 and high - low > 0.3  # three questions: a wide interval
    # Four new tokens cannot hold the kit's answer layout in English: those replies run to the cap. (The
    # Chinese question may be answered "A." and stop, which is not a cut.)
    assert medqa_row["cut_at_cap"] == 3 and cmb_row["cut_at_cap"] in (0, 1)
    assert medqa_row["setting"] == {"mode": "generate", "shots": 0, "language": "auto", "engine": "llamacpp",
                                    "max_new_tokens": 4, "temperature": 0.0}  # fmt: skip
    md = (out / "benchmarks.md").read_text()
    assert "| medqa | 3 |" in md and "generate, 0-shot, lang auto, llamacpp, cap 4" in md
    printed = capsys.readouterr().out
    assert "95% CI (Wilson)" in printed and "medqa" in printed and "exact match" in printed
    before = (out / "medqa" / "predictions.jsonl").read_text()
    assert main(args) == 0
    assert (out / "medqa" / "predictions.jsonl").read_text() == before


def test_wilson_interval_and_bench_option_errors(tmp_path: Path, capsys):
    from medcritical.benchmarks import wilson
    from medcritical.cli import main

    low, high = wilson(50, 100)
    assert round(low, 3) == 0.404 and round(high, 3) == 0.596
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 0) is None
    assert main(["eval", "--bench", "medqa"]) == 1
    assert "--bench 'medqa': expected NAME=PATH" in capsys.readouterr().err
    assert main(["eval", "--bench", f"usmle={tmp_path}"]) == 1
    assert "unknown benchmark 'usmle'" in capsys.readouterr().err
