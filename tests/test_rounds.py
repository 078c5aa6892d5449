"""Self-correction rounds on tiny models on CPU: transformers on the 4-bit model, and
llama.cpp on the policy's cached q8_0 GGUF (``rounds.rollouts.engine``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from medcritical.artifacts import JsonlLog, read_manifest, sha256_tree
from medcritical.errors import UserError
from medcritical.grading import extract_answer
from medcritical.recipe import load_recipe
from medcritical.rounds import engine_kind, eval_policy, run_round
from medcritical.sft import run_sft
from tests.test_sft import write_templates

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


def test_one_round_pairs_are_verified_and_dpo_loss_falls(tiny_llama: Path, tmp_path: Path):
    run = tmp_path / "run"
    recipe = _sft(run, tiny_llama)
    m = run_round(recipe, 1, console=Console(stderr=True))
    rdir = run / "rounds" / "round-1"
    rolled = JsonlLog(rdir / "rollouts.jsonl")
    assert len(rolled) == 6 and all(len(r["samples"]) == 2 for r in rolled.values())
    pairs = [json.loads(x) for x in (rdir / "pairs.jsonl").read_text().splitlines()]
    # A random tiny model is almost never right by itself, so pairs may be few; the
    # structure and the verification are what this checks.
    for p in pairs:
        assert p["prompt"][-1]["role"] == "user" and p["chosen"][0]["role"] == "assistant"
        assert p["chosen"][0]["content"] != p["rejected"][0]["content"]
    corr = JsonlLog(rdir / "corrections.jsonl")
    for c in corr.values():
        if c["verified"]:
            assert any(a["correct"] for a in c["attempts"])
    assert m["corrections_tried"] == sum(not s["correct"] for r in rolled.values() for s in r["samples"])
    # A 2-layer random model is rarely right, so a round may have no verified pair:
    # then the policy must carry over unchanged (and the round still completes).
    if pairs:
        assert (rdir / "adapter" / "adapter_model.safetensors").exists()
        assert m["dpo_last_loss"] < m["dpo_first_loss"]
    else:
        assert m["dpo_steps"] == 0
        assert (rdir / "adapter" / "adapter_model.safetensors").read_bytes() == (
            run / "sft" / "adapter" / "adapter_model.safetensors"
        ).read_bytes()
    assert "dev_accuracy" in m and (run / "rounds" / "round-1" / "manifest.json").exists()


def test_dpo_on_verified_pairs_loss_falls(tiny_llama: Path, tmp_path: Path):
    """DPO on pairs whose chosen side is verified against the key (built from the
    demo set's own explanations so they exist even for a random model)."""
    from medcritical.dpo import run_dpo
    from medcritical.prompts import question_messages, render_template

    run = tmp_path / "run"
    recipe = _sft(run, tiny_llama)
    rows = [json.loads(x) for x in (run / "teach" / "templates.jsonl").read_text().splitlines()]
    rdir = run / "rounds" / "round-1"
    rdir.mkdir(parents=True)
    with open(rdir / "pairs.jsonl", "w", encoding="utf-8") as f:
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
    m = run_dpo(recipe, rdir / "pairs.jsonl", run / "sft" / "adapter", rdir, Console(stderr=True))
    assert m["steps"] == 6
    assert m["first_loss"] == m["first_loss"] and m["last_loss"] < m["first_loss"]  # finite and falling
    assert m["reward_margin_last"] > m["reward_margin_first"]
    saved = json.loads((rdir / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == recipe.sft.lora.r and not (rdir / "adapter" / "ref").exists()


def test_killed_round_resumes_without_regenerating(tiny_llama: Path, tmp_path: Path):
    run = tmp_path / "run"
    _sft(run, tiny_llama)
    rdir = run / "rounds" / "round-1"
    cmd = [sys.executable, "-m", "medcritical", "rounds", "-", "--round", "1", "--only", "rollouts"]
    overrides = [
        o.replace("rounds.rollouts.questions=6", "rounds.rollouts.questions=8") for o in _overrides(run, tiny_llama)
    ]
    overrides += ["rounds.rollouts.batch_size=2", "rounds.rollouts.max_new_tokens=64"]
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("{}\n")
    cmd[4] = str(recipe_file)
    proc = subprocess.Popen(
        cmd + overrides,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    log = rdir / "rollouts.jsonl"
    deadline = time.time() + 240
    while (
        proc.poll() is None and time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2)
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = log.read_text().splitlines()
    assert 2 <= len(first) < 8, "killed mid-round"
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"id": "torn')  # as if killed mid-write
    assert subprocess.run(cmd + overrides, capture_output=True).returncode == 0
    done = log.read_text().splitlines()
    assert len(done) == 8
    assert done[: len(first)] == first  # finished rollouts were kept, not regenerated


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_llamacpp_round_samples_from_cached_policy_gguf_and_resumes(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MEDCRITICAL_LLAMA_THREADS", "1")  # a 2-layer model runs best on one thread
    run = tmp_path / "run"
    recipe = _sft(run, tiny_llama, "rounds.rollouts.engine=llamacpp")
    console = Console(stderr=True)
    rdir = run / "rounds" / "round-1"
    sft = run / "sft" / "adapter"
    gguf = run / "policies" / sha256_tree(sft)[:16] / "policy-q8_0.gguf"

    run_round(recipe, 1, console, only="rollouts")
    assert gguf.is_file()
    policy = read_manifest(gguf.parent)
    assert policy["status"] == "complete" and policy["config"]["qtype"] == "q8_0"
    assert sorted(p.name for p in gguf.parent.glob("*.gguf")) == [gguf.name]  # the f16 was deleted
    assert not (gguf.parent / "merged").exists() and not list((run / "policies").glob(".*"))
    stamp = _stamp(gguf)
    log = rdir / "rollouts.jsonl"
    rows = log.read_text().splitlines()
    assert len(rows) == 6 and all(json.loads(r)["engine"] == "llamacpp" for r in rows)

    # Killed mid-rollouts: two rows written, a third torn. The rerun keeps them and reuses the GGUF.
    log.write_text("\n".join(rows[:2]) + '\n{"id": "torn')
    m = run_round(recipe, 1, console)
    assert _stamp(gguf) == stamp, "the SFT adapter's GGUF was exported again"
    done = log.read_text().splitlines()
    assert len(done) == 6 and done[:2] == rows[:2]
    assert m["rollout_engine"] == "llamacpp" and m["eval_engine"] == "llamacpp"
    assert m["correction_engine"] in ("llamacpp", None)  # None only if every sample was right
    manifest = read_manifest(rdir)
    assert manifest["engines"]["policy"] == {"engine": "llamacpp", "gguf": str(gguf)}  # corrections by SFT = start
    for row in JsonlLog(rdir / "corrections.jsonl").values():
        assert row["engine"] == "llamacpp"
    # The round's own adapter was evaluated on its GGUF (the same file if DPO had no pair to learn from).
    evaluated = run / "policies" / sha256_tree(rdir / "adapter")[:16] / "policy-q8_0.gguf"
    assert evaluated.is_file() and read_manifest(rdir / "eval")["gguf"] == str(evaluated)
    assert run_round(recipe, 1, console) == m  # up to date

    # The untrained base, for the pipeline's "base" row: its own q8_0 GGUF, cached like the others.
    ev = eval_policy(recipe, None, run / "eval" / "base", console)
    assert ev["engine"] == "llamacpp" and ev["n"] == 4
    base = [p for p in (run / "policies").glob("base-*/policy-q8_0.gguf")]
    assert len(base) == 1 and read_manifest(base[0].parent)["config"]["adapter"] is None
    stamp = _stamp(base[0])
    assert eval_policy(recipe, None, run / "eval" / "base", console) == ev
    assert _stamp(base[0]) == stamp
    # Same directory, other engine: refused in one line, not mixed.
    other = recipe.model_copy(deep=True)
    other.rounds.rollouts.engine = "transformers"
    with pytest.raises(UserError, match="engine"):
        eval_policy(other, None, run / "eval" / "base", console)


def test_engine_choice(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from medcritical.policy_gguf import recipe_policy_gguf

    recipe = _recipe(tmp_path / "run", tiny_llama, "rounds.rollouts.engine=auto")
    assert engine_kind(recipe) == "llamacpp"  # no CUDA here, and setup.sh installed the converter
    monkeypatch.setenv("MEDCRITICAL_CONVERTER", str(tmp_path / "nowhere"))
    assert engine_kind(recipe) == "transformers"
    recipe.rounds.rollouts.engine = "llamacpp"
    with pytest.raises(UserError, match="GGUF converter not found"):
        recipe_policy_gguf(recipe, None)
    assert not (tmp_path / "run" / "policies").exists() or not list((tmp_path / "run" / "policies").iterdir())


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
    assert [(k, t) for k, _, t in every] == [("q1#2", "Answer: B"), ("q1#3", "Answer: C"), ("q1#0", "truncated")]
    assert [k for k, _, _ in to_correct(rows, {"q1": q}, 1)] == ["q1#2"]
    assert load_recipe(None, ["rounds.correction.per_question=1"]).rounds.correction.per_question == 1
    with pytest.raises(UserError, match="per_question"):
        load_recipe(None, ["rounds.correction.per_question=0"])
