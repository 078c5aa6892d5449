"""The ``medcritical`` command: one subcommand per stage, and every handler in this file.

``main(argv) -> int`` is what the console script and ``python -m medcritical``
call, and what tests call in-process. A :class:`UserError` prints one line and
exits 1; anything else is a bug and keeps its traceback.

Stage commands (``teach``, ``sft``, ``rounds``, ``export``, ``eval``/``bundle``
through ``run``) call the stage's ``run(recipe, run_dir, console)`` under the run
directory's lock; ``chat``, ``serve`` and ``verify`` import llama-cpp-python only,
so they work on an inference-only install (no torch).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .runtime import err_console, offline_quiet, out_console, print_error

Handler = Callable[[argparse.Namespace], int]


def _recipe(args: argparse.Namespace):
    from .recipe import load_recipe

    return load_recipe(getattr(args, "recipe", None), list(getattr(args, "overrides", []) or []))


def _add_recipe(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("recipe", nargs=None if required else "?", help="recipe YAML file (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, e.g. sft.lora.r=8")


# ---- config ---------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    out_console.print(
        yaml.safe_dump(_recipe(args).dump(), sort_keys=False, allow_unicode=True), end="", markup=False, highlight=False
    )
    return 0


def cmd_config_list(args: argparse.Namespace) -> int:
    from .recipe import recipes_dir

    for p in sorted(recipes_dir().glob("*.yaml")):
        first = p.read_text(encoding="utf-8").splitlines()[:2]
        out_console.print(f"[bold]{p.stem}[/]  {' '.join(s.lstrip('# ') for s in first)}", highlight=False)
    return 0


def cmd_config_cp(args: argparse.Namespace) -> int:
    from .recipe import recipes_dir

    src = recipes_dir() / f"{args.name.removesuffix('.yaml')}.yaml"
    if not src.exists():
        raise UserError(f"config cp: no recipe named {args.name} (see: medcritical config list)")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise UserError(f"config cp: {dest} exists")
    shutil.copyfile(src, dest)
    out_console.print(f"copied {src.name} -> {dest}")
    return 0


# ---- default model, data ----------------------------------------------------


def cmd_default_model(args: argparse.Namespace) -> int:
    from .default_model import default_gguf, materialize

    with err_console.status("materializing SmolLM2-135M-Instruct (dequantizing the GGUF)..."):
        path = materialize(force=args.force)
    out_console.print(f"transformers: {path}\ngguf:         {default_gguf()}", highlight=False)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from collections import Counter

    from .data import describe_skips, load_questions, split_of

    res = load_questions(args.file, fmt=args.format, strict=args.strict)
    note = describe_skips(res, args.file)
    if note:
        err_console.print(f"[yellow]{note}", highlight=False)
    splits = Counter(split_of(r.id, args.seed) for r in res.records)
    multi = sum(r.multi for r in res.records)
    out_console.print(
        f"{args.file}: {len(res.records)} questions ({multi} multi-answer), skipped {len(res.skipped)}; "
        f"split train/dev/test = {splits['train']}/{splits['dev']}/{splits['test']}",
        highlight=False,
    )
    return 0


# ---- eval -------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_recipe_data
    from .engines import is_gguf, open_engine
    from .evaluate import eval_step, evaluate, print_summary

    recipe = _recipe(args)
    ev = recipe.eval
    if args.bench or args.benches:
        return _eval_benchmarks(args, recipe)
    if args.data:
        recipe.data.sources = [{"path": d, "format": args.format} for d in args.data]
    if args.strict:
        recipe.data.strict = True
    split = args.split or (ev.split if args.recipe else "all")
    limit = args.limit or ev.limit
    records = load_recipe_data(recipe.data, split=split, console=err_console)[:limit]
    if not records:
        raise UserError(f"eval: no questions in split {split!r}")
    model = args.model or recipe.model.name_or_path
    if not (args.model or args.recipe or args.adapter) and model == "default":
        # The embedded default on llama.cpp (its own GGUF, batched): the fastest engine here, not transformers.
        from .default_model import default_gguf

        model = str(default_gguf())
    mode = args.mode or ev.mode
    settings = _eval_settings(args, recipe, model, records, mode)
    out = Path(args.output) if args.output else Path(recipe.output_dir) / "eval" / f"{Path(model).stem}-{split}-{mode}"
    step = eval_step(out, settings, label=f"eval {out}")
    if step.begin(err_console) == "complete":
        from .artifacts import read_json

        summary = read_json(out / "summary.json")
    else:
        with err_console.status(f"loading {model}..."):
            engine = open_engine(
                model, adapter=args.adapter, model_cfg=recipe.model, load_in_4bit=args.load_in_4bit, n_ctx=ev.n_ctx,
                seed=recipe.seed,
            )  # fmt: skip
        try:
            summary = evaluate(
                records, engine, out, mode=mode, max_new_tokens=settings["max_new_tokens"],
                temperature=settings["temperature"], top_p=settings["top_p"], batch_size=settings["batch_size"],
                language=recipe.language, seed=recipe.seed, console=err_console,
            )  # fmt: skip
        finally:
            engine.close()
        step.done(summary, outputs=["predictions.jsonl"], model=str(model), adapter=args.adapter)
    print_summary(summary, title=f"{model} ({summary['engine']}, {mode}) on {split}", console=out_console)
    out_console.print(f"per-question results: {out / 'predictions.jsonl'}", highlight=False)
    out_console.print(
        f"setting: {len(records)} questions, {mode}, {Path(model).name} on "
        f"{'llama.cpp (batched)' if is_gguf(model) else 'transformers'}, at most {settings['max_new_tokens']} new tokens",
        highlight=False,
    )
    return 0


def _eval_benchmarks(args: argparse.Namespace, recipe: Any) -> int:
    """``eval --bench NAME=PATH ...``: each benchmark an evaluation step of its own under one folder
    (resumed or skipped like any other), the model loaded once, then one table of them all."""
    from .artifacts import atomic_write_json, read_json
    from .benchmarks import bench_row, benchmark_records, count_cut, parse_benches, print_table, write_table
    from .data import records_hash
    from .engines import open_engine
    from .evaluate import eval_step, evaluate
    from .prompts import prompt_wording

    if args.data:
        raise UserError("eval: --data and --bench/--benches exclude each other")
    benches = parse_benches(args.bench or [], args.benches)
    ev = recipe.eval
    model = args.model or recipe.model.name_or_path
    mode = args.mode or ev.mode
    root = Path(args.output) if args.output else Path(recipe.output_dir) / "eval" / f"{Path(model).stem}-benchmarks"
    loaded = [
        (name, path, benchmark_records(name, path, args.strict, err_console)[: args.limit]) for name, path in benches
    ]
    engine, base, rows = None, None, []
    try:
        for name, path, records in loaded:
            if base is None:
                settings = base = _eval_settings(args, recipe, model, records, mode)
            else:  # the model's fingerprint is the same for every benchmark: hashed once
                settings = base | {
                    "prompts": prompt_wording(records, recipe.language),
                    "questions": records_hash(records),
                }
            out = root / name.lower()
            step = eval_step(out, settings, label=f"eval {name}")
            if step.begin(err_console) == "complete":
                summary = read_json(out / "summary.json")
            else:
                if engine is None:
                    with err_console.status(f"loading {model}..."):
                        engine = open_engine(
                            model, adapter=args.adapter, model_cfg=recipe.model, load_in_4bit=args.load_in_4bit,
                            n_ctx=ev.n_ctx, seed=recipe.seed,
                        )  # fmt: skip
                summary = evaluate(
                    records, engine, out, mode=mode, max_new_tokens=settings["max_new_tokens"],
                    temperature=settings["temperature"], top_p=settings["top_p"], batch_size=settings["batch_size"],
                    language=recipe.language, seed=recipe.seed, console=err_console, label=f"eval {name}",
                )  # fmt: skip
                summary["cut_at_cap"] = (
                    count_cut(engine, out / "predictions.jsonl", settings["max_new_tokens"])
                    if mode == "generate"
                    else 0
                )
                atomic_write_json(out / "summary.json", summary)
                step.done(summary, outputs=["predictions.jsonl"], model=str(model), benchmark=name, path=str(path))
            rows.append(bench_row(name, path, out, summary, settings))
    finally:
        if engine is not None:
            engine.close()
    json_path, md_path = write_table(rows, str(model), root)
    print_table(rows, str(model), out_console)
    out_console.print(f"table: {md_path} and {json_path}; per-question results: {root}/<benchmark>/predictions.jsonl",
                      highlight=False, soft_wrap=True)  # fmt: skip
    return 0


def _eval_settings(args: argparse.Namespace, recipe: Any, model: str, records: list, mode: str) -> dict[str, Any]:
    """The key of one evaluation: model, engine and its libraries, prompts, grader, questions, generation."""
    from .artifacts import model_fingerprint, sha256_file
    from .data import records_hash
    from .engines import is_gguf
    from .grading import GRADER_VERSION
    from .prompts import prompt_wording
    from .steps import library_versions

    ev = recipe.eval
    if is_gguf(model) or Path(model).is_file():
        from .gguf.file import check_gguf

        check_gguf(model)  # a missing, truncated or foreign file: one line, before anything is written
    if is_gguf(model):
        engine = {"libraries": library_versions("llama_cpp_python")}
    else:  # as open_engine loads it; its resolved backend, dtype and libraries
        from .training import stack

        engine = stack(recipe.model.model_copy(update={"load_in_4bit": args.load_in_4bit}))
    return {
        "model": sha256_file(model) if is_gguf(model) else model_fingerprint(_resolved(model)),
        "adapter": _adapter_hash(args.adapter),
        "load_in_4bit": args.load_in_4bit,
        "engine": engine,
        "prompts": prompt_wording(records, recipe.language),
        "grader": GRADER_VERSION,
        "questions": records_hash(records),
        "mode": mode,
        "max_new_tokens": args.max_new_tokens or ev.max_new_tokens,
        "temperature": ev.temperature if args.temperature is None else args.temperature,
        "top_p": ev.top_p if args.top_p is None else args.top_p,
        "batch_size": args.batch_size or ev.batch_size,
        "n_ctx": ev.n_ctx,
        "language": recipe.language,
        "seed": recipe.seed,
    }


def _resolved(model: str) -> str:
    from .default_model import resolve_model

    return resolve_model(model)


def _adapter_hash(adapter: str | None) -> str | None:
    from .artifacts import sha256_tree

    if adapter is None:
        return None
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    return sha256_tree(adapter)


# ---- stages -------------------------------------------------------------------------


def _stage(name: str, args: argparse.Namespace, **kwargs: Any) -> dict[str, Any]:
    """Run one stage on the recipe's run directory, holding its lock."""
    from .layout import RunDir
    from .pipeline import stage_function
    from .steps import run_lock

    recipe = _recipe(args)
    run_dir = RunDir.of(recipe)
    with run_lock(run_dir.root, f"medcritical {name} {args.recipe}"):
        return stage_function(name)(recipe, run_dir, err_console, **kwargs)


