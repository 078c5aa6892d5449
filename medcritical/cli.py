"""The ``medcritical`` command: one subcommand per stage.

``main(argv) -> int`` is what the console script and ``python -m medcritical``
call, and what tests call in-process. A :class:`UserError` prints one line and
exits 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from .errors import UserError

Handler = Callable[[argparse.Namespace], int]
err_console = Console(stderr=True)
out_console = Console()


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
    from .evaluate import evaluate, print_summary

    recipe = _recipe(args)
    ev = recipe.eval
    if args.data:
        recipe.data.sources = [{"path": d, "format": args.format} for d in args.data]
    split = args.split or (ev.split if args.recipe else "all")
    limit = args.limit or ev.limit
    records = load_recipe_data(recipe.data, split=split, console=err_console)[:limit]
    if not records:
        raise UserError(f"eval: no questions in split {split!r}")
    model = args.model or recipe.model.name_or_path
    mode = args.mode or ev.mode
    from .engines import open_engine

    with err_console.status(f"loading {model}..."):
        engine = open_engine(
            model,
            adapter=args.adapter,
            model_cfg=recipe.model,
            load_in_4bit=args.load_in_4bit,
            n_ctx=ev.n_ctx,
            seed=recipe.seed,
        )
    settings = {
        "model": model,
        "adapter": args.adapter,
        "engine": engine.name,
        "load_in_4bit": args.load_in_4bit,
        "split": split,
        "mode": mode,
        "max_new_tokens": args.max_new_tokens or ev.max_new_tokens,
        "temperature": ev.temperature if args.temperature is None else args.temperature,
        "top_p": ev.top_p if args.top_p is None else args.top_p,
        "batch_size": args.batch_size or ev.batch_size,
        "language": recipe.language,
        "seed": recipe.seed,
    }
    out = Path(args.output) if args.output else Path(recipe.output_dir) / "eval" / f"{Path(model).stem}-{split}-{mode}"
    summary = evaluate(
        records,
        engine,
        out,
        mode=mode,
        max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        batch_size=settings["batch_size"],
        language=recipe.language,
        seed=recipe.seed,
        config=settings,
        console=err_console,
    )
    print_summary(summary, title=f"{model} ({engine.name}, {mode}) on {split}", console=out_console)
    out_console.print(f"per-question results: {out / 'predictions.jsonl'}", highlight=False)
    return 0


# ---- training stages -----------------------------------------------------------


def cmd_sft(args: argparse.Namespace) -> int:
    from .sft import run_sft

    run_sft(_recipe(args), console=err_console)
    return 0


def cmd_rounds(args: argparse.Namespace) -> int:
    from .rounds import run_round, run_rounds

    recipe = _recipe(args)
    if args.round is None:
        run_rounds(recipe, console=err_console)
    else:
        out_console.print(run_round(recipe, args.round, console=err_console, only=args.only))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    return run_pipeline(args.recipe, args.overrides or [], start=args.start, only=args.only, console=err_console)


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
    s.set_defaults(func=cmd_eval)

    from .pipeline import STAGES

    s = sub.add_parser("run", help="the whole pipeline: teach -> sft -> rounds -> export -> eval, then a report")
    _add_recipe(s)
    s.add_argument("--from", dest="start", choices=STAGES, help="start at this stage (earlier ones must be done)")
    s.add_argument("--only", choices=STAGES, help="run only this stage")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("sft", help="QLoRA SFT of the student on the teacher templates (after teach)")
    _add_recipe(s)
    s.set_defaults(func=cmd_sft)

    s = sub.add_parser("rounds", help="iterative self-correction DPO rounds (after sft)")
    _add_recipe(s)
    s.add_argument("--round", type=int, help="run only this round (1-based)")
    s.add_argument(
        "--only", choices=["rollouts", "corrections", "pairs", "dpo", "eval"], help="with --round: run one part"
    )
    s.set_defaults(func=cmd_rounds)

    from export.cli import register as register_export

    from .teach import register as register_teach

    register_teach(sub)
    register_export(sub)
    return p


def offline_quiet() -> None:
    """Offline by default (no hub lookups; a recipe naming a remote teacher is the
    only network use) and no third-party progress bars over our own."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' "Loading weights" bars
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }.items():
        os.environ.setdefault(key, value)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
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
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
