"""The run report: ``<run>/report.md`` and ``<run>/report.png``.

Built only from the artifacts the stages wrote (summaries, trainer logs,
round tables, the export report) and the pipeline's per-stage record, so it
can be rebuilt at any time from a run directory.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .artifacts import atomic_write_json, atomic_write_text, read_json, read_jsonl
from .layout import RunDir
from .recipe import Recipe
from .steps import Step


def accuracy_rows(run: RunDir) -> list[dict[str, Any]]:
    """Dev accuracy per stage with its 95% interval: base, SFT, each DPO round (the policy marked), each exported
    quant (the shipped one marked)."""
    from .benchmarks import wilson

    rows = []

    def add(stage: str, s: dict[str, Any] | None, n: int | None = None) -> None:
        if s:
            acc = s.get("accuracy")
            ci = wilson(round(acc * n), n) if acc is not None and n else None
            rows.append({"stage": stage, "accuracy": acc, "ci95": list(ci) if ci else None,
                         "parse_rate": s.get("parse_rate"), "n": n})  # fmt: skip

    ev = read_json(run.eval / "summary.json") if (run.eval / "summary.json").is_file() else {}
    n = (ev.get("base") or {}).get("n")
    add("base", ev.get("base"), n)
    if run.rounds_json.is_file():
        table = read_json(run.rounds_json)
        for row in table["rounds"]:
            name = "sft" if row["round"] == 0 else f"round {row['round']}"
            mark = " (policy)" if row["round"] == table["selected"] else ""
            add(name + mark, {"accuracy": row.get("dev_accuracy"), "parse_rate": row.get("dev_parse_rate")}, n)
    shipped = (Step("bundle", run.bundle, {}).metrics() or {}).get("shipped")
    for q, s in (ev.get("quants") or {}).items():
        add(f"gguf {q}" + (" (shipped)" if q == shipped else ""), s, s.get("n"))
    return rows


def loss_curves(run: RunDir) -> dict[str, list[tuple[float, float]]]:
    """Training loss by step: SFT, then each DPO round."""
    curves = {}
    logs = [("sft", run.sft / "metrics.jsonl")]
    logs += [(f"round {rd.number}", rd.dpo / "metrics.jsonl") for rd in run.round_dirs()]
    for name, path in logs:
        if path.is_file():
            points = [(h["step"], h["loss"]) for h in read_jsonl(path) if "loss" in h and "step" in h]
            if points:
                curves[name] = points
    return curves


PAIR_KEYS = ("sample_accuracy", "chance", "sample_forced", "sample_forced_accuracy", "sample_cut",
             "corrections_tried", "corrections_verified", "correction_cut", "pairs_candidates", "pairs_not_committed",
             "pairs_pairs", "pairs_correction", "pairs_self-consistency", "dpo_steps", "dpo_loss_first",
             "dpo_loss_last", "dpo_reward_margin_last")  # fmt: skip


def pair_rows(run: RunDir) -> list[dict[str, Any]]:
    table = read_json(run.rounds_json)["rounds"] if run.rounds_json.is_file() else []
    return [{"round": r["round"]} | {k: r.get(k) for k in PAIR_KEYS} for r in table if r["round"] > 0]


def parity_rows(run: RunDir) -> list[dict[str, Any]]:
    report = run.export / "report.json"
    if not report.is_file():
        return []
    keep = (
        "file",
        "n",
        "tokens_identical",
        "rel_error_max",
        "top1_agreement",
        "tf_answer_agreement",
        "tf_top1_agreement",
    )
    return [{k: s.get(k) for k in keep} for s in read_json(report).get("models", {}).values()]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    if not rows:
        return ["(none)"]
    cols = columns or list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def _plot(path: Any, acc: list[dict], curves: dict, pairs: list[dict], stages: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    if acc:
        xs = range(len(acc))
        ax.plot(xs, [r["accuracy"] or 0 for r in acc], marker="o", label="accuracy")
        ax.plot(xs, [r["parse_rate"] or 0 for r in acc], marker="s", label="parse rate")
        ax.set_xticks(list(xs), [r["stage"] for r in acc], rotation=20)
        ax.legend()
    ax.set_ylim(0, 1)
    ax.set_title("dev split, per stage")
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("step")
    ax.set_title("training loss (SFT, DPO rounds)")
    if curves:
        ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    rounds = [p for p in pairs if p["round"] > 0]
    if rounds:
        xs = [p["round"] for p in rounds]
        w = 0.27
        for j, (k, label) in enumerate(
            [("corrections_tried", "corrections tried"), ("corrections_verified", "verified"), ("pairs_pairs", "pairs")]
        ):  # a subset of PAIR_KEYS, with labels
            ax.bar([x + (j - 1) * w for x in xs], [p.get(k) or 0 for p in rounds], width=w, label=label)
        ax.set_xticks(xs)
        ax.set_xlabel("round")
        ax.legend()
    ax.set_title("self-correction pairs")
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1][1]
    names = [s for s in stages if "seconds" in stages[s]]
    if names:
        ax.bar(names, [stages[s]["seconds"] for s in names], color="tab:blue")
        ax.set_ylabel("wall time (s)")
        ax2 = ax.twinx()
        ax2.plot(names, [stages[s].get("peak_rss_mb", 0) for s in names], color="tab:red", marker="o")
        ax2.set_ylabel("peak RSS (MB)", color="tab:red")
    ax.set_title("wall time and peak memory per stage")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_run_report(run: RunDir, recipe: Recipe, stages: dict[str, Any]) -> dict[str, Any]:
    """Write report.md, report.png and report.json under the run; return the report data.

    Every number comes from the artifacts (rounds.json names the policy, the
    bundle's manifest the shipped file), so the report says what ships.
    """
    acc, curves, pairs, parity = accuracy_rows(run), loss_curves(run), pair_rows(run), parity_rows(run)
    stage_rows = [
        {k: r.get(k) for k in ("status", "skipped", "seconds", "peak_rss_mb", "did")} | {"stage": s}
        for s, r in stages.items()
    ]
    total = sum(r.get("seconds") or 0 for r in stages.values())
    peak = max((r.get("peak_rss_mb") or 0 for r in stages.values()), default=0)
    rounds = read_json(run.rounds_json) if run.rounds_json.is_file() else {}
    bundle = Step("bundle", run.bundle, {}).metrics()
    data = {
        "name": recipe.name,
        "policy_round": rounds.get("selected"),
        "rounds_stopped": rounds.get("stopped"),
        "shipped": bundle.get("shipped"),
        "shipped_file": str(run.bundle / bundle["file"]) if bundle.get("file") else None,
        "shipped_why": bundle.get("why"),
        "accuracy": acc,
        "pairs": pairs,
        "parity": parity,
        "stages": stage_rows,
        "wall_seconds": round(total, 1),
        "peak_rss_mb": peak,
        "final_losses": {k: v[-1][1] for k, v in curves.items()},
    }
    _plot(run.report_png, acc, curves, pairs, stages)
    lines = [
        f"# medcritical run: {recipe.name}",
        "",
        f"Model `{recipe.model.name_or_path}`, data {', '.join(s.path for s in recipe.data.sources)}, "
        f"{recipe.rounds.num_rounds} self-correction round(s). Wall time {total / 60:.1f} min, "
        f"peak memory {peak:.0f} MB (largest stage).",
        "",
        f"Policy: round {data['policy_round']}"
        + (f" ({data['rounds_stopped']})" if data["rounds_stopped"] else "")
        + (
            f". Shipped: `{data['shipped_file']}` ({data['shipped']}): {data['shipped_why']}."
            if data["shipped"]
            else "."
        ),
        "",
        "![report](report.png)",
        "",
        f"## Accuracy on the {recipe.eval.split} split",
        "",
        *_md_table(acc, ["stage", "accuracy", "ci95", "parse_rate", "n"]),
        "",
        "## Self-correction rounds",
        "",
        *_md_table(pairs),
        "",
        "## Training loss (last logged)",
        "",
        *_md_table([{"run": k, "loss": v} for k, v in data["final_losses"].items()]),
        "",
        "## Export parity",
        "",
        *_md_table(parity),
        "",
        "## Stages",
        "",
        *_md_table(stage_rows, ["stage", "status", "skipped", "seconds", "peak_rss_mb", "did"]),
        "",
    ]
    atomic_write_text(run.report_md, "\n".join(lines))
    atomic_write_json(run.report_json, data)
    return data


def print_final(run: RunDir, recipe: Recipe, report: dict[str, Any]) -> None:
    """The accuracy table per stage and the commands to use the shipped GGUF (on stdout)."""
    from .runtime import out_console as out

    t = Table(title=f"{recipe.name}: accuracy on the {recipe.eval.split} split", title_justify="left")
    for c in ("stage", "accuracy", "parse rate", "n"):
        t.add_column(c, justify="left" if c == "stage" else "right", overflow="fold")
    for r in report["accuracy"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        parse = "-" if r["parse_rate"] is None else f"{r['parse_rate']:.1%}"
        t.add_row(r["stage"], acc, parse, "-" if r["n"] is None else str(r["n"]))
    out.print(t)
    out.print(
        f"wall time {report['wall_seconds'] / 60:.1f} min, peak memory {report['peak_rss_mb']:.0f} MB; "
        f"report: {run.report_md}",
        highlight=False,
    )
    if report.get("shipped_file"):
        out.print(
            f"shipped: {report['shipped_file']} (round {report['policy_round']}, {report['shipped']})", highlight=False
        )
        out.print(f"chat:   medcritical chat {report['shipped_file']}", highlight=False)
        out.print(f"serve:  medcritical serve {report['shipped_file']}", highlight=False)
        out.print(f"verify: medcritical verify {run.bundle}", highlight=False)