def cmd_teach(args: argparse.Namespace) -> int:
    _stage("teach", args)
    out_console.print(f"templates: {Path(_recipe(args).output_dir) / 'teach' / 'templates.jsonl'}", highlight=False)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    _stage("sft", args)
    return 0


def cmd_rounds(args: argparse.Namespace) -> int:
    from .layout import RunDir
    from .rounds import round_start, run_round
    from .steps import run_lock

    if args.round is None:
        if args.only:
            raise UserError("rounds: --only needs --round N")
        _stage("rounds", args)
        return 0
    recipe = _recipe(args)
    run_dir = RunDir.of(recipe)
    with run_lock(run_dir.root, f"medcritical rounds --round {args.round} {args.recipe}"):
        start, start_hash = round_start(recipe, run_dir, args.round, err_console)
        row = run_round(recipe, run_dir, args.round, start, start_hash, err_console, only=args.only)
    out_console.print(row)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The run's selected policy (recipe mode), or ``--base/--adapter/--out`` by hand."""
    from transformers.utils import logging as hf_logging

    from export.stage import run as export_run

    from .layout import RunDir
    from .recipe import load_recipe
    from .steps import run_lock

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    recipe_path, overrides = args.recipe, list(args.overrides or [])
    if recipe_path and "=" in recipe_path and not Path(recipe_path).is_file():
        recipe_path, overrides = None, [recipe_path, *overrides]  # no recipe file: the first override took its slot
    recipe = load_recipe(recipe_path, overrides)
    if args.max_new_tokens:
        recipe.eval.max_new_tokens = args.max_new_tokens
    if args.name:
        recipe.name = args.name
    by_hand = args.base or args.adapter or args.no_adapter or args.out
    if args.adapter and args.no_adapter:
        raise UserError("export: --adapter and --no-adapter exclude each other")
    if by_hand and not args.out:
        raise UserError("export: --base/--adapter/--no-adapter need --out DIR (a run directory of their own)")
    run_dir = RunDir(Path(args.out)) if args.out else RunDir.of(recipe)
    explicit = None
    if by_hand:
        if not (args.adapter or args.no_adapter):
            raise UserError("export: with --out, name the adapter (--adapter DIR) or say --no-adapter")
        explicit = (args.base or recipe.model.name_or_path, Path(args.adapter) if args.adapter else None)
    with run_lock(run_dir.root, "medcritical export"):
        metrics = export_run(recipe, run_dir, err_console, explicit=explicit, free_run=bool(by_hand),
                             n_threads=args.threads)  # fmt: skip
    for q, g in metrics["ggufs"].items():
        out_console.print(f"{q}: {run_dir.export / g['file']}", highlight=False)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    return run_pipeline(
        args.recipe, args.overrides or [], start=args.start, only=args.only, console=err_console,
        allow_cpu=args.allow_cpu,
    )  # fmt: skip


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .plan import CARDS, custom_card, data_size, engine_of, hours, make_plan, render, render_hours, total_hours

    if args.tflops is not None and args.gpu_gb is None:
        raise UserError("plan: --tflops needs --gpu-gb N (the card's memory)")
    card = CARDS[args.gpu] if args.gpu else custom_card(args.gpu_gb, args.tflops) if args.tflops else None
    recipe = _recipe(args)
    plan = make_plan(recipe, args.recipe, gpu_gb=args.gpu_gb or (card.gb if card else None), ram_gb=args.ram_gb,
                     disk_gb=args.disk_gb)  # fmt: skip
    rows, size = None, None
    if card:
        size = data_size(recipe)
        if size is None:
            raise UserError(f"{args.recipe}: plan --gpu: the data is not here; set data.sources[].limit to plan hours")
        rows = hours(recipe, plan.arch, card, engine_of(recipe, plan.device), size)
    if args.json:
        out = plan.to_json()
        if rows:
            out["hours"] = {"card": card.name, "train_questions": size[0], "dev_questions": size[1],
                            "total": round(total_hours(rows), 2), "stages": [
                                {"stage": h.stage, "tokens": round(h.tokens), "what": h.what, "tokens_per_s":
                                 round(h.rate, 1), "hours": None if h.hours is None else round(h.hours, 2),
                                 "source": h.note} for h in rows]}  # fmt: skip
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        render(plan, out_console)
        if rows:
            render_hours(rows, card, size, out_console)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from export.bundle import verify

    return verify(Path(args.bundle), out_console)


