"""``medcritical run`` end to end on a tiny 4-bit model: what ships is what the report says, a rerun
skips, a changed knob redoes exactly what depends on it, kill -9 resumes to the same result, and a second
run on the same directory is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from medcritical.artifacts import read_json, read_manifest, sha256_file, sha256_tree
from medcritical.cli import main
from medcritical.data import split_of
from medcritical.errors import UserError
from medcritical.layout import RunDir
from medcritical.pipeline import STAGES, check_upstream, select_stages
from medcritical.recipe import load_recipe
from medcritical.training import last_checkpoint

QUESTION = "Question: pick the right option."
OPTIONS = {"A": "alpha", "B": "beta"}


def write_data(path: Path) -> Path:
    """Questions built so that the run's course is known in advance.

    Every question reads the same, and the student (:func:`answering_model`) answers A in the template layout,
    which is every dev key: SFT's dev accuracy is 100%. Round 1's slice (the first 6 training questions) has
    key B: the student's corrections say A, none is verified, the round makes no pair and carries the policy
    over. Round 2's slice has key A: corrections of its garbled samples (sampled at temperature 3) are
    verified, and DPO on those pairs, at a learning rate chosen to wreck the model, makes dev accuracy fall:
    early stop keeps round 0, the SFT policy, which is what must ship.
    """
    train = [i for i in range(200) if split_of(f"q{i:03d}", 0, 0.2, 0.0) == "train"][:18]
    dev = [i for i in range(200) if split_of(f"q{i:03d}", 0, 0.2, 0.0) == "dev"][:4]
    rows = [
        {
            "id": f"q{i:03d}",
            "question": QUESTION,
            "options": OPTIONS,
            "answer": "B" if n < 6 else "A",
            "explanation": "Recall the fact.",
        }  # fmt: skip
        for n, i in enumerate(train + dev)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama that answers the question above with the dataset teacher's template and "Answer: A"."""
    from medcritical.data import MCQ
    from medcritical.prompts import question_messages, render_template
    from medcritical.teachers import dataset_template
    from tests.tiny_models import build_tiny_llama, teach_tiny_model

    q = MCQ(id="x", question=QUESTION, options=OPTIONS, answer=("A",), explanation="Recall the fact.")
    target = render_template(*dataset_template(q, "en"), ["A"], "en")
    path = build_tiny_llama(tmp_path_factory.mktemp("answering"))
    return teach_tiny_model(path, [(question_messages(QUESTION, OPTIONS, False, "en"), target)])


