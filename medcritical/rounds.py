"""Stage ``rounds``: iterative self-correction DPO.

Round r starts from round r-1's adapter (round 1 from the SFT adapter); each
round runs rollouts -> corrections -> pairs -> dpo -> eval under
``<run>/rounds/round-r/``, each part skipped when its output is complete.
After every round the new policy is evaluated on the dev split; with
``early_stop`` the rounds stop when dev accuracy falls. A per-round table
(``rounds.md``, ``rounds.json``) and a PNG plot are written.

Rollouts, corrections and these evaluations sample on the engine
``rounds.rollouts.engine`` names (:func:`engine_kind`): transformers on the
4-bit base + adapter, or llama.cpp on a q8_0 GGUF of base + adapter, exported
once per adapter into ``<run>/policies/`` (:mod:`medcritical.policy_gguf`).
Each generated row and the round's metrics name the engine that produced it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .artifacts import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    read_json,
    read_manifest,
    sha256_file,
    sha256_tree,
    write_manifest,
)
from .data import load_recipe_data
from .errors import UserError
from .recipe import Recipe

PARTS = ("rollouts", "corrections", "pairs", "dpo", "eval")


def engine_kind(recipe: Recipe) -> str:
    """The engine that samples the policy: ``rounds.rollouts.engine``, with ``auto`` resolved.

    ``auto`` is llama.cpp on a q8_0 GGUF of the policy when there is no CUDA
    (on CPU it samples several times faster than transformers on the 4-bit
    model) and the GGUF converter is installed; transformers otherwise.
    """
    want = recipe.rounds.rollouts.engine
    if want != "auto":
        return want
    import importlib.util

    from .models import cuda_available

    if cuda_available() or importlib.util.find_spec("llama_cpp") is None:
        return "transformers"
    from export.gguf import find_converter

    try:
        find_converter()
    except UserError:
        return "transformers"
    return "llamacpp"


def _engine(
    recipe: Recipe,
    adapter: Path | None,
    console: Console | None = None,
    *,
    gguf: Path | None = None,
    adapter_hash: str | None = None,
) -> Any:
    """The policy base + ``adapter`` (``None``: the base alone) on the recipe's engine, or ``gguf`` on llama.cpp.

    ``adapter_hash`` (the adapter's ``sha256_tree``, when the caller has it)
    spares hashing the adapter again to find its cached policy GGUF.
    """
    console = console or Console(stderr=True)
    if gguf is not None or engine_kind(recipe) == "llamacpp":
        from .engines import LlamaCppEngine
        from .policy_gguf import recipe_policy_gguf

        path = gguf or recipe_policy_gguf(recipe, adapter, console, adapter_hash=adapter_hash).path
        return LlamaCppEngine(path, n_ctx=recipe.eval.n_ctx, seed=recipe.seed)
    from .engines import HFEngine
    from .models import load_model

    with console.status(f"loading {recipe.model.name_or_path}" + (f" + {adapter}" if adapter else "") + "..."):
        loaded = load_model(recipe.model, adapter=adapter)
    return HFEngine(loaded.model, loaded.tokenizer)


class _Lazy:
    """An engine built on first use: a resumed round whose generations are all on disk loads nothing."""

    def __init__(self, recipe: Recipe, adapter: Path, console: Console) -> None:
        self.args = (recipe, adapter, console)
        self.engine: Any = None

    def __getattr__(self, name: str) -> Any:
        if self.engine is None:
            self.engine = _engine(*self.args)
        return getattr(self.engine, name)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            gc.collect()

    def info(self) -> dict[str, str] | None:
        """Which engine ran (and on which GGUF); None when it was never needed."""
        if self.engine is None:
            return None
        gguf = getattr(self.engine, "gguf", None)
        return {"engine": self.engine.name} | ({"gguf": str(gguf)} if gguf else {})


def _engines_used(rows: list[dict]) -> str | None:
    """The engines that generated ``rows`` ("llamacpp", or "llamacpp+transformers" after a switch)."""
    names = sorted({r["engine"] for r in rows if r.get("engine")})
    return "+".join(names) or None


def eval_settings(recipe: Recipe, adapter: Path | None) -> dict[str, Any]:
    """What a dev evaluation's results depend on; its cache key (and refusal to mix)."""
    kind = engine_kind(recipe)
    settings = {
        "model": recipe.model.name_or_path,
        "adapter": sha256_tree(adapter) if adapter is not None else None,
        "engine": kind,
        "eval": recipe.eval.model_dump(),
        "language": recipe.language,
    }
    if kind == "transformers":
        settings["load_in_4bit"] = recipe.model.load_in_4bit
    else:
        from .policy_gguf import MERGE_INTO, QTYPE

        settings["gguf"] = {"qtype": QTYPE, "merge_into": MERGE_INTO}
    return settings


def eval_policy(
    recipe: Recipe, adapter: Path | None, out: Path, console: Console, gguf: Path | None = None
) -> dict[str, Any]:
    """Dev-split accuracy of base + ``adapter`` (``None``: the untrained base); resumes, cached by settings.

    Greedy as ``recipe.eval`` says, on the engine ``rounds.rollouts.engine``
    picks (:func:`engine_kind`): llama.cpp evaluates the q8_0 GGUF of base +
    adapter (exported once into ``<output_dir>/policies``), transformers the
    4-bit base with the adapter. With ``gguf`` it evaluates that file on
    llama.cpp instead (an exported model; ``adapter`` is ignored). Returns
    ``summary.json``'s content (accuracy, parse_rate, engine, ...).
    """
    from .evaluate import evaluate

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
    summary = out / "summary.json"
    if gguf is not None:
        settings = {"gguf": sha256_file(gguf), "eval": recipe.eval.model_dump(), "language": recipe.language}
        inputs = {"gguf": settings["gguf"]}
    else:
        settings = eval_settings(recipe, adapter)
        inputs = {"adapter": settings["adapter"] or "none"}
    if summary.exists() and is_complete(out, settings, inputs):
        return read_json(summary)
    if (out / "settings.json").exists():
        old = read_json(out / "settings.json")
        changed = sorted(
            k for k in settings.keys() | old.keys() if old.get(k) != json.loads(json.dumps(settings.get(k)))
        )
        if changed:
            raise UserError(
                f"{out}: holds an evaluation with other settings ({', '.join(changed)} differ); "
                "delete it to evaluate again"
                + (
                    f", or set rounds.rollouts.engine={old['engine']}"
                    if "engine" in changed and "engine" in old
                    else ""
                )
            )
    records = load_recipe_data(recipe.data, split=recipe.eval.split)[: recipe.eval.limit]
    engine = _engine(recipe, adapter, console, gguf=gguf, adapter_hash=settings.get("adapter"))
    label = gguf.name if gguf is not None else "base" if adapter is None else out.parent.name
    ev = recipe.eval
    res = evaluate(
        records, engine, out, mode=ev.mode, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
        top_p=ev.top_p, batch_size=ev.batch_size, language=recipe.language, seed=recipe.seed, config=settings,
        console=console, label=f"eval {label}",
    )  # fmt: skip
    used = getattr(engine, "gguf", None)
    write_manifest(out, "eval", settings, inputs, metrics=res, gguf=str(used) if used else None)
    engine.close()
    return res


def run_round(recipe: Recipe, r: int, console: Console, only: str | None = None) -> dict[str, Any]:
    """One round; ``only`` runs a single part (its inputs must exist)."""
    from . import selfplay
    from .artifacts import JsonlLog

    run = Path(recipe.output_dir)
    rdir = run / "rounds" / f"round-{r}"
    start = run / "sft" / "adapter" if r == 1 else run / "rounds" / f"round-{r - 1}" / "adapter"
    if not (start / "adapter_config.json").exists():
        raise UserError(f"{start}: no adapter to start round {r} from; run the previous stage first")
    config = {
        "rounds": recipe.rounds.model_dump(),
        "model": recipe.model.model_dump(),
        "seed": recipe.seed,
        "language": recipe.language,
    }
    inputs = {"start_adapter": sha256_tree(start), "data": json.dumps(recipe.data.model_dump(), sort_keys=True)}
    if only is None and is_complete(rdir, config, inputs):
        console.print(f"[green]round {r}: up to date")
        return read_manifest(rdir)["metrics"]
    rdir.mkdir(parents=True, exist_ok=True)
    want = set(PARTS) if only is None else {only}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and want - {"dpo"}:
        raise UserError(
            f"round {r}: under a multi-process launcher only `--only dpo` runs; generate with one process "
            "(docs/multi-gpu.md)"
        )
    train = load_recipe_data(recipe.data, split="train", console=console)
    if recipe.rounds.rollouts.questions:
        # A different slice of the training questions each round.
        n = recipe.rounds.rollouts.questions
        off = ((r - 1) * n) % max(len(train), 1)
        train = (train[off:] + train[:off])[:n]
    metrics: dict[str, Any] = {"round": r, "questions": len(train)}

    # Engines built this time (None: everything was on disk), for the manifest; the rows say who generated them.
    engines: dict[str, dict[str, str] | None] = {}
    policy = _Lazy(recipe, start, console)
    rolled = JsonlLog(rdir / "rollouts.jsonl")
    if "rollouts" in want:
        rolled = selfplay.rollouts(recipe, policy, train, rdir / "rollouts.jsonl", console)
    samples = [s for row in rolled.values() for s in row["samples"]]
    metrics["sample_accuracy"] = round(sum(s["correct"] for s in samples) / max(len(samples), 1), 4)
    metrics["sample_parse_rate"] = round(sum(s["parsed"] is not None for s in samples) / max(len(samples), 1), 4)
    metrics["rollout_engine"] = _engines_used(rolled.values())

    corrected = JsonlLog(rdir / "corrections.jsonl")
    sft = run / "sft" / "adapter"
    corrector = policy
    if recipe.rounds.correction.by == "sft" and sft != start:
        engines["policy"] = policy.info()
        policy.close()  # free it before the corrector loads
        corrector = _Lazy(recipe, sft, console)
    if "corrections" in want:
        corrected = selfplay.corrections(recipe, corrector, train, rolled, rdir / "corrections.jsonl", console)
    metrics["corrections_tried"] = len(corrected)
    metrics["corrections_verified"] = sum(c["verified"] for c in corrected.values())
    metrics["correction_engine"] = _engines_used(corrected.values())
    engines["policy" if corrector is policy else "corrector"] = corrector.info()
    corrector.close()

    if "pairs" in want:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(str(start))
        pairs, stats = selfplay.build_pairs(recipe, train, rolled, corrected, tokenizer)
        selfplay.write_pairs(pairs, rdir / "pairs.jsonl")
        atomic_write_json(rdir / "pairs_stats.json", stats)
    if (rdir / "pairs_stats.json").exists():
        metrics |= {f"pairs_{k}": v for k, v in read_json(rdir / "pairs_stats.json").items()}

    if "dpo" in want:
        from .dpo import run_dpo

        dpo_inputs = {"pairs": sha256_tree(rdir / "pairs.jsonl"), "start": inputs["start_adapter"]}
        if is_complete(rdir / "dpo", config, dpo_inputs):
            dm = read_manifest(rdir / "dpo")["metrics"]
        elif not (rdir / "pairs.jsonl").read_text(encoding="utf-8").strip():
            # No verified pair this round: the policy carries over unchanged.
            console.print(f"[yellow]round {r}: no preference pairs; the policy is carried over unchanged")
            with atomic_dir(rdir / "adapter") as tmp:
                for f in start.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / f.name)
            dm = {"steps": 0, "pairs": 0}
            write_manifest(rdir / "dpo", "dpo", config, dpo_inputs, metrics=dm)
        else:
            dm = run_dpo(recipe, rdir / "pairs.jsonl", start, rdir, console)
            write_manifest(rdir / "dpo", "dpo", config, dpo_inputs, metrics=dm)
        metrics |= {f"dpo_{k}": v for k, v in dm.items() if k != "resumed_from"}
    if "eval" in want:
        ev = eval_policy(recipe, rdir / "adapter", rdir / "eval", console)
        metrics |= {"dev_accuracy": ev["accuracy"], "dev_parse_rate": ev["parse_rate"], "eval_engine": ev["engine"]}
    if only is None:
        write_manifest(rdir, "round", config, inputs, metrics=metrics, engines=engines)
    return metrics