# ---- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medcritical",
        description="MedCritical: teacher templates + QLoRA SFT, iterative self-correction DPO, GGUF export.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("config", help="show, list or copy recipes")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    s = csub.add_parser("show", help="print the resolved recipe (with overrides applied)")
    _add_recipe(s)
    s.set_defaults(func=cmd_config_show)
    s = csub.add_parser("list", help="list the recipes shipped in recipes/")
    s.set_defaults(func=cmd_config_list)
    s = csub.add_parser("cp", help="copy a shipped recipe for editing")
    s.add_argument("name")
    s.add_argument("dest")
    s.set_defaults(func=cmd_config_cp)

    s = sub.add_parser("default-model", help="materialize the embedded SmolLM2-135M-Instruct as a transformers model")
    s.add_argument("--force", action="store_true", help="rebuild even if it is cached")
    s.set_defaults(func=cmd_default_model)

    s = sub.add_parser("data", help="load a question file and report counts, bad rows and the split")
    s.add_argument("file")
    s.add_argument("--format", default="auto", choices=["auto", "cmexam", "jsonl", "medqa", "hf-disk"])
    s.add_argument("--strict", action="store_true", help="fail on the first bad row")
    s.add_argument("--seed", type=int, default=0, help="split seed")
    s.set_defaults(func=cmd_data)

    s = sub.add_parser("eval", help="accuracy of a model (transformers dir, 'default' or a .gguf) on questions")
    _add_recipe(s, required=False)
    s.add_argument("--model", help="model directory, 'default' (embedded SmolLM2) or a .gguf file")
    s.add_argument("--adapter", help="LoRA adapter directory to apply (transformers backend)")
    s.add_argument("--data", action="append", help="question file (repeatable); default: the bundled demo set")
    s.add_argument("--format", default="auto", choices=["auto", "cmexam", "jsonl", "medqa", "hf-disk"])
    s.add_argument("--split", choices=["train", "dev", "test", "all"], help="default: all (or the recipe's eval.split)")
    s.add_argument("--limit", type=int, help="evaluate the first N questions of the split")
    s.add_argument("--output", help="output directory (resumes if it holds the same evaluation)")
    s.add_argument("--mode", choices=["generate", "loglik"], help="generate answers, or score option letters")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--temperature", type=float, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--load-in-4bit", action="store_true", help="load a transformers model in 4-bit NF4")
    s.add_argument("--strict", action="store_true", help="fail on the first bad data row instead of skipping it")
    s.add_argument("--bench", action="append", metavar="NAME=PATH",
                   help="a benchmark in its published files (repeatable): medqa, medmcqa, pubmedqa, mmlu, cmb, ceval, "
                   "cmmlu, cmexam, medxpertqa; one table of all of them")  # fmt: skip
    s.add_argument("--benches", metavar="YAML", help="a YAML file mapping benchmark names to paths, as --bench")
    s.set_defaults(func=cmd_eval)

    from .pipeline import STAGES

    s = sub.add_parser("run", help="the whole pipeline: " + " -> ".join(STAGES) + ", then a report")
    _add_recipe(s)
    s.add_argument("--from", dest="start", choices=list(STAGES), help="start at this stage (earlier ones must be done)")
    s.add_argument("--only", choices=list(STAGES), help="run only this stage")
    s.add_argument("--allow-cpu", action="store_true",
                   help="run on the CPU even though nvidia-smi sees a GPU that torch, llama.cpp or vLLM cannot use")  # fmt: skip
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("plan", help="estimate GPU memory, RAM and disk per stage (loads no model); fits or not")
    _add_recipe(s)
    for name, what in (("gpu", "GPU memory (default: the recipe's 'Sized for' line, else the GPU here)"),
                       ("ram", "RAM"), ("disk", "free disk")):  # fmt: skip
        s.add_argument(f"--{name}-gb", type=float, metavar="N", help=f"{what}, in GiB")
    s.add_argument(
        "--gpu",
        choices=["rtx3060", "rtx4090", "a100", "h100"],
        help="also plan hours per stage on this card (and its memory, unless --gpu-gb)",
    )
    s.add_argument("--tflops", type=float, metavar="N", help="with --gpu-gb: hours on a card of N 16-bit TFLOPS")
    s.add_argument("--json", action="store_true", help="print the plan as JSON, every term with its reason")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("teach", help="write verified chain-of-thought templates for the train questions")
    _add_recipe(s)
    s.set_defaults(func=cmd_teach)

    s = sub.add_parser("sft", help="QLoRA SFT of the student on the teacher templates (after teach)")
    _add_recipe(s)
    s.set_defaults(func=cmd_sft)

    s = sub.add_parser("rounds", help="iterative self-correction DPO rounds (after sft)")
    _add_recipe(s)
    s.add_argument("--round", type=int, help="run only this round (1-based; the rounds before it must be done)")
    s.add_argument(
        "--only", choices=["rollouts", "corrections", "pairs", "dpo", "eval"], help="with --round: run one part"
    )
    s.set_defaults(func=cmd_rounds)

    p_ = sub.add_parser("export", help="the selected policy as GGUFs (merge, convert, quantize, stamp, parity)")
    p_.add_argument("recipe", nargs="?", help="recipe YAML; its run's selected policy is exported")
    p_.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys")
    p_.add_argument("--base", help="base model directory or 'default' (default: the recipe's model)")
    p_.add_argument("--adapter", help="export this LoRA adapter instead of the run's policy (needs --out)")
    p_.add_argument("--no-adapter", action="store_true", help="export the base model as it is (needs --out)")
    p_.add_argument("--out", help="with --adapter/--no-adapter: a run directory of its own (GGUFs in OUT/export)")
    p_.add_argument("--name", help="GGUF file name prefix (default: the recipe's name)")
    p_.add_argument("--max-new-tokens", type=int, help="greedy tokens per parity question (default: eval's)")
    p_.add_argument("--threads", type=int, help="llama.cpp threads for the parity check (default: all cores)")
    p_.set_defaults(func=cmd_export)

    s = sub.add_parser("verify", help="check a bundle: checksums, and each GGUF gives its recorded answer")
    s.add_argument("bundle", help="a bundle directory (<run>/bundle)")
    s.set_defaults(func=cmd_verify)

    _register_chat_serve(sub)
    return p


