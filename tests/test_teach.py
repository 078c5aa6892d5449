"""The teach stage against real servers and models: llama-cpp-python's OpenAI-compatible
server over the embedded SmolLM2 GGUF, a scripted stdlib HTTP server (for exact
outcome counts and retries), the GGUF and transformers backends, and the dataset teacher."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from medcritical.cli import main
from medcritical.data import load_recipe_data
from medcritical.default_model import default_gguf
from medcritical.errors import UserError
from medcritical.grading import extract_answer
from medcritical.layout import RunDir
from medcritical.prompts import answer_line, split_reasoning, split_template
from medcritical.recipe import Recipe
from medcritical.teach import OUTCOMES, judge, teacher_request
from medcritical.teachers import OpenAITeacher, TeacherRequest, find_leak


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def run_teach(r: Recipe, console: Console) -> dict:
    """The teach stage on the recipe's run directory."""
    from medcritical import teach

    return teach.run(r, RunDir.of(r), console)


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def recipe(out: Path, **teach) -> Recipe:
    return Recipe.model_validate({"output_dir": str(out), "teach": teach})


def train_questions(limit: int):
    return load_recipe_data(Recipe().data, split="train")[:limit]


def wipe_outputs(out: Path) -> None:
    """Forget every decision but keep the cache: a rerun must decide everything again."""
    for name in ("templates.jsonl", "rejected.jsonl", "manifest.json"):
        (out / "teach" / name).unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the classifier -------------------------------------------------------------------

Q = train_questions(1)[0]
GOLD = "".join(Q.answer)
WRONG = next(k for k in Q.options if k not in Q.answer)


def reply(body: str, answer: str) -> str:
    return f"### Plan\nRecall the relevant facts.\n### Reasoning\n{body}\nAnswer: {answer}"


def test_judge_classifies_replies():
    ok = judge(reply("Each option is weighed against the facts.", GOLD), Q, "en", hinted=True)
    assert ok.outcome == "kept" and ok.plan == "Recall the relevant facts." and "Answer" not in ok.steps
    assert judge(reply("Weighing the options.", WRONG), Q, "en", hinted=False).outcome == "wrong_answer"
    assert judge(f"I think it is {GOLD}.", Q, "en", hinted=False).outcome == "unparseable"
    no_answer = judge("### Plan\nRecall.\n### Reasoning\nStill thinking about it", Q, "en", hinted=False)
    assert no_answer.outcome == "unparseable" and no_answer.detail == "no final answer"
    # Chinese sections work too.
    assert judge(f"### 思路\n回忆知识点。\n### 推理\n逐项分析。\n答案：{GOLD}", Q, "zh", hinted=True).outcome == "kept"
    leaks = [
        f"As the reference answer says, {GOLD} fits.",
        f"Given that the answer is {GOLD}, the rest follows.",
        f"The key is {GOLD}.",
        "As the key indicates, the stem points one way.",
        "I was told which option is right.",
        "已知答案，故反推。",
        "参考答案给出了结论。",
        "结合标准答案分析。",
    ]
    for text in leaks:
        v = judge(reply(text, GOLD), Q, "en", hinted=True)
        assert v.outcome == "leaked", text
        # Without a hint the same words are no leak: the teacher knew nothing to leak.
        assert judge(reply(text, GOLD), Q, "en", hinted=False).outcome == "kept", text


def test_leak_detector_passes_ordinary_reasoning():
    for text in [
        "The key finding is ST elevation in II, III and aVF.",
        "The key is to recognize the inferior wall pattern.",
        "The key is ACE inhibition in this patient.",
        "A key point: answer choices with absolute words are suspect.",
        "X线提示肺部感染，结合病史考虑肺炎。",
        "患者被告知需戒烟。",
    ]:
        assert find_leak(text) is None, text


def test_split_reasoning():
    assert split_reasoning("<think>it is B</think>\n### Plan\nx") == ("it is B", "### Plan\nx")
    assert split_reasoning("it is B, the key said so</think>Answer: C") == ("it is B, the key said so", "Answer: C")
    assert split_reasoning("<think>cut off while thinking... Answer: B") == ("cut off while thinking... Answer: B", "")
    assert split_reasoning("  no reasoning block  ") == ("", "no reasoning block")
    assert split_reasoning("### Plan\nx", reasoning="from the API field") == ("from the API field", "### Plan\nx")


