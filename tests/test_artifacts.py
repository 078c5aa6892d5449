"""The artifact model: atomic files, resumable logs, steps keyed by their inputs, one process per run."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medcritical.artifacts import JsonlLog, atomic_dir, model_fingerprint
from medcritical.errors import UserError
from medcritical.steps import EVENTS, Step, derive_seed, pending_chunks, run_lock


def test_jsonl_log_drops_torn_last_line(tmp_path: Path):
    p = tmp_path / "log.jsonl"
    log = JsonlLog(p)
    assert p.exists() and len(log) == 0  # an empty log is a result too
    log.append({"id": "a", "x": 1})
    log.append({"id": "b", "x": 2})
    with open(p, "a", encoding="utf-8") as f:
        f.write('{"id": "c", "x"')  # a crash mid-write
    again = JsonlLog(p)
    assert again.torn == 1 and len(again) == 2 and "c" not in again
    again.append({"id": "c", "x": 3})
    assert [json.loads(x)["id"] for x in p.read_text().splitlines()] == ["a", "b", "c"]


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "model"
    try:
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    except RuntimeError:
        pass
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"x")
    assert (target / "w.bin").exists()


def test_step_skips_resumes_and_moves_aside(tmp_path: Path, capsys):
    from rich.console import Console

    run = tmp_path / "run"
    console = Console(stderr=True, width=200)
    a = Step("sft", run / "sft", {"sft": {"lr": 1}, "data": "abc"}, stale_root=run / ".stale", label="sft")
    assert a.state() == "empty" and a.begin(console) == "new"
    (a.dir / "checkpoint-2").mkdir()
    # Killed before the end: the same key resumes, and keeps what is there.
    same = Step("sft", run / "sft", {"sft": {"lr": 1}, "data": "abc"}, stale_root=run / ".stale")
    assert same.state() == "partial" and same.begin(console) == "resume" and (a.dir / "checkpoint-2").exists()
    (a.dir / "adapter.bin").write_bytes(b"w" * 10)
    a.done({"loss": 1.0}, outputs=["adapter.bin"])
    assert same.begin(console) == "complete" and same.metrics() == {"loss": 1.0}
    assert same.manifest()["outputs"]["adapter.bin"]["size"] == 10
    # An output that lost its bytes is not complete any more.
    (a.dir / "adapter.bin").write_bytes(b"w")
    assert same.state() == "partial"
    (a.dir / "adapter.bin").write_bytes(b"w" * 10)

    # Another learning rate: never resumed; the old directory goes to .stale with a note, said in one line.
    capsys.readouterr()
    b = Step("sft", run / "sft", {"sft": {"lr": 2}, "data": "abc"}, stale_root=run / ".stale", label="sft")
    assert b.state() == "other" and b.begin(console) == "new"
    err = capsys.readouterr().err
    assert "sft.lr changed" in err and ".stale" in err and len(err.strip().splitlines()) == 1
    assert not (b.dir / "checkpoint-2").exists() and not (b.dir / "adapter.bin").exists()
    moved = list((run / ".stale").rglob("adapter.bin"))
    assert len(moved) == 1 and moved[0].parent.name == "sft"
    note = next((run / ".stale").rglob("sft.STALE.txt")).read_text()
    assert "changed: sft.lr" in note and a.key in note and b.key in note
    assert EVENTS[-1]["outcome"] == "replaced" and EVENTS[-1]["changed"] == ["sft.lr"]

    # A directory with content but no manifest (an older layout, a crash before the first write) is replaced too.
    c = Step("eval", run / "eval" / "base", {"q": 1}, stale_root=run / ".stale")
    c.dir.mkdir(parents=True)
    (c.dir / "predictions.jsonl").write_text('{"id": "x"}\n')
    assert c.state() == "other" and c.begin() == "new" and not (c.dir / "predictions.jsonl").exists()


def test_keys_cover_material_and_code_version(tmp_path: Path, monkeypatch):
    from medcritical import steps

    a = Step("dpo", tmp_path / "d", {"beta": 0.1})
    assert a.key == Step("dpo", tmp_path / "elsewhere", {"beta": 0.1}).key  # where it lives is not what it is
    assert a.key != Step("dpo", tmp_path / "d", {"beta": 0.2}).key
    assert a.key != Step("sft", tmp_path / "d", {"beta": 0.1}).key
    a.begin()
    a.done()
    monkeypatch.setitem(steps.CODE, "dpo", steps.CODE["dpo"] + 1)  # the code that writes it changed
    again = Step("dpo", tmp_path / "d", {"beta": 0.1})
    assert again.state() == "other"
    _, changed = again.move_aside()
    assert any("code version" in c for c in changed)


def test_pending_chunks_are_cut_over_the_whole_list():
    ids = [f"q{i}" for i in range(7)]
    assert list(pending_chunks(ids, 3, set())) == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6])]
    # q0-q3 done: chunk 1 is redone whole (same members, same seed), chunk 0 skipped.
    assert list(pending_chunks(ids, 3, {"q0", "q1", "q2", "q3"})) == [(1, [3, 4, 5]), (2, [6])]
    assert derive_seed(0, "rollouts", 1, 0) != derive_seed(0, "rollouts", 2, 0)  # rounds sample afresh
    assert derive_seed(0, "rollouts", 1, 0) == derive_seed(0, "rollouts", 1, 0) < 2**31


def test_model_fingerprint_is_cheap_and_content_sensitive(tmp_path: Path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    fp = model_fingerprint(d)
    assert fp == model_fingerprint(d)
    (d / "model.safetensors").write_bytes(b"\1" + b"\0" * 999)
    assert model_fingerprint(d) != fp
    assert model_fingerprint("org/hub-name") == "name:org/hub-name"


def test_run_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path: Path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from medcritical.steps import run_lock\n"
         f"with run_lock(Path({str(run)!r}), 'medcritical run demo.yaml'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parent.parent)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by medcritical run demo.yaml \(pid {holder.pid}\)") as e:
            with run_lock(run, "medcritical sft"):
                pass
        assert "\n" not in str(e.value)
    finally:
        holder.kill()  # kill -9: the kernel drops the flock
        holder.wait()
    deadline = time.time() + 5
    while True:
        try:
            with run_lock(run, "second"):
                break
        except UserError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_ship_choice_is_measured_and_falls_back_to_the_most_faithful_file():
    """The bundle ships the smallest quant within tolerance; when none is, the one whose answers follow the
    merged model best (teacher-forced, then free-running), never the one that merely scored like it by chance:
    the demo's q4_k_m matched the merged model's 13.3% while q8_0 agreed with it on every teacher-forced answer."""
    from export.bundle import choose

    def row(acc, merged, agree, tf, size):
        return {"compared_accuracy": acc, "merged_accuracy": merged, "answer_agreement": agree,
                "tf_answer_agreement": tf, "size_bytes": size}  # fmt: skip

    demo = {"q8_0": row(0.2667, 0.1333, 0.7273, 1.0, 138), "q4_k_m": row(0.1333, 0.1333, 0.8, 0.8667, 100)}
    ship, why = choose(demo, ["q8_0", "q4_k_m"], 0.07)
    assert ship == "q8_0"
    assert "no candidate is within tolerance" in why and "teacher-forced answer agreement 100" in why
    both_ok = {"q8_0": row(0.30, 0.30, 0.99, 1.0, 138), "q4_k_m": row(0.29, 0.30, 0.95, 0.97, 100)}
    assert choose(both_ok, ["q8_0", "q4_k_m"], 0.07)[0] == "q4_k_m"  # smallest within tolerance
    assert choose(both_ok, ["q8_0", "q4_k_m"], 0.02)[0] == "q8_0"  # q4_k_m's agreement 95% < 98%
    with pytest.raises(UserError, match="was evaluated"):
        choose(both_ok, ["f16"], 0.02)
