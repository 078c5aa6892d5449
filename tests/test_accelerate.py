"""Data-parallel training under ``accelerate launch``: 2 processes on CPU (gloo), as docs/multi-gpu.md runs them.

What "the same effective batch" means here, and why the adapters must then be equal
-----------------------------------------------------------------------------------
2 processes x ``per_device_train_batch_size=1`` x ``gradient_accumulation_steps=2`` and 1 process x 2 x 2 both
train 4 examples per optimizer step, so the two runs take the same steps under the same learning-rate schedule.
They compute the same gradients (to float rounding) because:

* Loss scale. SFT: transformers counts the completion tokens of a step over its accumulation steps and, with
  ``average_tokens_across_devices`` (on by default), over all processes, divides each micro-batch's summed token
  loss by that count and multiplies it by the number of processes to undo DDP's gradient mean. Either way the
  gradient is that of (all token losses of the step) / (all tokens of the step). DPO: each micro-batch's loss is
  the mean over its pairs, divided by the accumulation steps, then averaged by DDP: the mean over the step's 4
  pairs in both runs.
* Data order. SFT's seeded length-grouped sampler (``training.kit_trainer``) and accelerate's seedable random
  sampler (DPO) draw one index sequence, the same on every process (seed + epoch); accelerate hands its
  micro-batches to the processes in turn, so step k trains on items 4k..4k+3 of that sequence on one process or
  two, provided the length groups are cut for the global batch (this test found they were cut per process).
  Both data sets are a multiple of 4 long, so accelerate's ``even_batches`` repeats nothing to fill a step.
* Padding. Sequences are padded on the right only and attention is causal: padding changes no real token's
  logits, and other micro-batch shapes change only the order of float sums (``assert_same_adapter`` says how
  far that shows).
* Randomness. LoRA dropout is 0 (one process's masks could not match two processes' masks); LoRA weights start
  from the same seed on every process, and DDP broadcasts rank 0's at the start anyway.
* Precision. The base is loaded in full precision (``model.load_in_4bit=false``). 4-bit training under DDP on
  CPU runs (gloo handles the uint8 weights), but TRL casts QLoRA adapters to bfloat16, so their gradients are
  summed in bfloat16, in another order on two processes than on one; Adam's per-coordinate scaling turns those
  last-bit differences on near-zero gradients into whole ``lr``-sized steps (measured: 0.02 on weights of 0.14
  after 4 steps, with the same examples per step and losses equal to 3e-6). No float tolerance holds there.

What "only rank 0 writes" is checked with: a ``sitecustomize`` put on each launched process's path (test side
only) logs, per rank, every file the process opens for writing, renames or deletes through Python. Rank 1 must
touch nothing in the run directory. That it trained, in a world of 2: it printed its own summary line, and the
Trainer saved its RNG state (``rng_state_1.pth``, named by process index only when there are several) in every
checkpoint; that the two processes shared each step: its token count (gathered over the processes) equals the
one-process run's, where a process training alone on 1 x 2 examples a step would count about half.

``accelerate launch --cpu --num_processes 2`` starts ONE process: ``--cpu`` selects accelerate's simple
launcher, which ignores ``--num_processes`` unless it runs under MPI. These tests use ``--multi_gpu`` (the
torchrun launcher, the one a GPU machine uses), which picks gloo when there is no CUDA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import medcritical
from medcritical.artifacts import read_manifest, sha256_tree
from medcritical.cli import main
from medcritical.data import split_of
from medcritical.layout import RunDir
from tests.test_sft import write_templates

TIMEOUT = 600

# Logs, per rank, every file a launched process opens for writing, renames or deletes, through Python's audit
# events (writes made inside C++ or Rust, such as torch.save's and safetensors', are not seen). Inert without
# MC_AUDIT_DIR and RANK.
AUDIT = r"""
import os, sys