def run_rounds(recipe: Recipe, console: Console | None = None) -> list[dict[str, Any]]:
    """All rounds, with the SFT policy's dev accuracy as round 0."""
    console = console or Console(stderr=True)
    run = Path(recipe.output_dir)
    base = eval_policy(recipe, run / "sft" / "adapter", run / "rounds" / "round-0" / "eval", console)
    table = [{"round": 0, "dev_accuracy": base["accuracy"], "dev_parse_rate": base["parse_rate"]}]
    for r in range(1, recipe.rounds.num_rounds + 1):
        table.append(run_round(recipe, r, console))
        if recipe.rounds.early_stop and table[-1]["dev_accuracy"] < table[-2]["dev_accuracy"]:
            console.print(
                f"[yellow]round {r}: dev accuracy fell ({table[-2]['dev_accuracy']:.1%} -> {table[-1]['dev_accuracy']:.1%}); stopping early"
            )
            break
    write_round_report(table, run / "rounds", console)
    return table


COLUMNS = (
    "round",
    "dev_accuracy",
    "dev_parse_rate",
    "sample_accuracy",
    "corrections_tried",
    "corrections_verified",
    "pairs_pairs",
    "dpo_reward_margin_last",
    "rollout_engine",
)


def write_round_report(table: list[dict[str, Any]], out: Path, console: Console) -> None:
    atomic_write_json(out / "rounds.json", table)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    t = Table(title="self-correction rounds", title_justify="left")
    for c in COLUMNS:
        t.add_column(c.replace("_", " "), justify="right")
    for row in table:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        t.add_row(*cells)
    atomic_write_text(out / "rounds.md", "\n".join(lines) + "\n")
    console.print(t)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [row["round"] for row in table]
    ax.plot(xs, [row["dev_accuracy"] for row in table], marker="o", label="dev accuracy")
    ax.plot(xs, [row.get("dev_parse_rate") for row in table], marker="s", label="dev parse rate")
    ax.set_xlabel("round (0 = SFT)")
    ax.set_ylim(0, 1)
    ax.set_xticks(xs)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".rounds.png.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out / "rounds.png")