def write_recipe(path: Path, run: Path, model: Path, data: Path) -> Path:
    recipe = {
        "name": "tiny",
        "output_dir": str(run),
        "language": "en",
        "model": {"name_or_path": str(model), "load_in_4bit": False, "max_seq_length": 512},
        "data": {"sources": [{"path": str(data)}], "dev": 0.2, "test": 0.0},
        "teach": {"backend": "dataset"},
        "sft": {
            "max_length": 384,
            "lora": {"r": 8, "lora_alpha": 16},
            "train": {
                "max_steps": 6,
                "per_device_train_batch_size": 3,
                "learning_rate": 1.0e-5,
                "gradient_checkpointing": False,
                "save_steps": 2,
            },
        },  # fmt: skip
        "rounds": {
            "num_rounds": 2,
            # The scenario needs wrong samples in round 2: its garbled replies, read as stating no answer. Forced
            # to an answer, this student says A, the key, every time (tests/test_selfplay.py tests forcing).
            "force_answer": False,
            "rollouts": {
                "lead": False,
                "k": 2,
                "max_new_tokens": 80,
                "questions": 6,
                "temperature": 1.0,
                "top_p": 1.0,
                "engine": "llamacpp",
            },
            "correction": {"attempts": 1, "max_new_tokens": 80, "temperature": 0.0, "per_question": 1},
            "pairs": {"strategy": "mixed", "max_length": 512},
            "dpo": {
                "train": {
                    "num_train_epochs": 2,
                    "per_device_train_batch_size": 2,
                    "learning_rate": 0.3,
                    "lr_scheduler_type": "constant",
                    "warmup_steps": 0,
                    "gradient_checkpointing": False,
                    "save_steps": 2,
                }
            },
        },  # fmt: skip
        "export": {"quants": ["q8_0"], "parity_questions": 4},
        "eval": {"max_new_tokens": 80, "batch_size": 4},
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medcritical", "run", str(recipe), *extra]


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    return os.environ | {"PYTHONPATH": str(root), "MEDCRITICAL_LLAMA_THREADS": "1"}


def _temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def finished_run(answering_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pipeline")
    run = tmp / "run"
    recipe = write_recipe(tmp / "tiny.yaml", run, answering_model, write_data(tmp / "q.jsonl"))
    res = subprocess.run(_cmd(recipe), env=_env(), capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return recipe, run


def test_run_end_to_end_ships_what_the_report_says(finished_run):
    """Round 2 regresses, so round 0 (SFT) stays the policy: rounds.json, the exported GGUF's metadata, the
    report, the bundle's card and its GGUF all name it, and the bundle verifies."""
    from medcritical.gguf.convert import gguf_metadata

    recipe, run = finished_run
    manifest = read_manifest(run)
    assert manifest["status"] == "complete" and list(manifest["stages"]) == list(STAGES)
    for stage in STAGES:
        rec = manifest["stages"][stage]
        assert rec["status"] == "complete" and rec["seconds"] > 0 and rec["peak_rss_mb"] > 20, (stage, rec)
    # Each stage ran in its own process: training's memory is its own, not the pipeline's.
    assert manifest["stages"]["sft"]["peak_rss_mb"] > manifest["stages"]["teach"]["peak_rss_mb"] + 200

    rounds = read_json(run / "rounds" / "rounds.json")
    r1, r2 = rounds["rounds"][1], rounds["rounds"][2]
    assert r1["pairs_pairs"] == 0 and r1["adapter"] == "sft/adapter"  # carried over, said so
    # How many pairs the tiny model's samples yield depends on the CPU's arithmetic (2 on one machine, 4 on
    # another); the steps follow from them: 2 epochs of batches of 2.
    assert r2["pairs_pairs"] > 0 and r2["adapter"] == "rounds/round-2/dpo/adapter"
    assert r2["dpo_steps"] == 2 * -(-r2["pairs_pairs"] // 2)
    assert r2["dev_accuracy"] < rounds["rounds"][0]["dev_accuracy"] == 1.0
    assert rounds["selected"] == 0 and "round 2: dev accuracy fell" in rounds["stopped"]
    sft_hash = sha256_tree(run / "sft" / "adapter")
    assert rounds["chain"] == [{"round": 0, "adapter": "sft/adapter", "hash": sft_hash}]

    meta = gguf_metadata(run / "export" / "tiny-q8_0.gguf")
    assert meta["medcritical.round"] == "0" and meta["medcritical.adapter_sha256"] == sft_hash
    report = read_json(run / "report.json")
    assert report["policy_round"] == 0 and report["shipped"] == "q8_0"
    assert [r["stage"] for r in report["accuracy"]] == [
        "base",
        "sft (policy)",
        "round 1",
        "round 2",
        "gguf q8_0 (shipped)",
    ]
    shipped = Path(report["shipped_file"])
    assert shipped.parent == run / "bundle" and sha256_file(shipped) == sha256_file(run / "export" / "tiny-q8_0.gguf")
    card = (run / "bundle" / "MODEL_CARD.md").read_text()
    assert "shipped policy: **round 0**" in card and "not a medical device" in card
    modelfile = (run / "bundle" / "tiny-q8_0.Modelfile").read_text()
    from medcritical.prompts import SYSTEM

    assert f'SYSTEM """{SYSTEM["en"]}"""' in modelfile
    assert main(["verify", str(run / "bundle")]) == 0
    md = (run / "report.md").read_text()
    assert "## Accuracy on the dev split" in md and "Policy: round 0" in md
    assert (run / "report.png").stat().st_size > 10_000
    assert not _temp_files(run)


def test_verify_fails_on_a_flipped_byte(finished_run, tmp_path: Path, capsys):
    import shutil

    _, run = finished_run
    bundle = shutil.copytree(run / "bundle", tmp_path / "bundle")
    gguf = bundle / "tiny-q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "tiny-q8_0.gguf" in err and "Traceback" not in err


def test_killed_mid_stage_resumes_to_the_same_result(finished_run, answering_model: Path, tmp_path: Path):
    """kill -9 of the whole run inside SFT, then the same command: the resumed run ends with the same
    adapter (from its checkpoint), the same policy choice and the same shipped file, byte for byte, as the
    run that never stopped (another output directory, the same recipe otherwise)."""
    done_recipe, done = finished_run
    run = tmp_path / "run"
    data = Path(yaml.safe_load(done_recipe.read_text())["data"]["sources"][0]["path"])
    recipe = write_recipe(tmp_path / "tiny.yaml", run, answering_model, data)
    proc = subprocess.Popen(
        _cmd(recipe), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = run / "sft" / "checkpoints" / "checkpoint-2" / "trainer_state.json"  # written last
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its stage child
    proc.wait()
    assert ckpt.exists(), "the run never reached the SFT checkpoint"
    assert (read_manifest(run / "sft") or {}).get("status") != "complete", "killed after SFT had finished"
    assert read_manifest(run)["status"] == "running"

    res = subprocess.run(_cmd(recipe), env=_env(), capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_manifest(run)["status"] == "complete"
    assert read_manifest(run / "sft")["metrics"]["resumed_from"] is not None
    for rel in (
        "teach/templates.jsonl",
        "sft/adapter/adapter_model.safetensors",
        "rounds/round-1/rollouts/rollouts.jsonl",
        "rounds/round-2/pairs/pairs.jsonl",
        "rounds/round-2/dpo/adapter/adapter_model.safetensors",
        "export/report.md",
    ):
        assert sha256_file(run / rel) == sha256_file(done / rel), rel
    assert read_json(run / "rounds" / "rounds.json")["selected"] == 0
    assert sha256_file(run / "bundle" / "tiny-q8_0.gguf") == sha256_file(done / "bundle" / "tiny-q8_0.gguf")
    assert not _temp_files(run)


def _kill_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 600) -> None:
    """Start ``cmd``, kill -9 its whole process group as soon as ``ready()``, and check it got there."""
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ready(), "the run finished or failed before the point where it was to be killed"


def test_killed_inside_dpo_and_inside_export_resume_to_the_same_files(finished_run, tmp_path: Path):
    """A copy of the finished run without round 2's DPO and what follows it: killed (-9) right after DPO's
    first checkpoint, then run again, its DPO adapter is the finished run's byte for byte; killed again
    inside the export (a GGUF stamped, parity not done) and run again, so are the exported GGUFs."""
    import shutil

    recipe, done = finished_run
    run = tmp_path / "run"
    shutil.copytree(done, run, ignore=shutil.ignore_patterns(".lock", ".stale", ".pipeline"))
    for rel in ("rounds/round-2/dpo", "rounds/round-2/eval", "rounds/rounds.json", "export", "eval", "bundle"):
        p = run / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    copy = tmp_path / "tiny.yaml"
    copy.write_text(recipe.read_text().replace(str(done), str(run)), encoding="utf-8")

    ckpt = run / "rounds" / "round-2" / "dpo" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    _kill_when(_cmd(copy, "--from", "rounds"), ckpt.exists)
    assert not (run / "rounds" / "round-2" / "dpo" / "adapter").exists()
    _kill_when(_cmd(copy, "--from", "rounds"), lambda: (run / "export" / "tiny-f16.gguf").exists())
    assert (read_manifest(run / "export") or {}).get("status") == "running"
    res = subprocess.run(_cmd(copy), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_manifest(run / "rounds" / "round-2" / "dpo")["metrics"]["resumed_from"].endswith("checkpoint-2")
    for rel in ("rounds/round-2/dpo/adapter/adapter_model.safetensors", "export/tiny-f16.gguf",
                "export/tiny-q8_0.gguf", "bundle/tiny-q8_0.gguf"):  # fmt: skip
        assert sha256_file(run / rel) == sha256_file(done / rel), rel
    assert not _temp_files(run)


def test_rerun_skips_every_stage_and_a_changed_knob_redoes_what_depends_on_it(finished_run):
    recipe, run = finished_run
    res = subprocess.run(_cmd(recipe), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    stages = read_manifest(run)["stages"]
    assert all(stages[s]["skipped"] for s in STAGES), {s: stages[s]["did"] for s in STAGES}
    assert "medcritical chat" in res.stdout and "medcritical verify" in res.stdout

    # DPO's beta: the rounds redo round 2's DPO (round 1 made no pair: nothing to redo) and its evaluation;
    # teach and sft are untouched; the policy and what ships stay the same file.
    res = subprocess.run(_cmd(recipe, "rounds.dpo.beta=0.2"), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    stages = read_manifest(run)["stages"]
    assert stages["teach"]["skipped"] and stages["sft"]["skipped"]
    redone = {e["step"] for e in stages["rounds"]["steps"] if e["outcome"] != "skipped"}
    assert {"round 2 dpo", "eval round 2"} <= redone and not any(s.startswith("round 1") for s in redone)
    assert "rounds: redone: round 2 dpo (inputs changed: dpo.beta)" in " ".join(res.stderr.split())
    assert (run / ".stale").is_dir() and list((run / ".stale").rglob("dpo.STALE.txt"))
    from medcritical.gguf.convert import gguf_metadata

    assert read_json(run / "rounds" / "rounds.json")["selected"] == 0  # round 2 regresses again
    assert gguf_metadata(run / "bundle" / "tiny-q8_0.gguf")["medcritical.round"] == "0"

    # Every stage is now complete for beta 0.2; `--from export` with the recipe as written (0.1) is refused in
    # one line before anything runs, rather than exporting rounds made with other settings.
    check_upstream("bundle", load_recipe(recipe, ["rounds.dpo.beta=0.2"]), RunDir(run), Console(stderr=True))
    res = subprocess.run(_cmd(recipe, "--from", "export"), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and read_manifest(run)["status"] == "complete"
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert errors == ["error: round 2 dpo: made for other inputs (dpo.beta changed); run the rounds stage first"]


def test_second_run_on_the_same_directory_is_refused(finished_run):
    recipe, run = finished_run
    first = subprocess.Popen(_cmd(recipe), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (run / ".lock").read_text().strip() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(_cmd(recipe), env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert f"is in use by medcritical run {recipe} (pid {first.pid})" in " ".join(second.stderr.split())
        assert "Traceback" not in second.stderr and len(lines) == 1
    finally:
        first.wait(timeout=600)
    assert first.returncode == 0


def test_last_checkpoint_skips_a_torn_one(tmp_path: Path):
    for step, state in ((2, '{"global_step": 2}'), (4, None), (6, '{"global_st')):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert last_checkpoint(tmp_path / "missing") is None


def test_stage_selection_and_errors(tmp_path: Path, capfd):
    assert select_stages() == list(STAGES)
    assert select_stages(start="rounds") == ["rounds", "export", "eval", "bundle"]
    assert select_stages(only="export") == ["export"]
    with pytest.raises(UserError):
        select_stages(start="sft", only="sft")
    # --only sft on an empty run dir: a one-line error naming the stage it needs, exit 1, before anything starts.
    data = write_data(tmp_path / "q.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", tmp_path / "no-model", data)
    assert main(["run", str(recipe), "--only", "sft"]) == 1
    err = capfd.readouterr().err
    assert "teach: not done; run the teach stage first" in err and "Traceback" not in err
    assert read_manifest(tmp_path / "run") is None


def test_inference_only_install_verifies_evaluates_chats_and_serves_the_bundle(finished_run, tmp_path: Path):
    """What a hospital laptop gets: `bash setup.sh --infer` in a fresh venv (no torch, no transformers), then
    verify, eval, chat and serve the bundle from it."""
    import socket
    import urllib.request

    _, run = finished_run
    root = Path(__file__).resolve().parent.parent
    venv = tmp_path / "infer-venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")} | {
        "MEDCRITICAL_VENV": str(venv)
    }
    setup = subprocess.run(
        ["bash", str(root / "setup.sh"), "--infer"], env=env, capture_output=True, text=True, timeout=1200
    )
    assert setup.returncode == 0, setup.stderr[-3000:]
    bin_ = venv / "bin"
    for module in ("torch", "transformers", "trl"):
        assert subprocess.run([bin_ / "python", "-c", f"import {module}"], capture_output=True).returncode != 0, module
    gguf = run / "bundle" / "tiny-q8_0.gguf"

    def medcritical(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([bin_ / "medcritical", *args], env=env, capture_output=True, text=True, timeout=300, **kw)

    res = medcritical("verify", str(run / "bundle"))
    assert res.returncode == 0 and "as recorded" in res.stdout, res.stderr
    res = medcritical(
        "eval", "--model", str(gguf), "--limit", "2", "--max-new-tokens", "8", "--output", str(tmp_path / "ev")
    )
    assert res.returncode == 0 and (tmp_path / "ev" / "summary.json").is_file(), res.stderr
    res = medcritical("chat", str(gguf), "--max-tokens", "8", input="Which option?\n/exit\n")
    assert res.returncode == 0 and "model>" in res.stdout, res.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([bin_ / "medcritical", "serve", str(gguf), "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    models = json.loads(r.read())
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "serve did not come up"
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == ["tiny-q8_0"]
    finally:
        server.terminate()
        server.wait(10)