# ---- chat and serve (inference only) -------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    from export.chat import chat, system_setting

    return chat(
        args.model,
        system=system_setting(args.system),
        n_ctx=args.n_ctx,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from export.api_server import check_bind, check_cors_origin, resolve_api_key, serve
    from export.chat import system_setting

    # Everything that needs no model is checked before the model loads.
    api_key = resolve_api_key(args.api_key, args.api_key_file)
    check_bind(args.host, api_key, args.insecure)
    origins = [check_cors_origin(o) for o in args.cors_origin or []]
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise UserError(f"serve: --max-tokens-limit must be at least 1, got {args.max_tokens_limit}")
    if args.max_request_bytes < 1024:
        raise UserError(f"serve: --max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    return serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=api_key,
        insecure=args.insecure,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        alias=args.alias,
        cors_origins=origins,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        system=system_setting(args.system),
    )


def _register_chat_serve(sub: argparse._SubParsersAction) -> None:
    """``chat`` and ``serve``: llama-cpp-python only, so they run on an inference-only install."""
    from export.api_server import API_KEY_ENV, MAX_REQUEST_BYTES

    system_help = (
        "system prompt: 'auto' (default) = the one the student was trained and evaluated with, in the language "
        "of the first user message; 'zh' or 'en' = that one in that language; 'none' = no system prompt; "
        "anything else = the system prompt itself"
    )
    s = sub.add_parser("chat", help="chat with a GGUF in the terminal (llama.cpp, offline)")
    s.add_argument("model", help="a .gguf file")
    s.add_argument("--system", default="auto", help=system_help)
    s.add_argument("--max-tokens", type=int, default=1024, help="reply length limit (default 1024)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, as in eval (default)")
    s.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible server for a GGUF (llama-cpp-python's server, hardened)",
        description="Serve a GGUF over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
        "/v1/models). Listens on 127.0.0.1 by default; another address needs an API key (or --insecure). "
        "No cross-origin (browser) access unless --cors-origin names the origin.",
    )
    s.add_argument("model", help="a .gguf file")
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="require the bearer token in this file (one line; chmod 600). Safer than --api-key",
    )
    s.add_argument(
        "--api-key",
        help=f"require this bearer token (default: ${API_KEY_ENV}, else none); visible in the process list "
        "and shell history: prefer --api-key-file",
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without an API key (trusted networks only)",
    )
    s.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="allow browser pages from this origin (scheme://host[:port]; repeatable). Default: none",
    )
    s.add_argument(
        "--max-tokens-limit",
        type=int,
        help="largest max_tokens a request may ask for; also the default (default: --n-ctx)",
    )
    s.add_argument(
        "--max-request-bytes",
        type=int,
        default=MAX_REQUEST_BYTES,
        help=f"largest request body accepted (default {MAX_REQUEST_BYTES})",
    )
    s.add_argument("--system", default="auto", help=system_help + " (used when a request has no system message)")
    s.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    s.add_argument(
        "--threads", type=int, help="llama.cpp threads (default: $MEDCRITICAL_LLAMA_THREADS, else all cores)"
    )
    s.add_argument("--alias", help="model name in the API (default: the file name without .gguf)")
    s.set_defaults(func=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    from .gpu_check import refuse_windows

    try:
        refuse_windows()  # before anything imports fcntl or resource
    except UserError as e:
        print_error(e)
        return 1
    offline_quiet()
    parser = build_parser()
    # Overrides may come after options too (`rounds R --round 1 seed=3`), which
    # argparse alone does not allow for a positional list.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in x and not x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    try:
        return args.func(args)
    except UserError as e:
        print_error(e)
        return 1
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
