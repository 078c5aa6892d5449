"""``medcritical run RECIPE``: every stage in order, then a run report.

    teach -> sft -> rounds -> export -> eval -> bundle

Each stage is a function ``run(recipe, run_dir, console) -> metrics`` (:func:`stage_table`;
the names and their order are :data:`medcritical.stages.STAGES`) and runs in its own child process (``python -m medcritical.pipeline STAGE RECIPE``),
for three reasons: its peak memory is its own (measured with ``wait4``), the
memory of one stage is returned to the system before the next starts, and a
crash in one stage cannot leave another's state half-built in the same
interpreter. The child dies with the parent (``PR_SET_PDEATHSIG``), and the
parent holds the run directory's lock (:func:`medcritical.steps.run_lock`), so a
second ``run`` on the same directory fails at once instead of writing the same files.

The recipe is read once: the parent resolves the file and its overrides and writes the result to
``<run>/.pipeline/recipe.yaml``, which every child reads, so editing the file mid-run changes nothing
until the next run. With ``--from`` or ``--only`` the earlier stages are not run; a child first checks
that what they left is complete for this recipe (each stage's ``check``), or the run is refused in one line
naming the stage and what changed, before anything starts.

Stages skip or resume their own steps (:mod:`medcritical.steps`); each child
writes what its steps did to ``<run>/.pipeline/<stage>.json``, and the pipeline
says per stage whether it was up to date or what it redid and why. It writes
``<run>/manifest.json`` (recipe, data hashes, versions, each stage's status, time
and peak memory) and the report (``report.md``, ``report.png``, ``report.json``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from .artifacts import atomic_write_json, read_json, read_manifest, write_manifest
from .errors import UserError
from .layout import RunDir
from .recipe import Recipe, load_recipe
from .stages import STAGES, Check, require_upstream, select_stages

Run = Callable[[Recipe, RunDir, Console], dict[str, Any]]


def stage_table() -> dict[str, tuple[Run, Check | None]]:
    """stage -> (its run, its check: None for the last stage, which nothing reads).

    Imported when asked, not with this module: ``medcritical --help`` stays quick, and a stage's child
    process imports unsloth before transformers (``rounds``, ``sft``) before anything else loads them.
    """
    from export import bundle
    from export import stage as export_stage

    from . import evaluate, rounds, sft, teach

    return {
        "teach": (teach.run, teach.check),
        "sft": (sft.run, sft.check),
        "rounds": (rounds.run, rounds.check),
        "export": (export_stage.run, export_stage.check),
        "eval": (evaluate.run, evaluate.check),
        "bundle": (bundle.run, None),
    }


def stage_function(stage: str) -> Run:
    return stage_table()[stage][0]


def check_upstream(stage: str, recipe: Recipe, run_dir: RunDir, console: Console) -> None:
    """Refuse (UserError, one line) unless every stage before ``stage`` is complete for ``recipe``."""
    checks = {name: check for name, (_, check) in stage_table().items() if check is not None}
    require_upstream(stage, checks, recipe, run_dir, console)


def _run_child(argv: list[str]) -> tuple[int, float]:
    """Run a stage's child process; returns (exit code, peak RSS in MB)."""
    from .runtime import child_popen

    proc = child_popen(argv)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        # Ctrl-C reached the child too (same process group); let it finish its cleanup.
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_kb = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
    return proc.returncode, round(rss_kb / 1024, 1)


def describe(events: list[dict[str, Any]]) -> tuple[bool, str]:
    """(skipped, one line) from a stage's step events."""
    if not events:
        return False, "ran"
    done = [e for e in events if e["outcome"] != "skipped"]
    if not done:
        return True, "up to date (skipped)"
    parts = []
    for e in done:
        why = {"new": "new", "resumed": "resumed", "replaced": "inputs changed: " + ", ".join(e.get("changed", [])[:3])}
        parts.append(f"{e['step']} ({why[e['outcome']]})")
    return False, "redone: " + "; ".join(parts)