# Heading styles real teachers write (QwQ, R1 distills, other kits), all in the template layout.
STYLES = {
    "markdown h2 zh": "## 思路\n回忆知识点。\n\n## 详细步骤\n逐项分析。\n\n答案：{a}",
    "bold en": "**Plan**\nRecall the facts.\n\n**Step-by-step analysis:**\n1. Weigh each option.\n\n**Final answer:** {a}",
    "label lines": "Plan: recall the facts.\nReasoning: weigh each option.\nAnswer: {a}",
    "h1 with answer section": "# Approach\nRecall.\n# Analysis\nWeigh each option.\n# Answer\n{a}",
    "numbered zh bold": "**一、解题思路**\n回忆。\n**二、逐项分析**\n逐项判断。\n故选{a}。",
}


@pytest.mark.parametrize("style", list(STYLES))
def test_judge_keeps_other_heading_styles(style: str):
    v = judge(STYLES[style].format(a=GOLD), Q, "en", hinted=False)
    assert v.outcome == "kept", v
    assert v.plan and v.steps and GOLD not in v.steps.splitlines()[-1].split()[-1:]


def test_judge_truncated_and_think_blocks():
    cut = judge("### Plan\nRecall.\n### Reasoning\nFirst, option A is", Q, "en", False, finish_reason="length")
    assert cut.outcome == "truncated"
    assert judge("<think>still thinking about A and", Q, "en", False, finish_reason="length").outcome == "truncated"
    v = judge(f"<think>Long chain: A fails, so {GOLD}.</think>" + reply("Weigh each option.", GOLD), Q, "en", False)
    assert v.outcome == "kept" and v.reasoning == f"Long chain: A fails, so {GOLD}."
    # A leak inside the chain of thought is still a leak.
    leaked = judge(f"<think>The reference answer is {GOLD}.</think>" + reply("Weigh.", GOLD), Q, "en", True)
    assert leaked.outcome == "leaked"


def test_gold_key_never_in_plain_teacher_prompt():
    cfg = recipe(Path("unused"), backend="dataset").teach
    hinted = cfg.model_copy(update={"hinted": True})
    for mcq in train_questions(40):
        letters = list(mcq.options)  # a different key with as many letters (multi-answer is part of the exam)
        other = replace(mcq, answer=tuple(sorted(letters[(letters.index(a) + 1) % len(letters)] for a in mcq.answer)))
        assert other.answer != mcq.answer
        for attempt in (0, 1):
            plain = teacher_request(mcq, "en", cfg, seed=0, attempt=attempt)
            # The prompt is a function of the question alone: another key, the same prompt.
            assert plain == teacher_request(other, "en", cfg, seed=0, attempt=attempt)
            assert "key is" not in json.dumps(plain.messages)
        assert teacher_request(mcq, "en", hinted, 0, 0) != teacher_request(other, "en", hinted, 0, 0)


# ---- the dataset teacher ---------------------------------------------------------------


