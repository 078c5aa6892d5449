"""``medcritical run`` end to end on a tiny 4-bit model, and kill -9 mid-stage then resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medcritical.artifacts import read_json, read_jsonl, read_manifest, sha256_tree
from medcritical.cli import main
from medcritical.errors import UserError
from medcritical.pipeline import STAGES, select_stages
from medcritical.training import last_checkpoint


def write_recipe(path: Path, run: Path, model: Path, sft_steps: int = 6) -> Path:
    recipe = {
        "name": "tiny",
        "output_dir": str(run),
        "model": {"name_or_path": str(model), "max_seq_length": 512},
        "data": {"sources": [{"path": "demo", "limit": 40}], "dev": 0.2, "test": 0.0},
        "teach": {"backend": "dataset", "limit": 10},
        "sft": {
            "max_length": 384,
            "lora": {"r": 4, "lora_alpha": 8},
            "train": {
                "max_steps": sft_steps,
                "per_device_train_batch_size": 2,
                "learning_rate": 1e-3,
                "gradient_checkpointing": False,
                "save_steps": 2,
            },
        },
        "rounds": {
            "num_rounds": 1,
            "rollouts": {"k": 2, "max_new_tokens": 12, "questions": 4, "temperature": 1.0},
            "correction": {"attempts": 1, "max_new_tokens": 12},
            "pairs": {"strategy": "mixed", "max_length": 512},
            "dpo": {"train": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_checkpointing": False}},
        },
        "export": {"quants": ["q8_0"], "parity_questions": 2},
        "eval": {"limit": 3, "max_new_tokens": 8, "batch_size": 4},
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medcritical", "run", str(recipe), *extra]


def _env() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    return os.environ | {"PYTHONPATH": str(root), "COLUMNS": "120"}


def _no_temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def finished_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("pipeline")
    run = tmp / "run"
    recipe = write_recipe(tmp / "tiny.yaml", run, tiny_llama)
    res = subprocess.run(_cmd(recipe), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return recipe, run


def test_run_end_to_end_writes_every_artifact_and_report(finished_run):
    recipe, run = finished_run
    manifest = read_manifest(run)
    assert manifest["status"] == "complete"
    assert list(manifest["stages"]) == list(STAGES)
    for stage in STAGES:
        rec = manifest["stages"][stage]
        assert rec["status"] == "complete" and rec["seconds"] > 0 and rec["peak_rss_mb"] > 20, (stage, rec)
    # Each stage ran in its own process: training's memory is its own, not the pipeline's.
    assert manifest["stages"]["sft"]["peak_rss_mb"] > manifest["stages"]["teach"]["peak_rss_mb"] + 200
    assert read_manifest(run / "sft")["status"] == "complete"
    assert (run / "rounds" / "round-1" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "export" / "tiny-q8_0.gguf").stat().st_size > 0
    report = read_json(run / "report.json")
    stages = [r["stage"] for r in report["accuracy"]]
    assert stages == ["base", "sft", "round 1", "gguf q8_0"]
    assert all(r["n"] == 3 and 0 <= r["accuracy"] <= 1 for r in report["accuracy"])
    assert "sft" in report["final_losses"]
    assert (run / "report.png").stat().st_size > 10_000
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "## Accuracy on the dev split" in md and "gguf q8_0" in md
    assert not _no_temp_files(run)


def test_rerun_skips_every_stage(finished_run):
    recipe, run = finished_run
    adapter = sha256_tree(run / "rounds" / "round-1" / "adapter")
    res = subprocess.run(_cmd(recipe), env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    stages = read_manifest(run)["stages"]
    assert all(stages[s]["skipped"] for s in STAGES), {s: stages[s]["skipped"] for s in STAGES}
    assert sha256_tree(run / "rounds" / "round-1" / "adapter") == adapter
    assert "medcritical chat" in res.stdout


def test_killed_mid_stage_resumes_to_the_same_result(finished_run, tiny_llama: Path, tmp_path: Path):
    _, done = finished_run
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "tiny.yaml", run, tiny_llama)
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

    res = subprocess.run(_cmd(recipe), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_manifest(run)["status"] == "complete"
    assert read_manifest(run / "sft")["metrics"]["resumed_from"] is not None
    targets = lambda root: [(t["id"], t["target"]) for t in read_jsonl(root / "teach/templates.jsonl")]
    assert targets(run) == targets(done)
    # The resumed SFT ends where the uninterrupted one did.
    a, b = (
        load_file(run / "sft/adapter/adapter_model.safetensors"),
        load_file(done / "sft/adapter/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-2) for k in a)
    files = lambda root: sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not {"policies", "checkpoints"} & set(p.relative_to(root).parts)
    )
    assert files(run) == files(done)
    assert not _no_temp_files(run)


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
    assert select_stages(start="rounds") == ["rounds", "export", "eval"]
    assert select_stages(only="export") == ["export"]
    with pytest.raises(UserError):
        select_stages(start="sft", only="sft")
    # --only sft on an empty run dir: a one-line error naming the missing input, exit 1.
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", tmp_path / "no-model")
    assert main(["run", str(recipe), "--only", "sft"]) == 1
    err = capfd.readouterr().err
    assert "templates" in err and "Traceback" not in err
    assert read_manifest(tmp_path / "run")["stages"]["sft"]["status"] == "failed"