def run_pipeline(
    recipe_path: str,
    overrides: Sequence[str] = (),
    *,
    start: str | None = None,
    only: str | None = None,
    console: Console | None = None,
    allow_cpu: bool = False,
) -> int:
    """Run the selected stages; write the run manifest and report. Returns an exit code.

    ``allow_cpu``: go on when nvidia-smi sees a GPU that the installed torch, llama.cpp or vLLM cannot use
    (else refused in one line, :func:`medcritical.gpu_check.preflight`)."""
    import yaml

    from .artifacts import atomic_write_text
    from .data import load_recipe_data, records_hash
    from .gpu_check import preflight
    from .plan import refuse_if_too_big
    from .report import print_final, write_run_report
    from .steps import run_lock

    console = console or Console(stderr=True)
    stages = select_stages(start, only)
    recipe = load_recipe(recipe_path, list(overrides))
    preflight(recipe, recipe_path, stages, allow_cpu=allow_cpu)  # a GPU here that the stack cannot use: refused
    if not allow_cpu:
        refuse_if_too_big(recipe, recipe_path, stages)  # on a CUDA GPU: a stage that would not fit fails now
    run_dir = RunDir.of(recipe)
    train = load_recipe_data(recipe.data, split="train", console=console)
    dev = load_recipe_data(recipe.data, split=recipe.eval.split)
    if not train:
        raise UserError(f"{recipe_path}: the data has no training questions")
    with run_lock(run_dir.root, f"medcritical run {recipe_path}"):
        inputs = {"train": records_hash(train), "dev": records_hash(dev)}
        prev = read_manifest(run_dir.root) or {}
        record: dict[str, Any] = dict(prev.get("stages", {})) if prev.get("inputs") == inputs else {}

        def save(status: str) -> None:
            write_manifest(
                run_dir.root, "run", recipe.dump(), inputs, {s: r.get("metrics", {}) for s, r in record.items()},
                status=status, stages=record, recipe_file=str(recipe_path), overrides=list(overrides),
            )  # fmt: skip

        resolved = run_dir.pipeline_recipe
        atomic_write_text(resolved, yaml.safe_dump(recipe.dump(), sort_keys=False, allow_unicode=True))
        child = [sys.executable, "-m", "medcritical.pipeline"]
        if stages[0] != STAGES[0] and _run_child([*child, "--check-upstream", stages[0], str(resolved)])[0]:
            return 1  # the check said why, in one line
        console.rule(f"[bold]medcritical run {recipe.name}[/]: {' -> '.join(stages)}  ({run_dir.root})")
        for i, stage in enumerate(stages, 1):
            console.rule(f"[bold]stage {i}/{len(stages)}: {stage}", align="left")
            log = run_dir.stage_log(stage)
            log.unlink(missing_ok=True)
            t0 = time.perf_counter()
            record[stage] = {"status": "running"}
            save("running")
            argv = [*child, stage, str(resolved)]
            try:
                rc, rss = _run_child(argv)
            except KeyboardInterrupt:
                record[stage] = {"status": "interrupted", "seconds": round(time.perf_counter() - t0, 1)}
                save("interrupted")
                raise
            done = read_json(log) if log.is_file() else {}
            skipped, what = describe(done.get("steps", []))
            record[stage] = {
                "status": "complete" if rc == 0 else "failed",
                "exit_code": rc,
                "seconds": round(time.perf_counter() - t0, 1),
                "peak_rss_mb": rss,
                "skipped": rc == 0 and skipped,
                "did": what,
                "steps": done.get("steps", []),
                "metrics": done.get("metrics", {}),
            }
            if rc != 0:
                save("failed")
                if rc == 130 or rc == -signal.SIGINT:
                    raise KeyboardInterrupt
                raise UserError(
                    f"run: stage {stage} failed (exit {rc}); fix the cause and run the same command to resume"
                )
            console.print(f"[bold]{stage}[/]: {what}", soft_wrap=True)
            save("running")
        report = write_run_report(run_dir, recipe, record)
        save("complete")
    print_final(run_dir, recipe, report)
    return 0


# ---- the child: one stage --------------------------------------------------------


def stage_main(argv: Sequence[str]) -> int:
    """Entry point of a stage's child process: ``STAGE RECIPE``, or ``--check-upstream STAGE RECIPE``
    (refuse unless the stages before STAGE are complete for the recipe)."""
    from .runtime import err_console, offline_quiet, print_error
    from .steps import EVENTS, run_lock

    offline_quiet()
    check = argv[0] == "--check-upstream"
    stage, recipe_path = argv[1:] if check else argv
    try:
        recipe = load_recipe(recipe_path)
        run_dir = RunDir.of(recipe)
        with run_lock(run_dir.root, f"medcritical {stage} {recipe_path}"):
            if check:
                check_upstream(stage, recipe, run_dir, err_console)
                return 0
            metrics = stage_function(stage)(recipe, run_dir, err_console)
            atomic_write_json(run_dir.stage_log(stage), {"metrics": metrics, "steps": EVENTS})
        return 0
    except UserError as e:
        print_error(e)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(stage_main(sys.argv[1:]))