def test_dataset_teacher_on_demo_and_cli(tmp_path: Path, capsys):
    r = recipe(tmp_path, backend="dataset")
    m = run_teach(r, quiet())
    assert m["questions"] > 50 and m["kept"] >= 0.95 * m["questions"]
    assert sum(m[k] for k in OUTCOMES) == m["questions"]
    kept = rows(tmp_path / "teach" / "templates.jsonl")
    assert len(kept) == m["kept"]
    for row in kept:
        target = row["target"]
        assert target.endswith(answer_line(row["answer"], row["lang"]))
        assert extract_answer(target, row["options"]) == set(row["answer"])
        assert split_template(target, row["lang"]) == (row["plan"], row["steps"])
        assert find_leak(target) is None
        assert row["teacher"]["backend"] == "dataset"
    manifest = json.loads((tmp_path / "teach" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["kept"] == m["kept"]

    # The subcommand, with an override: other questions, so the step is redone (the old one moved aside).
    assert main(["teach", str(write_yaml(tmp_path / "r.yaml", r)), "teach.limit=5"]) == 0
    assert "templates.jsonl" in capsys.readouterr().out
    assert len(rows(tmp_path / "teach" / "templates.jsonl")) == 5
    assert list((tmp_path / ".stale").rglob("templates.jsonl"))


def write_yaml(path: Path, r: Recipe) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(r.dump()), encoding="utf-8")
    return path


def test_dataset_teacher_skips_missing_and_leaky_explanations(tmp_path: Path):
    data = tmp_path / "q.jsonl"
    base = {"question": "Which vitamin deficiency causes scurvy?", "options": {"A": "Vitamin C", "B": "Vitamin D"}}
    lines = [
        {**base, "id": "q1", "answer": "A", "explanation": "Vitamin C is needed for collagen synthesis."},
        {**base, "id": "q2", "answer": "A", "explanation": ""},
        {**base, "id": "q3", "answer": "A", "explanation": "参考答案：A。"},
    ]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    r = Recipe.model_validate(
        {"output_dir": str(tmp_path), "data": {"sources": [{"path": str(data)}], "dev": 0, "test": 0}}
    )
    m = run_teach(r, quiet())
    assert (m["kept"], m["no_explanation"], m["questions"]) == (1, 2, 3)
    assert {x["id"]: x["reason"] for x in rows(tmp_path / "teach" / "rejected.jsonl")} == {
        "q2": "no_explanation",
        "q3": "no_explanation",
    }


# ---- a scripted OpenAI-compatible server (stdlib) ------------------------------------------


class StubAPI(ThreadingHTTPServer):
    """Chat completions on 127.0.0.1: the first requests get the statuses in ``fail_with``,
    the rest get ``answer(request body)`` as the reply text."""

    def __init__(self, answer: Callable[[dict], str], fail_with: tuple[int, ...] = ()) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.answer = answer
        self.fail_with = list(fail_with)
        self.seen: list[tuple[dict, dict]] = []  # (body, lower-cased headers)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _StubHandler(BaseHTTPRequestHandler):
    server: StubAPI

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.seen.append((body, {k.lower(): v for k, v in self.headers.items()}))
            status = self.server.fail_with.pop(0) if self.server.fail_with else 200
        if status == 200:
            message = {"role": "assistant", "content": self.server.answer(body)}
            payload = {
                "id": "stub",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
        else:
            payload = {"error": {"message": f"stub says {status}", "type": "stub"}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def stub() -> Iterator[Callable[..., StubAPI]]:
    servers: list[StubAPI] = []

    def start(answer: Callable[[dict], str] = lambda body: "", fail_with: tuple[int, ...] = ()) -> StubAPI:
        server = StubAPI(answer, fail_with)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


REQ = TeacherRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.0, top_p=1.0, max_tokens=8, seed=0)


def test_retries_with_backoff_then_succeeds(stub):
    s = stub(lambda body: "fine", fail_with=(503, 503))
    start = time.monotonic()
    got = OpenAITeacher(s.url, "m", retries=3, backoff=0.05).call(REQ)
    assert got.text == "fine" and got.error is None and len(s.seen) == 3
    assert time.monotonic() - start >= 0.05 * 0.5 * (1 + 2)  # two backoffs, jitter at least half


def test_retries_exhausted_fails_only_that_call(stub):
    s = stub(fail_with=(429,) * 5)
    got = OpenAITeacher(s.url, "m", retries=2, backoff=0.01).call(REQ)
    assert got.error == "HTTP 429 after 3 tries" and len(s.seen) == 3


def test_client_errors_are_user_errors_without_retries(stub):
    s = stub(fail_with=(401,))
    with pytest.raises(UserError, match=rf"{s.url}: HTTP 401") as e:
        OpenAITeacher(s.url, "m", retries=3, backoff=0.01).call(REQ)
    assert "\n" not in str(e.value) and len(s.seen) == 1
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError, match="is the server running"):
        OpenAITeacher(dead, "m", retries=1, backoff=0.01).call(REQ)


def test_scripted_teacher_counts_think_blocks_and_retries(tmp_path: Path, stub, monkeypatch):
    """Exact outcomes through the whole stage: one behaviour per question, cycling."""
    questions = train_questions(10)
    kinds = ["think", "wrong", "unparseable", "leaked", "second_try"]
    plan = {m.question: (kinds[i % 5], m) for i, m in enumerate(questions)}

    def answer(body: dict) -> str:
        user = body["messages"][-1]["content"]
        kind, m = next(v for q, v in plan.items() if q in user)
        gold = "".join(m.answer)
        wrong = next(k for k in m.options if k not in m.answer)
        return {
            "think": f"<think>A looks tempting, but {gold} fits the stem.</think>" + reply("Weigh each option.", gold),
            "wrong": reply("Weigh each option.", wrong),
            "unparseable": f"Probably {gold}.",
            "leaked": reply(f"Since the reference answer is {gold}, the others are out.", gold),
            "second_try": reply("Weigh each option.", wrong if body["seed"] == 0 else gold),
        }[kind]

    s = stub(answer)
    monkeypatch.setenv("STUB_KEY", "sk-stub")
    r = recipe(
        tmp_path, backend="openai", base_url=s.url, model="stub-teacher", api_key_env="STUB_KEY",
        hinted=True, samples=2, limit=10, max_tokens=256, concurrency=3, retries=0,
    )  # fmt: skip
    m = run_teach(r, quiet())
    expected = {"kept": 4, "wrong_answer": 2, "unparseable": 2, "truncated": 0, "leaked": 2, "no_explanation": 0}
    expected["errors"] = 0
    assert {k: m[k] for k in OUTCOMES} == expected
    assert (m["teacher_calls"], m["cache_hits"]) == (10 + 8, 0)  # every reject got its second attempt
    body, headers = s.seen[0]
    assert body["max_tokens"] == 256 and body["model"] == "stub-teacher" and "seed" in body
    assert headers["authorization"] == "Bearer sk-stub"

    kept = {row["id"]: row for row in rows(tmp_path / "teach" / "templates.jsonl")}
    for row in kept.values():
        kind = plan[row["question"]][0]
        assert "<think>" not in row["target"] and row["teacher"]["attempt"] == (kind == "second_try")
        cached = json.loads(
            next((tmp_path / "cache" / "teach").rglob(f"{row['teacher']['cache_key']}.json")).read_text()
        )
        assert cached["reply"]["text"].startswith("<think>") == (kind == "think")  # raw reply kept in the cache
    rejected = rows(tmp_path / "teach" / "rejected.jsonl")
    assert all(len(x["attempts"]) == 2 for x in rejected)

    # Only the retry count changed: it cannot change a verdict, so the step stays complete and no call is made.
    calls = len(s.seen)
    r.teach.retries = 3
    m2 = run_teach(r, quiet())
    assert {k: m2[k] for k in OUTCOMES} == expected and len(s.seen) == calls


def test_teacher_with_other_headings_and_think_blocks_is_kept(tmp_path: Path, stub):
    """A reasoning teacher behind an OpenAI-compatible server writes its long chain of thought in a <think>
    block and its template under its own headings: every reply is kept, and with ``teach.reasoning: keep``
    the SFT targets start with that chain (with ``drop``, they do not)."""
    questions = train_questions(6)
    styles = list(STYLES.values())

    def answer(body: dict) -> str:
        i, m = next((i, m) for i, m in enumerate(questions) if m.question in body["messages"][-1]["content"])
        gold = "".join(m.answer)
        chain = f"Let me think step by step about question {i}. The stem points to {gold}."
        return f"<think>\n{chain}\n</think>\n\n" + styles[i % len(styles)].format(a=gold)

    s = stub(answer)
    for mode in ("keep", "drop"):
        out = tmp_path / mode
        r = recipe(out, backend="openai", base_url=s.url, model="qwq", limit=6, retries=0, reasoning=mode)
        m = run_teach(r, quiet())
        assert m["kept"] == 6 and m["unparseable"] == 0, m
        for row in rows(out / "teach" / "templates.jsonl"):
            target = row["target"]
            assert target.endswith(answer_line(row["answer"], row["lang"]))
            assert ("<think>" in target and "Let me think step by step" in target) == (mode == "keep")
            assert split_template(target) == (row["plan"], row["steps"])
    assert m["with_reasoning"] == 0  # (drop)
    # The targets are what SFT trains on: the chain of thought is in them.
    from medcritical.sft import sft_examples

    kept = rows(tmp_path / "keep" / "teach" / "templates.jsonl")
    assert all(ex["completion"][0]["content"].startswith("<think>") for ex in sft_examples(kept))


def test_low_keep_rate_shows_rejected_replies(tmp_path: Path, stub):
    s = stub(lambda body: "I would go with the second option, probably.")
    console = Console(file=io.StringIO(), width=200)
    r = recipe(tmp_path, backend="openai", base_url=s.url, model="m", limit=5, retries=0)
    m = run_teach(r, console)
    out = console.file.getvalue()
    assert m["unparseable"] == 5 and out.count("rejected (unparseable") == 3
    assert "the teacher's format is the problem" in out and "second option" in out


# ---- llama-cpp-python's real OpenAI-compatible server -----------------------------------------


@pytest.fixture
def llama_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below, after the process
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", "2048", "--n_threads", "2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text(errors="replace")[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama_cpp.server did not come up in 90 s"
            time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_teach_against_llama_cpp_server_then_from_cache(tmp_path: Path, llama_server):
    url, proc = llama_server
    out = tmp_path / "run"
    r = recipe(
        out, backend="openai", base_url=url, model="smollm2", hinted=True,
        max_tokens=48, samples=2, limit=4, concurrency=2, retries=1,
    )  # fmt: skip
    m1 = run_teach(r, quiet())
    # SmolLM2-135M rarely writes a verified template; every question is still accounted for.
    assert sum(m1[k] for k in OUTCOMES) == m1["questions"] == 4 and m1["errors"] == 0
    assert 4 <= m1["teacher_calls"] <= 8 and m1["cache_hits"] == 0
    assert len(list((out / "cache" / "teach").rglob("*.json"))) == m1["teacher_calls"]
    decided = rows(out / "teach" / "templates.jsonl") + rows(out / "teach" / "rejected.jsonl")
    assert sorted(x["id"] for x in decided) == sorted(m.id for m in train_questions(4))

    # The server is gone: deciding everything again must come entirely from the cache.
    proc.terminate()
    proc.wait(10)
    wipe_outputs(out)
    m2 = run_teach(r, quiet())
    assert (m2["teacher_calls"], m2["cache_hits"]) == (0, m1["teacher_calls"])
    assert {k: m2[k] for k in OUTCOMES} == {k: m1[k] for k in OUTCOMES}
    # A complete step is not even looked up again; one whose manifest was lost is redone, from the cache.
    assert run_teach(r, quiet()) == m2
    (out / "teach" / "manifest.json").unlink()
    m3 = run_teach(r, quiet())
    assert (m3["teacher_calls"], m3["cache_hits"]) == (0, m1["teacher_calls"])


# ---- local backends -----------------------------------------------------------------------------


def test_gguf_backend_and_cache(tmp_path: Path):
    r = recipe(tmp_path, backend="gguf", model=str(default_gguf()), max_tokens=16, limit=2)
    m = run_teach(r, quiet())
    assert sum(m[k] for k in OUTCOMES) == 2 and m["teacher_calls"] == 2
    wipe_outputs(tmp_path)
    assert run_teach(r, quiet())["cache_hits"] == 2


def test_transformers_backend(tmp_path: Path, tiny_llama: Path):
    r = recipe(tmp_path, backend="transformers", model=str(tiny_llama), max_tokens=8, limit=3, concurrency=2)
    m = run_teach(r, quiet())
    assert sum(m[k] for k in OUTCOMES) == 3 and m["errors"] == 0 and m["teacher_calls"] == 3