_dir, _rank = os.environ.get("MC_AUDIT_DIR"), os.environ.get("RANK")
if _dir and _rank is not None:
    _log = open(os.path.join(_dir, f"rank-{_rank}.log"), "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _path(p):
        return os.path.abspath(os.fsdecode(p)) if isinstance(p, (str, bytes, os.PathLike)) else None

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE):
                rec = ["write", _path(path)]
            else:
                return
        elif event == "os.rename":
            rec = ["rename", _path(args[0]), _path(args[1])]
        elif event in ("os.remove", "shutil.rmtree"):
            rec = ["delete", _path(args[0])]
        else:
            return
        if None not in rec:
            _log.write("\t".join(rec) + "\n")

    sys.addaudithook(_hook)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(*extra_path: Path) -> dict[str, str]:
    """The environment of every process: this checkout's medcritical, one thread each (2 processes, 2 cores),
    CPU only (on a GPU machine two processes would ask for GPUs 0 and 1)."""
    root = Path(medcritical.__file__).resolve().parent.parent
    path = os.pathsep.join(str(p) for p in (*extra_path, root))
    return os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def launch(tmp: Path, *args: str) -> tuple[str, dict[int, list[list[str]]]]:
    """``accelerate launch`` 2 processes of ``python -m medcritical ARGS``.

    Returns the launch's output (each line prefixed ``[default<rank>]:`` by ``--tee 3``) and, per rank, the
    audit's records (``[op, path, ...]``).
    """
    audit = tmp / "audit"
    shutil.rmtree(audit, ignore_errors=True)
    audit.mkdir(parents=True)
    (audit / "sitecustomize.py").write_text(AUDIT, encoding="utf-8")
    # fmt: off
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "--log_dir", str(tmp / "launch-logs"), "--tee", "3",
        "-m", "medcritical", *args,
    ]  # fmt: on
    env = _env(audit) | {"MC_AUDIT_DIR": str(audit)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    records = {
        int(p.stem.split("-")[1]): [line.split("\t") for line in p.read_text(encoding="utf-8").splitlines()]
        for p in audit.glob("rank-*.log")
    }
    assert sorted(records) == [0, 1], f"expected ranks 0 and 1, got {sorted(records)}"
    return out, records


def one_process(*args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "medcritical", *args], env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout + res.stderr


def under(records: list[list[str]], root: Path) -> list[list[str]]:
    """The records that touch a path under ``root``."""
    root_s = str(root.resolve()) + os.sep
    return [r for r in records if any(p.startswith(root_s) for p in r[1:])]


def renames_to(records: list[list[str]], path: Path) -> int:
    return sum(r[0] == "rename" and r[2] == str(path.resolve()) for r in records)


def assert_rank1_wrote_nothing(records: dict[int, list[list[str]]], run: Path, checkpoints: Path) -> None:
    """Rank 1 wrote nothing under the run directory, but ran the training loop: the Trainer saved its RNG
    state (``rng_state_1.pth``, written from C++, so not in the audit) in each checkpoint, beside rank 0's."""
    assert under(records[1], run) == []
    kept = list(checkpoints.glob("checkpoint-*"))
    assert kept and all((c / "rng_state_0.pth").is_file() and (c / "rng_state_1.pth").is_file() for c in kept)


def assert_no_leftovers(run: Path) -> None:
    left = [p for p in run.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    assert not left, left


def assert_same_adapter(a: Path, b: Path, lr: float, start: Path | None = None) -> None:
    """Equal to float tolerance: no weight off by a tenth of an Adam step, and at most 1 in 1,000 off by more
    than a thousandth of one; the updates (from ``start``, else from zero for lora_B) are far larger.

    Adam scales each weight's step by its gradient's running RMS, so where a gradient is near zero, the float
    noise of summing in another order shows in the update (measured on the SFT run: 4e-5 on 1 of 32,768 weights,
    under 3e-6 on the rest). A step on other examples moves nearly every weight by about ``lr`` (measured: 32,744
    of 32,768 weights off by more than 1e-5).
    """
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(x[k].dtype == y[k].dtype == torch.float32 for k in x)
    s = load_file(start / "adapter_model.safetensors") if start else {k: torch.zeros_like(v) for k, v in x.items()}
    diff = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
    assert diff.max() < lr / 10, f"a weight differs by {diff.max():.2e}"
    assert (diff > lr / 1000).float().mean() < 1e-3, f"{(diff > lr / 1000).sum()} of {diff.numel()} weights differ"
    moved = max((x[k] - s[k]).abs().max().item() for k in x if "lora_B" in k)
    assert moved > lr, f"the adapter barely moved ({moved:.2e})"


def losses(metrics: Path) -> list[tuple[int, float, float | None]]:
    """(step, loss, tokens seen so far) per logged step."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r["loss"], r.get("num_tokens")) for r in rows if "loss" in r]


def both_ranks_said(out: str, pattern: str) -> None:
    for rank in (0, 1):
        assert re.search(rf"^\[default{rank}\]:{pattern}", out, re.M), f"rank {rank} did not print {pattern!r}"


def test_sft_on_two_processes_equals_one_process(tiny_llama: Path, tmp_path: Path):
    """``accelerate launch`` of the sft stage: both ranks train (each reports the 8 steps and saves its RNG
    state in the checkpoints), only rank 0 writes the adapter, the logs and the manifest (twice: ``running`` at
    the start, ``complete`` at the end), and the adapter equals one trained on one process with the same
    effective batch (module doc). 24 templates: 6 steps an epoch, so step 7-8 are in the second epoch (the
    sampler's ``set_epoch`` reaches it under DDP too); 24 is also where the per-process length groups this test
    found (groups of 2 examples on each process against 4 on one) put other examples in a step."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n", encoding="utf-8")
    # fmt: off
    common = [
        f"model.name_or_path={tiny_llama}", "model.load_in_4bit=false", "sft.max_length=512",
        "sft.lora.lora_dropout=0.0", "sft.train.learning_rate=0.01", "sft.train.warmup_steps=0",
        "sft.train.max_steps=8", "sft.train.save_steps=4", "sft.train.logging_steps=1",
    ]  # fmt: on
    two, one = tmp_path / "two", tmp_path / "one"
    for run in (two, one):
        write_templates(run, 24)
    out, records = launch(
        tmp_path, "sft", str(recipe), f"output_dir={two}", *common,
        "sft.train.per_device_train_batch_size=1", "sft.train.gradient_accumulation_steps=2",
    )  # fmt: skip
    one_process(
        "sft", str(recipe), f"output_dir={one}", *common,
        "sft.train.per_device_train_batch_size=2", "sft.train.gradient_accumulation_steps=2",
    )  # fmt: skip

    both_ranks_said(out, r"sft: 8 steps")
    sft = RunDir(two).sft
    assert_rank1_wrote_nothing(records, two, sft / "checkpoints")
    mine = under(records[0], two)
    assert renames_to(mine, sft / "manifest.json") == 2 and renames_to(mine, sft / "metrics.jsonl") == 1
    assert renames_to(mine, sft / "adapter") == 1
    assert_no_leftovers(two)
    manifest = read_manifest(sft)
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 8
    assert manifest["outputs"]["adapter"]["sha256"] == sha256_tree(sft / "adapter")
    assert manifest["material"]["sft"]["train"]["per_device_train_batch_size"] == 1

    # The same examples in every step (token counts, gathered over both processes), the same losses and weights.
    a, b = losses(sft / "metrics.jsonl"), losses(RunDir(one).sft / "metrics.jsonl")
    assert [(s, n) for s, _, n in a] == [(s, n) for s, _, n in b] and len(a) == 8
    assert all(abs(x - y) < 1e-4 for (_, x, _), (_, y, _) in zip(a, b)), (a, b)
    assert_same_adapter(sft / "adapter", RunDir(one).sft / "adapter", lr=0.01)


# ---- DPO: one round's dpo part under the launcher, after its rollouts, corrections and pairs on one process ----

OPTIONS = {"A": "alpha", "B": "beta"}
QUESTIONS = [f"Question {n}: pick the right option." for n in range(8)]  # all keyed B


def _answer(letter: str) -> str:
    from medcritical.prompts import render_template

    return render_template("Recall the fact.", "Check each option.", [letter], "en")


@pytest.fixture(scope="module")
def self_correcting_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama that answers each question above wrongly ("Answer: A"), and asked to correct that answer,
    answers B (the key) in the template layout: with greedy rollouts and corrections, every question of the
    round gives exactly one verified pair, so round 1 has 8 pairs, each its own prompt. Taught on two of the
    questions (teaching takes about a minute); it answers the other six the same way."""
    from medcritical.prompts import correction_messages, question_messages
    from tests.tiny_models import build_tiny_llama, teach_tiny_model

    taught = QUESTIONS[:2]
    pairs = [(question_messages(q, OPTIONS, False, "en"), _answer("A")) for q in taught]
    pairs += [(correction_messages(q, OPTIONS, False, "en", _answer("A"), "wrong"), _answer("B")) for q in taught]
    return teach_tiny_model(build_tiny_llama(tmp_path_factory.mktemp("self-correcting")), pairs)


def write_round_recipe(tmp: Path, model: Path) -> Path:
    ids = [i for i in range(100) if split_of(f"q{i:03d}", 0, 0.2, 0.0) == "train"][: len(QUESTIONS)]
    data = tmp / "q.jsonl"
    rows = [
        {"id": f"q{i:03d}", "question": q, "options": OPTIONS, "answer": "B", "explanation": "Recall the fact."}
        for i, q in zip(ids, QUESTIONS)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    train = {"gradient_checkpointing": False, "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1}
    recipe = {
        "name": "ddp",
        "output_dir": str(tmp / "run"),
        "language": "en",
        "model": {"name_or_path": str(model), "load_in_4bit": False, "max_seq_length": 512},
        "data": {"sources": [{"path": str(data)}], "dev": 0.2, "test": 0.0},
        "teach": {"backend": "dataset"},
        "sft": {  # one step that changes nothing: the policy keeps its answers
            "max_length": 384,
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "train": train | {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-6},
        },
        "rounds": {
            "rollouts": {
                "k": 1,
                "max_new_tokens": 48,
                "questions": len(QUESTIONS),
                "temperature": 0.0,
                "engine": "transformers",
            },
            "correction": {"attempts": 1, "max_new_tokens": 48, "temperature": 0.0, "per_question": 1},
            "pairs": {"strategy": "correction", "max_length": 512, "max_per_question": 1},
            "dpo": {"beta": 0.1, "train": train | {"num_train_epochs": 2, "learning_rate": 1e-3, "save_steps": 2}},
        },
    }
    path = tmp / "round.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.mark.slow  # 1.5 min of a 30-minute CI budget; the SFT test above keeps accelerate in CI
def test_round_dpo_on_two_processes_equals_one_process(self_correcting_model: Path, tmp_path: Path):
    """Round 1's rollouts, corrections and pairs on one process (as docs/multi-gpu.md says), then ``rounds
    --round 1 --only dpo`` under ``accelerate launch``: both ranks run DPO's 4 steps (8 pairs, 2 epochs of 2
    steps), only rank 0 writes the round's adapter, its logs and its manifest, and the adapter equals the one
    ``--only dpo`` trains on one process, with the same effective batch, from a copy of the same round."""
    recipe = write_round_recipe(tmp_path, self_correcting_model)
    two, one = tmp_path / "run", tmp_path / "one"
    assert main(["teach", str(recipe)]) == 0 and main(["sft", str(recipe)]) == 0
    for part in ("rollouts", "corrections", "pairs"):
        assert main(["rounds", str(recipe), "--round", "1", "--only", part]) == 0
    rd = RunDir(two).round(1)
    assert read_manifest(rd.pairs)["metrics"]["pairs"] == 8, read_manifest(rd.pairs)["metrics"]
    shutil.copytree(two, one)

    dpo = ["rounds", str(recipe), "--round", "1", "--only", "dpo"]
    batch = "rounds.dpo.train.per_device_train_batch_size={} rounds.dpo.train.gradient_accumulation_steps=2"
    out, records = launch(tmp_path, *dpo, *batch.format(1).split())
    one_process(*dpo, f"output_dir={one}", *batch.format(2).split())

    both_ranks_said(out, r"dpo round 1 .*4/4")
    assert_rank1_wrote_nothing(records, two, rd.checkpoints)
    mine = under(records[0], two)
    assert renames_to(mine, rd.dpo / "manifest.json") == 2 and renames_to(mine, rd.dpo / "metrics.jsonl") == 1
    assert renames_to(mine, rd.adapter) == 1
    lock = str((two / ".lock").resolve())
    outside = [r for r in mine if not r[-1].startswith(str(rd.dpo.resolve()) + os.sep) and r[-1] != lock]
    assert not outside, f"rank 0 wrote outside the round's dpo step: {outside}"
    assert_no_leftovers(two)
    manifest = read_manifest(rd.dpo)
    assert manifest["status"] == "complete" and manifest["metrics"]["steps"] == 4
    assert manifest["outputs"]["adapter"]["sha256"] == sha256_tree(rd.adapter)
    assert manifest["material"]["dpo"]["train"]["per_device_train_batch_size"] == 1
    assert not (rd.root / "round.json").exists() and not rd.eval.exists()  # --only dpo stops there

    a, b = losses(rd.dpo / "metrics.jsonl"), losses(RunDir(one).round(1).dpo / "metrics.jsonl")
    assert len(a) == len(b) == 4 and all(abs(x - y) < 1e-5 for (_, x, _), (_, y, _) in zip(a, b)), (a, b)
    assert_same_adapter(rd.adapter, RunDir(one).round(1).adapter, lr=1e-3, start=RunDir(two).sft_adapter)
