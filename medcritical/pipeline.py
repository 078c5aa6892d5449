"""``medcritical run RECIPE``: every stage in order, then a run report.

    teach -> sft -> rounds -> export -> eval

Each stage runs in its own child process (``python -m medcritical.pipeline
STAGE RECIPE [key=value ...]``), for three reasons: its peak memory is its own
(measured with ``wait4``), the memory of one stage is returned to the system
before the next starts, and a crash in one stage cannot leave another's state
half-built in the same interpreter. The child dies with the parent
(``PR_SET_PDEATHSIG``), so killing ``medcritical run`` never leaves an orphan
writing into the run directory while a new run starts.

Every stage already skips itself when its manifest is complete for the same
config and input hashes, and resumes from its own partial artifacts
otherwise; the pipeline adds ordering, ``--from``/``--only``, per-stage wall
time and peak memory, and ``<run>/manifest.json`` plus ``report.md``/``report.png``.
A stage counts as skipped when its manifests are unchanged by the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from .artifacts import read_json, read_manifest, sha256_json, write_manifest
from .errors import UserError
from .recipe import Recipe, load_recipe

STAGES = ("teach", "sft", "rounds", "export", "eval")


def select_stages(start: str | None = None, only: str | None = None) -> list[str]:
    if start and only:
        raise UserError("run: --from and --only exclude each other")
    for name in (start, only):
        if name is not None and name not in STAGES:
            raise UserError(f"run: unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if only:
        return [only]
    return list(STAGES[STAGES.index(start) :] if start else STAGES)


def fingerprint(stage_dir: Path) -> str | None:
    """Hash of every manifest under ``stage_dir`` (without write times)."""
    files = sorted(stage_dir.rglob("manifest.json")) if stage_dir.is_dir() else []
    if not files:
        return None
    parts = []
    for f in files:
        try:
            m = read_json(f)
        except (OSError, ValueError):
            m = None
        if isinstance(m, dict):
            m.pop("written_at", None)
        parts.append((str(f.relative_to(stage_dir)), m))
    return sha256_json(parts)


def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the parent dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_child(argv: list[str]) -> tuple[int, float]:
    """Run a stage's child process; returns (exit code, peak RSS in MB)."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(argv, preexec_fn=preexec)  # noqa: PLW1509 (only sets a death signal)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        # Ctrl-C reached the child too (same process group); let it finish its cleanup.
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_kb = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
    return proc.returncode, round(rss_kb / 1024, 1)


def _stage_metrics(run: Path, stage: str) -> dict[str, Any]:
    """The few numbers of a stage worth keeping in the run manifest."""
    if stage == "rounds":
        table = run / "rounds" / "rounds.json"
        return {"rounds": read_json(table)} if table.exists() else {}
    m = read_manifest(run / stage) or {}
    return m.get("metrics", {})


def run_pipeline(
    recipe_path: str,
    overrides: Sequence[str] = (),
    *,
    start: str | None = None,
    only: str | None = None,
    console: Console | None = None,
) -> int:
    """Run the selected stages; write the run manifest and report. Returns an exit code."""
    from .data import load_recipe_data, records_hash
    from .report import print_final, write_run_report

    console = console or Console(stderr=True)
    stages = select_stages(start, only)
    recipe = load_recipe(recipe_path, list(overrides))
    run = Path(recipe.output_dir)
    train = load_recipe_data(recipe.data, split="train", console=console)
    dev = load_recipe_data(recipe.data, split=recipe.eval.split)
    if not train:
        raise UserError(f"{recipe_path}: the data has no training questions")
    run.mkdir(parents=True, exist_ok=True)
    inputs = {"train": records_hash(train), "dev": records_hash(dev)}
    prev = read_manifest(run) or {}
    record: dict[str, Any] = dict(prev.get("stages", {})) if prev.get("inputs") == inputs else {}

    def save(status: str) -> None:
        write_manifest(
            run, "run", recipe.dump(), inputs, {s: r.get("metrics", {}) for s, r in record.items()},
            status=status, stages=record, recipe_file=str(recipe_path), overrides=list(overrides),
        )  # fmt: skip

    console.rule(f"[bold]medcritical run {recipe.name}[/]: {' -> '.join(stages)}  ({run})")
    for i, stage in enumerate(stages, 1):
        console.rule(f"[bold]stage {i}/{len(stages)}: {stage}", align="left")
        before = fingerprint(run / stage)
        t0 = time.perf_counter()
        record[stage] = {"status": "running"}
        save("running")
        argv = [sys.executable, "-m", "medcritical.pipeline", stage, str(recipe_path), *overrides]
        try:
            rc, rss = _run_child(argv)
        except KeyboardInterrupt:
            record[stage] = {"status": "interrupted", "seconds": round(time.perf_counter() - t0, 1)}
            save("interrupted")
            raise
        seconds = round(time.perf_counter() - t0, 1)
        after = fingerprint(run / stage)
        record[stage] = {
            "status": "complete" if rc == 0 else "failed",
            "exit_code": rc,
            "seconds": seconds,
            "peak_rss_mb": rss,
            "skipped": rc == 0 and before is not None and before == after,
            "metrics": _stage_metrics(run, stage) if rc == 0 else {},
        }
        if rc != 0:
            save("failed")
            if rc == 130 or rc == -signal.SIGINT:
                raise KeyboardInterrupt
            raise UserError(f"run: stage {stage} failed (exit {rc}); fix the cause and run the same command to resume")
        save("running")
    report = write_run_report(run, recipe, record)
    save("complete")
    print_final(run, recipe, report)
    return 0


