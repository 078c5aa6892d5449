"""Stage ``export``: the selected policy as stamped GGUFs, checked against the merged model.

1. The policy is the round ``rounds/rounds.json`` selected (or SFT's adapter when
   no round ran), checked against its recorded hash (:func:`medcritical.policy.selected_policy`).
2. :func:`medcritical.gguf.build.build_gguf` makes (or finds, when the rounds already
   built it) the merged weights, the 16-bit GGUF and the recipe's quants.
3. Each GGUF is copied into ``<run>/export/<name>-<type>.gguf`` with its
   provenance in the metadata (``general.*`` and ``medcritical.*``: recipe,
   base, data and template hashes, the selected round and its adapter chain,
   the system prompts it was trained with), so a lone file still says what it is.
4. The parity check (:mod:`export.parity`) on the first ``export.parity_questions``
   dev questions, generating as the recipe's evaluation does: the 16-bit file is
   gated, quants are reported; free-running answers of each quant are compared in
   the ``eval`` stage, which evaluates them on the dev split anyway.

One step (:mod:`medcritical.steps`) keyed by the build, the selected adapter,
the export and eval settings, the parity questions, the prompts, the grader and the
libraries that run the parity check. A run's policy is exported only when the stages
it comes from (teach, sft, rounds) are complete for the recipe given, so the recipe
stamped is the one the policy was trained with.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medcritical import __version__
from medcritical.artifacts import read_json, sha256_file, sha256_json
from medcritical.errors import UserError
from medcritical.layout import RunDir
from medcritical.prompts import SYSTEM
from medcritical.steps import Step

# Licences of bases the kit knows; any other base's licence is the user's to state (the card says so).
KNOWN_LICENSES = {"default": "apache-2.0"}


def provenance(recipe: Any, run_dir: RunDir, selected: dict[str, Any]) -> dict[str, str | int]:
    """The metadata stamped into every exported GGUF (strings and integers, as GGUF stores them)."""
    teach = Step("teach", run_dir.teach, {}).manifest() or {}
    sft = Step("sft", run_dir.sft, {}).manifest() or {}
    values: dict[str, str | int] = {
        "general.name": recipe.name,
        "general.description": (
            "MedCritical student (teacher templates + QLoRA SFT + self-correction DPO) for medical "
            "multiple-choice questions; not a medical device. See medcritical.* keys for provenance."
        ),
        "medcritical.version": __version__,
        # What the run is, not where it lives: the same recipe in another directory stamps the same bytes.
        "medcritical.recipe_sha256": sha256_json({k: v for k, v in recipe.dump().items() if k != "output_dir"}),
        "medcritical.base_model": recipe.model.name_or_path,
        "medcritical.data_sources": json.dumps([s.path for s in recipe.data.sources], ensure_ascii=False),
        "medcritical.teach": json.dumps(
            {"backend": recipe.teach.backend, "model": recipe.teach.model, "reasoning": recipe.teach.reasoning}
        ),
        "medcritical.questions_sha256": (teach.get("material") or {}).get("questions") or "",
        "medcritical.templates_sha256": (teach.get("outputs") or {}).get("templates.jsonl", {}).get("sha256") or "",
        "medcritical.sft_adapter_sha256": (sft.get("outputs") or {}).get("adapter", {}).get("sha256") or "",
        "medcritical.round": int(selected["round"]),  # -1: an adapter exported by hand, not a run's policy
        "medcritical.adapter_sha256": selected["hash"],
        "medcritical.adapter_chain": json.dumps(selected["chain"]),
        "medcritical.system_prompt.en": SYSTEM["en"],
        "medcritical.system_prompt.zh": SYSTEM["zh"],
    }
    if recipe.model.name_or_path in KNOWN_LICENSES:
        values["general.license"] = KNOWN_LICENSES[recipe.model.name_or_path]
    return values


def export_step(
    recipe: Any,
    run_dir: RunDir,
    selected: dict[str, Any],
    base: str,
    build_key: str,
    hashes: dict[str, str | None],
    free_run: bool,
) -> tuple[Step, dict[str, str | int], list[Any]]:
    """The export's step for the policy ``selected``, built (by the build step ``build_key``) into GGUFs
    with ``hashes``; also the metadata it stamps and the parity questions."""
    from medcritical.data import eval_records
    from medcritical.grading import GRADER_VERSION
    from medcritical.prompts import prompt_wording
    from medcritical.steps import library_versions

    records = eval_records(recipe)[: recipe.export.parity_questions]
    stamped = provenance(recipe, run_dir, selected) | {"medcritical.base_model": base}
    material = {
        "free_run": free_run,
        "build": build_key,
        "ggufs": hashes,
        "export": recipe.export.model_dump(),
        "name": recipe.name,
        "questions": [r.id for r in records],
        "max_new_tokens": recipe.eval.max_new_tokens,
        "language": recipe.language,
        "metadata": stamped,
        "prompts": prompt_wording(records, recipe.language),
        "grader": GRADER_VERSION,
        "libraries": library_versions("torch", "transformers", "llama_cpp_python"),  # the parity check's
    }
    return Step("export", run_dir.export, material, stale_root=run_dir.stale, label="export"), stamped, records


def _types(cfg: Any) -> list[str]:
    return list(dict.fromkeys([cfg.outtype, *cfg.quants]))


def check(recipe: Any, run_dir: RunDir, console: Console) -> None:
    """Refuse unless the export is complete for this recipe and the policy the rounds selected."""
    from medcritical.gguf.build import build_step, gguf_name
    from medcritical.policy import selected_policy

    cfg = recipe.export
    _, selected = selected_policy(run_dir)
    base = recipe.model.name_or_path
    build = build_step(base, selected["hash"], run_dir.policies, merge_into=cfg.merge_into, outtype=cfg.outtype)
    outputs = (build.manifest() or {}).get("outputs", {})
    hashes = {q: outputs.get(gguf_name(q), {}).get("sha256") for q in _types(cfg)}
    export_step(recipe, run_dir, selected, base, build.key, hashes, free_run=False)[0].require()


def run(
    recipe: Any,
    run_dir: RunDir,
    console: Console,
    *,
    explicit: tuple[str, Path | None] | None = None,
    free_run: bool = False,
    n_threads: int | None = None,
) -> dict[str, Any]:
    """Export the selected policy (see the module doc); returns the export's metrics.

    ``explicit``: (base, adapter or None) to export instead of the run's selected
    policy (``medcritical export --base ... --adapter ... --out DIR``: DIR is then
    a run directory of its own); ``free_run`` adds free-running answers to the
    parity report (the pipeline compares them in its eval stage instead).
    """
    from medcritical import rounds, sft, teach
    from medcritical.artifacts import sha256_tree
    from medcritical.gguf.build import build_gguf
    from medcritical.gguf.convert import stamp
    from medcritical.policy import selected_policy
    from medcritical.stages import require_upstream

    from .parity import run_parity

    cfg = recipe.export
    if explicit is None:
        # Stamp the recipe the policy was trained with: teach, sft and rounds must be complete for it.
        require_upstream(
            "export", {"teach": teach.check, "sft": sft.check, "rounds": rounds.check}, recipe, run_dir, console
        )
        base = recipe.model.name_or_path
        adapter, selected = selected_policy(run_dir)
    else:
        base, adapter = explicit
        h = sha256_tree(adapter) if adapter is not None else None
        selected = {"round": -1, "hash": h or "none", "chain": [{"adapter": str(adapter), "hash": h}]}
    types = _types(cfg)
    build = build_gguf(
        base, adapter, run_dir.policies, types, adapter_hash=selected["hash"] if adapter else None,
        merge_into=cfg.merge_into, outtype=cfg.outtype, keep_intermediate=True, console=console,
    )  # fmt: skip
    step, stamped, records = export_step(recipe, run_dir, selected, base, build.key, build.hashes, free_run)
    if step.begin(console) == "complete":
        console.print(f"[green]export: up to date[/] ({run_dir.export}, round {selected['round']})")
        return step.metrics()
    t0 = time.perf_counter()
    files = {}
    for q in types:
        dst = run_dir.export_gguf(recipe.name, q)
        with console.status(f"export: {dst.name} (metadata: round {selected['round']}, provenance)..."):
            stamp(build.files[q], dst, stamped | {"medcritical.quant": q})
        files[q] = dst
    with console.status(f"export: parity on {len(records)} dev questions x {len(files)} GGUFs..."):
        report = run_parity(  # writes its report before the gate raises: a failed export explains itself
            build.merged, files, records, run_dir.export, gated=cfg.outtype, threshold=cfg.f16_max_rel_error,
            language=recipe.language, max_new_tokens=recipe.eval.max_new_tokens, free_run=free_run, n_threads=n_threads,
            extra={"merge": {"rel_error": build.metrics.get("merge_rel_error"), "merge_into": cfg.merge_into},
                   "selected_round": selected["round"]},
        )  # fmt: skip
    ggufs = {
        q: {"file": p.name, "sha256": sha256_file(p), "size_bytes": p.stat().st_size}
        | {"source": str(build.files[q]), "source_sha256": build.hashes[q]}  # what was stamped: the eval reuses
        | _parity(report, q)  # an evaluation of those very bytes
        for q, p in files.items()
    }
    metrics = {
        "round": selected["round"],
        "adapter_sha256": selected["hash"],
        "ggufs": ggufs,
        "merge_rel_error": build.metrics.get("merge_rel_error"),
        "criterion": report.get("criterion"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    outputs = {p.name: {"size": ggufs[q]["size_bytes"], "sha256": ggufs[q]["sha256"]} for q, p in files.items()}
    for name in ("report.json", "report.md"):
        outputs[name] = {"size": (run_dir.export / name).stat().st_size, "sha256": sha256_file(run_dir.export / name)}
    step.done(metrics, outputs=outputs)
    _print_summary(report, console)
    return metrics


def _parity(report: dict[str, Any], q: str) -> dict[str, Any]:
    s = report["models"][q]
    keys = ("rel_error_max", "top1_agreement", "tf_answer_agreement", "tf_top1_agreement", "tokens_identical", "n",
            "answer_agreement", "answered_both")  # fmt: skip
    return {f"parity_{k}": s[k] for k in keys}


def _print_summary(report: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    t = Table(title=f"parity on {report['questions']} dev questions (gate passed)", title_justify="left")
    cols = ("GGUF", "MiB", "tokens same", "rel. logit error", "top-1", "TF answers", "TF top-1")
    for col in cols:
        t.add_column(col, justify="left" if col == "GGUF" else "right")
    for s in report["models"].values():
        rel = "-" if s["rel_error_max"] is None else f"{s['rel_error_max']:.2e}"
        tf_top1 = "-" if s["tf_top1_agreement"] is None else f"{s['tf_top1_agreement']:.1%}"
        t.add_row(
            s["file"], f"{s['size_bytes'] / 2**20:.1f}", f"{s['tokens_identical']}/{s['n']}", rel,
            pct(s["top1_agreement"]), pct(s["tf_answer_agreement"]), tf_top1,
        )  # fmt: skip
    console.print(t)
    c = report.get("criterion")
    if c:
        met = "[green]met[/]" if c["met"] else "[yellow]not met[/] (reported, not gated)"
        console.print(
            f"answer criterion: {c['model']} teacher-forced answer agreement {pct(c['value'])} >= {c['min']:.0%}: {met}"
        )


def exported(run_dir: RunDir) -> dict[str, Any]:
    """The complete export's metrics (raises UserError when there is none)."""
    m = Step("export", run_dir.export, {}).manifest() or {}
    if m.get("status") != "complete":
        raise UserError(f"{run_dir.export}: no complete export; run the export stage first")
    return m["metrics"] | {"report": read_json(run_dir.export / "report.json")}
