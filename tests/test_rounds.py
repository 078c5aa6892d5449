"""Self-correction rounds on tiny models on CPU: transformers on the 4-bit model, and llama.cpp on the
policy's cached q8_0 GGUF (``rounds.rollouts.engine``); every part a step keyed by its inputs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from medcritical.artifacts import JsonlLog, read_manifest, sha256_file, sha256_tree
from medcritical.errors import UserError
from medcritical.grading import committed_answer, extract_answer
from medcritical.layout import RunDir
from medcritical.policy import engine_kind, policy_gguf
from medcritical.prompts import split_template
from medcritical.recipe import load_recipe
from medcritical.rounds import run_round
from tests.test_sft import run_sft, write_templates

ROUND = [
    "rounds.rollouts.engine=transformers",
    "rounds.rollouts.k=2",
    "rounds.rollouts.questions=6",
    "rounds.rollouts.max_new_tokens=40",
    "rounds.rollouts.temperature=1.0",
    "rounds.correction.max_new_tokens=40",
    "rounds.correction.attempts=2",
    "rounds.pairs.strategy=mixed",
    "rounds.pairs.max_length=512",
    "rounds.dpo.train.max_steps=6",
    "rounds.dpo.train.learning_rate=0.005",
    "rounds.dpo.train.per_device_train_batch_size=2",
    "rounds.dpo.train.lr_scheduler_type=constant",
    "rounds.dpo.train.warmup_steps=0",
    "rounds.dpo.train.gradient_checkpointing=false",
    "eval.max_new_tokens=16",
    "eval.limit=4",
    "data.dev=0.2",
]


def _overrides(run: Path, model: Path) -> list[str]:
    sft = ["sft.train.max_steps=4", "sft.max_length=384", "sft.train.save_steps=100"]
    return [f"output_dir={run}", f"model.name_or_path={model}", *sft, *ROUND]


def _recipe(run: Path, model: Path, *extra: str):
    return load_recipe(None, _overrides(run, model) + list(extra))


def _sft(run: Path, model: Path, *extra: str):
    write_templates(run, 8, short=True)
    recipe = _recipe(run, model, *extra)
    run_sft(recipe)
    return recipe


def _round(recipe, r: int = 1, only: str | None = None) -> dict:
    run = RunDir.of(recipe)
    return run_round(recipe, run, r, run.sft_adapter, sha256_tree(run.sft_adapter), Console(stderr=True), only=only)


def test_one_round_pairs_are_verified_and_dpo_loss_falls(tiny_llama: Path, tmp_path: Path):
    run = tmp_path / "run"
    recipe = _sft(run, tiny_llama)
    m = _round(recipe)
    rd = RunDir(run).round(1)
    rolled = JsonlLog(rd.rollouts_log)
    assert len(rolled) == 6 and all(len(r["samples"]) == 2 for r in rolled.values())
    pairs = [json.loads(x) for x in rd.pairs_file.read_text().splitlines()]
    # A random tiny model is almost never right by itself, so pairs may be few; the
    # structure and the verification are what this checks.
    for p in pairs:
        assert p["prompt"][-1]["role"] == "user" and p["chosen"][0]["role"] == "assistant"
        chosen = p["chosen"][0]["content"]
        assert chosen != p["rejected"][0]["content"]
        # A chosen reply commits: the key on its own final answer line (stated or forced); a correction's is its
        # last template, in the student layout. Both sides end in an answer line.
        assert committed_answer(chosen, "ABCDE") is not None
        assert committed_answer(p["rejected"][0]["content"], "ABCDE") is not None
        assert p["kind"] != "correction" or split_template(chosen) is not None
    corr = JsonlLog(rd.corrections_log)
    for c in corr.values():
        if c["verified"]:
            assert any(a["committed"] for a in c["attempts"])
    assert m["corrections_tried"] == sum(not s["correct"] for r in rolled.values() for s in r["samples"])
    # A 2-layer random model is rarely right, so a round may have no verified pair:
    # then the policy carries over unchanged (and the round still completes).
    if pairs:
        assert (rd.adapter / "adapter_model.safetensors").exists()
        assert m["dpo_last_loss"] < m["dpo_first_loss"]
    else:
        assert m["dpo_steps"] == 0 and m["adapter"] == "sft/adapter" and not rd.adapter.exists()
    assert "dev_accuracy" in m and (rd.root / "round.json").exists()
    for step in (rd.rollouts, rd.corrections, rd.pairs):
        assert read_manifest(step)["status"] == "complete"


def test_dpo_on_verified_pairs_loss_falls(tiny_llama: Path, tmp_path: Path):
    """DPO on pairs whose chosen side is verified against the key (built from the
    demo set's own explanations so they exist even for a random model)."""
    from medcritical.dpo import run_dpo
    from medcritical.prompts import question_messages, render_template

    run = tmp_path / "run"
    recipe = _sft(run, tiny_llama)
    rows = [json.loads(x) for x in (run / "teach" / "templates.jsonl").read_text().splitlines()]
    rd = RunDir(run).round(1)
    rd.pairs.mkdir(parents=True)
    with open(rd.pairs_file, "w", encoding="utf-8") as f:
        for r in rows:
            wrong = next(k for k in r["options"] if k not in r["answer"])
            rejected = render_template("Guess.", "No analysis.", [wrong], r["lang"])
            assert extract_answer(r["target"], r["options"]) == set(r["answer"])  # chosen is verified
            msgs = question_messages(r["question"], r["options"], len(r["answer"]) > 1, r["lang"])
            pair = {
                "prompt": msgs,
                "chosen": [{"role": "assistant", "content": r["target"]}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    m = run_dpo(recipe, rd.pairs_file, run / "sft" / "adapter", rd.dpo, Console(stderr=True))
    assert m["steps"] == 6
    assert m["first_loss"] == m["first_loss"] and m["last_loss"] < m["first_loss"]  # finite and falling
    assert m["reward_margin_last"] > m["reward_margin_first"]
    saved = json.loads((rd.adapter / "adapter_config.json").read_text())
    assert saved["r"] == recipe.sft.lora.r and not (rd.adapter / "ref").exists()


def _rollouts_cmd(recipe_file: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "medcritical", "rounds", str(recipe_file), "--round", "1", "--only", "rollouts",
            *overrides]  # fmt: skip


def test_killed_rollouts_resume_to_the_uninterrupted_result(tiny_llama: Path, tmp_path: Path):
    """kill -9 inside the rollouts step, then the same command: the finished rows are kept, the chunk that
    was cut is redone with its own seed, and the log equals (by hash) one from a run that never stopped."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("{}\n")
    extra = ["rounds.rollouts.questions=8", "rounds.rollouts.batch_size=2", "rounds.rollouts.max_new_tokens=48"]

    def setup(run: Path) -> list[str]:
        _sft(run, tiny_llama)
        return [o for o in _overrides(run, tiny_llama) if "rollouts.questions" not in o] + extra

    whole = tmp_path / "whole"
    assert subprocess.run(_rollouts_cmd(recipe_file, setup(whole)), capture_output=True).returncode == 0

    run = tmp_path / "run"
    overrides = setup(run)
    log = RunDir(run).round(1).rollouts_log
    proc = subprocess.Popen(_rollouts_cmd(recipe_file, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while (
        proc.poll() is None and time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2)
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = log.read_text().splitlines()
    assert 2 <= len(first) < 8, "killed mid-step"
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"id": "torn')  # as if killed mid-write
    assert subprocess.run(_rollouts_cmd(recipe_file, overrides), capture_output=True).returncode == 0
    done = log.read_text().splitlines()
    assert len(done) == 8 and done[: len(first)] == first  # finished rows were kept, not regenerated
    assert sha256_file(log) == sha256_file(RunDir(whole).round(1).rollouts_log)


def test_rollouts_follow_their_policy_and_round(tiny_llama: Path, tmp_path: Path):
    """A new SFT adapter under an existing round regenerates the rollouts (the old ones are moved aside,
    never reused), and another round number samples afresh from the same policy."""
    run = tmp_path / "run"
    recipe = _sft(run, tiny_llama, "rounds.rollouts.temperature=1.5")
    _round(recipe, only="rollouts")
    rd = RunDir(run).round(1)
    old = sha256_file(rd.rollouts_log)
    assert _round(recipe, only="rollouts") and sha256_file(rd.rollouts_log) == old  # same inputs: kept
    # The same questions in round 2 (one slice of 6 covers them all here): other seeds, other samples.
    recipe2 = _recipe(run, tiny_llama, "rounds.rollouts.temperature=1.5", "rounds.rollouts.questions=50")
    r1 = run_round(recipe2, RunDir(run), 1, RunDir(run).sft_adapter, sha256_tree(RunDir(run).sft_adapter),
                   Console(stderr=True), only="rollouts")  # fmt: skip
    r2 = run_round(recipe2, RunDir(run), 2, RunDir(run).sft_adapter, sha256_tree(RunDir(run).sft_adapter),
                   Console(stderr=True), only="rollouts")  # fmt: skip
    texts = lambda r: [
        s["text"] for row in JsonlLog(RunDir(run).round(r).rollouts_log).values() for s in row["samples"]
    ]
    assert r1["questions"] == r2["questions"] and texts(1) != texts(2)

    # New SFT adapter (another learning rate): round 1's rollouts are redone from it.
    before = sha256_file(rd.rollouts_log)
    stale = len(list((run / ".stale").rglob("rollouts.jsonl")))
    recipe3 = _recipe(run, tiny_llama, "rounds.rollouts.temperature=1.5", "rounds.rollouts.questions=50",
                      "sft.train.learning_rate=0.01")  # fmt: skip
    run_sft(recipe3)
    _round(recipe3, only="rollouts")
    assert read_manifest(rd.rollouts)["material"]["policy"] == sha256_tree(RunDir(run).sft_adapter)
    assert sha256_file(rd.rollouts_log) != before
    assert len(list((run / ".stale").rglob("rollouts.jsonl"))) == stale + 1


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_llamacpp_round_samples_from_cached_policy_gguf_and_resumes(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from medcritical.evaluate import eval_policy

    monkeypatch.setenv("MEDCRITICAL_LLAMA_THREADS", "1")  # a 2-layer model runs best on one thread
    run = tmp_path / "run"
    recipe = _sft(run, tiny_llama, "rounds.rollouts.engine=llamacpp")
    console = Console(stderr=True)
    rd = RunDir(run).round(1)
    sft = run / "sft" / "adapter"

    _round(recipe, only="rollouts")
    (gguf,) = (run / "policies").glob("*/policy-q8_0.gguf")
    policy = read_manifest(gguf.parent)
    assert policy["status"] == "complete" and policy["adapter"] == sha256_tree(sft)
    assert not list((run / "policies").glob(".*"))
    stamp = _stamp(gguf)
    rows = rd.rollouts_log.read_text().splitlines()
    assert len(rows) == 6 and all(json.loads(r)["engine"] == "llamacpp" for r in rows)

    # Killed mid-rollouts: two rows written, a third torn. The rerun keeps them and reuses the GGUF.
    rd.rollouts_log.write_text("\n".join(rows[:2]) + '\n{"id": "torn')
    manifest = read_manifest(rd.rollouts)
    manifest["status"] = "running"
    (rd.rollouts / "manifest.json").write_text(json.dumps(manifest))
    m = _round(recipe)
    assert _stamp(gguf) == stamp, "the SFT adapter's GGUF was exported again"
    assert rd.rollouts_log.read_text().splitlines() == rows  # the same samples as before the kill
    assert m["rollout_engine"] == "llamacpp" and m["eval_engine"] == "llamacpp"
    assert m["correction_engine"] in ("llamacpp", None)  # None only if every sample was right
    for row in JsonlLog(rd.corrections_log).values():
        assert row["engine"] == "llamacpp"
    # The round's own policy was evaluated on its GGUF (the SFT policy's own evaluation if no pair was made).
    if m["adapter"] != "sft/adapter":
        assert read_manifest(rd.eval)["gguf"].endswith("policy-q8_0.gguf")
    assert _round(recipe) == m  # up to date

    # The untrained base, for the pipeline's "base" row: its own q8_0 GGUF, cached like the others.
    ev = eval_policy(recipe, None, run / "eval" / "base", console)
    assert ev["engine"] == "llamacpp" and ev["n"] == 4
    base = [p for p in (run / "policies").glob("*/manifest.json") if read_manifest(p.parent)["adapter"] is None]
    assert len(base) == 1
    assert eval_policy(recipe, None, run / "eval" / "base", console) == ev
    # Same directory, other engine: another evaluation, never mixed with this one.
    other = recipe.model_copy(deep=True)
    other.rounds.rollouts.engine = "transformers"
    assert eval_policy(other, None, run / "eval" / "base", console)["engine"] == "transformers"


def test_engine_choice(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recipe = _recipe(tmp_path / "run", tiny_llama, "rounds.rollouts.engine=auto")
    assert engine_kind(recipe) == "llamacpp"  # no CUDA here, and setup.sh installed the converter
    monkeypatch.setenv("MEDCRITICAL_CONVERTER", str(tmp_path / "nowhere"))
    assert engine_kind(recipe) == "transformers"
    with pytest.raises(UserError, match="GGUF converter not found"):
        policy_gguf(str(tiny_llama), None, tmp_path / "run" / "policies")


def test_to_correct_caps_per_question_stated_wrong_answers_first():
    from medcritical.data import MCQ
    from medcritical.selfplay import to_correct

    q = MCQ(id="q1", question="Which?", options={"A": "a", "B": "b", "C": "c"}, answer=("A",))
    samples = [
        {"text": "truncated", "parsed": None, "correct": False},
        {"text": "Answer: A", "parsed": ["A"], "correct": True},
        {"text": "Answer: B", "parsed": ["B"], "correct": False},
        {"text": "Answer: C", "parsed": ["C"], "correct": False},
    ]
    rows = [{"id": "q1", "samples": samples}, {"id": "not-in-split", "samples": samples}]
    every = to_correct(rows, {"q1": q}, None)
    assert [(k, s["text"]) for k, _, s in every] == [
        ("q1#2", "Answer: B"),
        ("q1#3", "Answer: C"),
        ("q1#0", "truncated"),
    ]
    assert [k for k, _, _ in to_correct(rows, {"q1": q}, 1)] == ["q1#2"]
    assert load_recipe(None, ["rounds.correction.per_question=1"]).rounds.correction.per_question == 1
    with pytest.raises(UserError, match="per_question"):
        load_recipe(None, ["rounds.correction.per_question=0"])


def test_chosen_replies_must_commit():
    """What may be a chosen reply: the student layout and the key on its own final answer line. Replies the
    lenient evaluation reader credits but that commit to nothing never are (seen in a demo run)."""
    from medcritical.data import MCQ
    from medcritical.selfplay import as_chosen

    q = MCQ(id="q", question="Which?", options={k: k.lower() for k in "ABCDE"}, answer=("C",))
    good = "### Plan\nRecall.\n### Reasoning\nA and B are wrong; C fits.\nAnswer: C"
    chosen, why = as_chosen(good, q, "en")
    assert (
        why == "ok"
        and chosen.endswith("Answer: C")
        and split_template(chosen) == ("Recall.", "A and B are wrong; C fits.")
    )
    # A correction that quotes the wrong trajectory first keeps only its own last template.
    quoted = "### Plan\nold\n### Reasoning\nB fits.\nAnswer: B\n\nThat was wrong.\n" + good
    assert as_chosen(quoted, q, "en")[0] == chosen
    for text, reason in [
        ('### Plan\nx\n### Reasoning\ny\nThe incorrect answer is: "B"\nThe correct answer is:', "no_answer_line"),
        ("### Plan\nx\n### Reasoning\nC. E. None of these options are correct.", "no_answer_line"),
        ("I think the answer is C.", "no_answer_line"),
        ("C is correct, so\nAnswer: C", "no_layout"),
        ("### Plan\nx\n### Reasoning\ny\nAnswer: B", "wrong_answer"),
    ]:
        assert as_chosen(text, q, "en") == (None, reason), text
