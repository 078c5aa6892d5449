import json
from pathlib import Path

import pytest

from medcritical.cli import main
from medcritical.default_model import default_gguf
from medcritical.evaluate import pick_from_logprobs, summarize


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_eval_tiny_model_transformers_generate_and_resume(tiny_llama: Path, tmp_path: Path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_llama), "--limit", "6", "--max-new-tokens", "8", "--output", str(out)]
    assert main(args) == 0
    s = _summary(out)
    assert s["n"] == 6 and s["engine"] == "transformers"
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert {"prompt", "output", "parsed", "gold", "correct"} <= rows[0].keys()
    assert "<|im_start|>user" in rows[0]["prompt"]  # went through the chat template
    assert "accuracy" in capsys.readouterr().out
    # Same command again: everything is already there, nothing regenerated.
    before = (out / "predictions.jsonl").read_text()
    assert main(args) == 0
    assert (out / "predictions.jsonl").read_text() == before
    # Other settings into the same directory are refused, not mixed in.
    assert main(args[:-2] + ["--temperature", "0.7", "--output", str(out)]) == 1


def test_eval_loglik_4bit(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "ll"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_llama),
                "--load-in-4bit",
                "--mode",
                "loglik",
                "--limit",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    s = _summary(out)
    assert s["n"] == 8 and s["parse_rate"] == 1.0  # loglik always yields an answer


def test_eval_gguf_on_cmexam(tmp_path: Path):
    csv = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmexam" / "val-dev.csv"
    if not csv.exists():
        pytest.skip("shared CMExam data not present")
    out = tmp_path / "gg"
    args = ["eval", "--model", str(default_gguf()), "--data", str(csv), "--limit", "2", "--max-new-tokens", "48"]
    assert main(args + ["--output", str(out)]) == 0
    s = _summary(out)
    assert s["n"] == 2 and s["engine"] == "llamacpp"
    row = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert row["output"] and "<|im_start|>assistant" in row["prompt"]


def test_gguf_loglik_matches_greedy_next_token(tmp_path: Path):
    """The llama.cpp letter scores come from the real last-position logits."""
    from medcritical.engines import LlamaCppEngine

    eng = LlamaCppEngine(default_gguf(), n_ctx=1024)
    msgs = [{"role": "user", "content": "Reply with one letter: A or B?"}]
    logits = eng.next_token_logits(eng.tokenize(eng.render(msgs)))
    first = eng.generate([msgs], max_new_tokens=1)[0][0]
    assert eng.llm.detokenize([int(logits.argmax())]).decode().strip() == first.strip()
    scores = eng.letter_logprobs([msgs], ["Answer: "], [["A", "B"]])[0]
    assert set(scores) == {"A", "B"} and all(v < 0 for v in scores.values())


def test_summary_and_multi_answer_choice():
    rows = [
        {"multi": False, "parsed": ["A"], "correct": True},
        {"multi": False, "parsed": None, "correct": False},
        {"multi": True, "parsed": ["A", "B"], "correct": True},
        {"multi": True, "parsed": ["A"], "correct": False},
    ]
    s = summarize(rows)
    assert (s["accuracy"], s["accuracy_single"], s["accuracy_multi"], s["parse_rate"]) == (0.5, 0.5, 0.5, 0.75)
    assert pick_from_logprobs({"A": -1.0, "B": -3.0, "C": -2.0}, multi=False) == {"A"}
    assert pick_from_logprobs({"A": -1.0, "B": -1.1, "C": -6.0, "D": -7.0}, multi=True) == {"A", "B"}
    assert len(pick_from_logprobs({"A": -1.0, "B": -9.0, "C": -9.0}, multi=True)) == 2


def test_bad_data_is_one_line_error(tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "question": "q", "options": {"A": "a", "B": "b"}, "answer": ["C"]}\n')
    assert main(["eval", "--data", str(bad), "--format", "jsonl", "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "Traceback" not in err
