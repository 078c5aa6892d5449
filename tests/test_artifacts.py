import json
from pathlib import Path

from medcritical.artifacts import JsonlLog, atomic_dir, is_complete, write_manifest


def test_jsonl_log_drops_torn_last_line(tmp_path: Path):
    p = tmp_path / "log.jsonl"
    log = JsonlLog(p)
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


def test_manifest_completion_depends_on_inputs(tmp_path: Path):
    m = write_manifest(tmp_path, "sft", {"lr": 1}, {"data": "abc"}, metrics={"loss": 1.0})
    assert m["versions"]["torch"] and m["metrics"]["loss"] == 1.0
    assert is_complete(tmp_path, {"lr": 1}, {"data": "abc"})
    assert not is_complete(tmp_path, {"lr": 2}, {"data": "abc"})
    assert not is_complete(tmp_path, {"lr": 1}, {"data": "changed"})