# ---- the child: one stage --------------------------------------------------------


def _teach(recipe: Recipe, console: Console) -> None:
    from .teach import run_teach

    metrics = run_teach(recipe, console)
    status = (read_manifest(Path(recipe.output_dir) / "teach") or {}).get("status")
    if status != "complete":
        raise UserError(f"teach: {metrics.get('errors', '?')} teacher calls failed; run again to retry them")


def _sft(recipe: Recipe, console: Console) -> None:
    from .sft import run_sft

    run_sft(recipe, console)


def _rounds(recipe: Recipe, console: Console) -> None:
    from .rounds import run_rounds

    run_rounds(recipe, console)


def final_eval(recipe: Recipe, console: Console) -> dict[str, Any]:
    """Dev accuracy of the untrained base and of each exported quantized GGUF (same settings as the rounds').

    ``metrics["ggufs"]`` holds every quant type's result (the f16 file only
    when no quant was made); ``metrics["gguf"]`` is the one to ship and chat with.
    """
    from export.cli import preferred_gguf

    from .rounds import eval_policy

    run = Path(recipe.output_dir)
    out = run / "eval"
    base = eval_policy(recipe, None, out / "base", console)
    names = list(recipe.export.quants) or [recipe.export.outtype]
    ggufs = {q: run / "export" / f"{recipe.name}-{q}.gguf" for q in names}
    ggufs = {q: p for q, p in ggufs.items() if p.is_file()}
    if not ggufs:
        raise UserError(f"{run / 'export'}: no GGUF; run the export stage first")
    results = {
        q: eval_policy(recipe, None, out / f"gguf-{q}", console, gguf=p) | {"file": p.name, "quant": q}
        for q, p in ggufs.items()
    }
    ship = next(q for q, p in ggufs.items() if p == preferred_gguf(ggufs))
    metrics = {"base": base, "ggufs": results, "gguf": results[ship]}
    # Each GGUF's hash as its evaluation recorded it (hashing 100s of MB again would only repeat that).
    inputs = {q: read_manifest(out / f"gguf-{q}")["inputs"]["gguf"] for q in ggufs}
    write_manifest(out, "eval", {"eval": recipe.eval.model_dump()}, inputs, metrics=metrics)
    return metrics


def _export(recipe_path: str, overrides: list[str]) -> int:
    from .cli import main

    return main(["export", recipe_path, *overrides])


def stage_main(argv: Sequence[str]) -> int:
    """Entry point of a stage's child process."""
    from .cli import err_console, offline_quiet

    offline_quiet()
    stage, recipe_path, *overrides = argv
    try:
        if stage == "export":
            return _export(recipe_path, overrides)
        recipe = load_recipe(recipe_path, overrides)
        {"teach": _teach, "sft": _sft, "rounds": _rounds, "eval": final_eval}[stage](recipe, err_console)
        return 0
    except UserError as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(stage_main(sys.argv[1:]))
