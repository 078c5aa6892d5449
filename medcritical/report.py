"""The run report: ``<run>/report.md`` and ``<run>/report.png``.

Built only from the artifacts the stages wrote (summaries, trainer logs,
round tables, the export report) and the pipeline's per-stage record, so it
can be rebuilt at any time from a run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .artifacts import atomic_write_json, atomic_write_text, read_json, read_jsonl, read_manifest
from .recipe import Recipe


def _summary(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def accuracy_rows(run: Path) -> list[dict[str, Any]]:
    """Dev accuracy per stage: base, SFT, each DPO round, each exported GGUF."""
    rows = []

    def add(stage: str, s: dict[str, Any] | None) -> None:
        if s:
            rows.append({"stage": stage, "accuracy": s.get("accuracy"), "parse_rate": s.get("parse_rate"), "n": s["n"]})

    add("base", _summary(run / "eval" / "base" / "summary.json"))
    add("sft", _summary(run / "rounds" / "round-0" / "eval" / "summary.json"))
    table = run / "rounds" / "rounds.json"
    for row in read_json(table) if table.is_file() else []:
        if row["round"] > 0:
            add(f"round {row['round']}", _summary(run / "rounds" / f"round-{row['round']}" / "eval" / "summary.json"))
    for q, s in (read_manifest(run / "eval") or {}).get("metrics", {}).get("ggufs", {}).items():
        add(f"gguf {q}", s)
    return rows


def loss_curves(run: Path) -> dict[str, list[tuple[float, float]]]:
    """Training loss by step: SFT, then each DPO round."""
    curves = {}
    logs = [("sft", run / "sft" / "metrics.jsonl")]
    logs += [(d.name.replace("-", " "), d / "metrics.jsonl") for d in sorted((run / "rounds").glob("round-*"))]
    for name, path in logs:
        if path.is_file():
            points = [(h["step"], h["loss"]) for h in read_jsonl(path) if "loss" in h and "step" in h]
            if points:
                curves[name] = points
    return curves


def pair_rows(run: Path) -> list[dict[str, Any]]:
    table = run / "rounds" / "rounds.json"
    keys = ("sample_accuracy", "corrections_tried", "corrections_verified", "pairs_candidates", "pairs_pairs")
    return [{"round": r["round"]} | {k: r.get(k) for k in keys} for r in (read_json(table) if table.is_file() else [])]


def parity_rows(run: Path) -> list[dict[str, Any]]:
    report = run / "export" / "report.json"
    if not report.is_file():
        return []
    rows = []
    for s in read_json(report).get("models", {}).values():
        rows.append({k: v for k, v in s.items() if isinstance(v, (int, float, str)) or v is None})
    return rows


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


def _plot(path: Path, acc: list[dict], curves: dict, pairs: list[dict], stages: dict[str, Any]) -> None:
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
        ):
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


def write_run_report(run: Path, recipe: Recipe, stages: dict[str, Any]) -> dict[str, Any]:
    """Write report.md, report.png and report.json under ``run``; return the report data."""
    acc, curves, pairs, parity = accuracy_rows(run), loss_curves(run), pair_rows(run), parity_rows(run)
    stage_rows = [
        {
            "stage": s,
            "status": r.get("status"),
            "skipped": r.get("skipped"),
            "seconds": r.get("seconds"),
            "peak_rss_mb": r.get("peak_rss_mb"),
        }
        for s, r in stages.items()
    ]
    total = sum(r.get("seconds") or 0 for r in stages.values())
    peak = max((r.get("peak_rss_mb") or 0 for r in stages.values()), default=0)
    data = {
        "name": recipe.name,
        "accuracy": acc,
        "pairs": pairs,
        "parity": parity,
        "stages": stage_rows,
        "wall_seconds": round(total, 1),
        "peak_rss_mb": peak,
        "final_losses": {k: v[-1][1] for k, v in curves.items()},
    }
    _plot(run / "report.png", acc, curves, pairs, stages)
    lines = [
        f"# medcritical run: {recipe.name}",
        "",
        f"Model `{recipe.model.name_or_path}`, data {', '.join(s.path for s in recipe.data.sources)}, "
        f"{recipe.rounds.num_rounds} self-correction round(s). Wall time {total / 60:.1f} min, "
        f"peak memory {peak:.0f} MB (largest stage).",
        "",
        "![report](report.png)",
        "",
        f"## Accuracy on the {recipe.eval.split} split",
        "",
        *_md_table(acc, ["stage", "accuracy", "parse_rate", "n"]),
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
        *_md_table(stage_rows),
        "",
    ]
    atomic_write_text(run / "report.md", "\n".join(lines))
    atomic_write_json(run / "report.json", data)
    return data


def print_final(run: Path, recipe: Recipe, report: dict[str, Any]) -> None:
    """The accuracy table per stage and the command to chat with the GGUF (on stdout)."""
    out = Console()
    t = Table(title=f"{recipe.name}: accuracy on the {recipe.eval.split} split", title_justify="left")
    for c in ("stage", "accuracy", "parse rate", "n"):
        t.add_column(c, justify="left" if c == "stage" else "right")
    for r in report["accuracy"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        parse = "-" if r["parse_rate"] is None else f"{r['parse_rate']:.1%}"
        t.add_row(r["stage"], acc, parse, str(r["n"]))
    out.print(t)
    out.print(
        f"wall time {report['wall_seconds'] / 60:.1f} min, peak memory {report['peak_rss_mb']:.0f} MB; "
        f"report: {run / 'report.md'}",
        highlight=False,
    )
    final = (read_manifest(run / "eval") or {}).get("metrics", {}).get("gguf")
    if final:
        out.print(f"chat:  medcritical chat {run / 'export' / final['file']}", highlight=False)
        out.print(f"serve: medcritical serve {run / 'export' / final['file']}", highlight=False)
