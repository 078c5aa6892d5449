"""Stage ``bundle``: what a hospital's IT copies onto an offline machine, and ``medcritical verify``.

``<run>/bundle/`` holds:

* the GGUF chosen by measurement (:func:`choose`): the smallest of
  ``export.ship.candidates`` whose accuracy on the parity questions is at most
  ``export.ship.tolerance`` below the merged model's and whose answers agree
  with the merged model's on at least ``1 - tolerance`` of the questions both
  answered; when none qualifies, the one closest to the merged model (highest
  teacher-forced answer agreement, then free-running agreement), and the card
  says so;
* its Ollama ``Modelfile`` with the system prompt the student was trained with;
* ``MODEL_CARD.md``: base model and licence, data with hashes and counts, teacher,
  recipe, rounds and the selected round, accuracy per quant with its protocol,
  parity, why this file was chosen, intended use and a medical-use notice;
* ``recipe.yaml`` (the resolved recipe), ``bundle.json`` (what ``verify`` checks),
  ``SHA256SUMS``.

``medcritical verify BUNDLE`` checks the sums and that each GGUF loads and gives
the recorded answer to a recorded dev question. It needs only the inference
install (``bash setup.sh --infer``): no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from medcritical.artifacts import atomic_write_json, atomic_write_text, read_json, sha256_file, sha256_json
from medcritical.errors import UserError
from medcritical.prompts import SYSTEM

NOTICE = (
    "This model is a research artifact for medical exam-style multiple-choice questions. It is not a medical "
    "device and must not be used to diagnose, treat or make decisions about patients. Its answers can be wrong "
    "in ways that look convincing; a qualified clinician must check anything it says."
)


def choose(quants: dict[str, dict[str, Any]], candidates: list[str], tolerance: float) -> tuple[str, str]:
    """(quant to ship, why) from the eval stage's per-quant results (see the module doc)."""
    rows = [(q, quants[q]) for q in candidates if q in quants]
    if not rows:
        raise UserError(f"bundle: none of {candidates} was evaluated; run the eval stage")

    def ok(r: dict[str, Any]) -> tuple[bool, str]:
        acc, ref, agree = r.get("compared_accuracy"), r.get("merged_accuracy"), r.get("answer_agreement")
        if acc is None or ref is None:
            return False, "no accuracy on the parity questions"
        if acc < ref - tolerance:
            return False, f"accuracy {acc:.1%} is more than {tolerance:.1%} below the merged model's {ref:.1%}"
        if agree is None:
            return False, "no question answered by both it and the merged model"
        if agree < 1 - tolerance:
            return False, f"answer agreement {agree:.1%} < {1 - tolerance:.1%}"
        return True, f"accuracy {acc:.1%} vs merged {ref:.1%}, answer agreement {agree:.1%}"

    verdicts = {q: ok(r) for q, r in rows}
    passing = [q for q, _ in rows if verdicts[q][0]]
    others = "; ".join(f"{q}: {verdicts[q][1]}" for q, _ in rows)
    if passing:
        best = min(passing, key=lambda q: quants[q]["size_bytes"])
        return best, f"smallest candidate within tolerance {tolerance:g} of the merged model ({others})"

    def distance(q: str) -> tuple[float, float, float]:
        # Teacher-forced agreement first: every file scores the merged model's own replies, so it measures the
        # file, not where two long greedy generations happened to drift apart (free-running agreement).
        r = quants[q]
        return (
            -(r.get("tf_answer_agreement") or 0),
            -(r.get("answer_agreement") or 0),
            abs((r.get("merged_accuracy") or 0) - (r.get("compared_accuracy") or 0)),
        )

    best = min((q for q, _ in rows), key=distance)
    r = quants[best]
    measured = (
        f"teacher-forced answer agreement {_pct(r.get('tf_answer_agreement'))}, "
        f"free-running {_pct(r.get('answer_agreement'))}"
    )
    return best, (
        f"no candidate is within tolerance {tolerance:g}; shipping the closest to the merged model ({measured}; "
        f"{others})"
    )


def ship_language(recipe: Any, templates: Path) -> str:
    """The language of the system prompt the bundle's Modelfile carries: the recipe's, or the
    majority language of the training templates when the recipe says ``auto``."""
    if recipe.language in ("zh", "en"):
        return recipe.language
    langs = [json.loads(line)["lang"] for line in templates.read_text(encoding="utf-8").splitlines() if line.strip()]
    return max(("en", "zh"), key=langs.count) if langs else "en"


def _check_question(predictions: Path, max_tokens: int) -> dict[str, Any]:
    """One recorded dev question for ``verify``: the first the GGUF answered, with what it said."""
    rows = [json.loads(x) for x in predictions.read_text(encoding="utf-8").splitlines() if x.strip()]
    row = next((r for r in rows if r["parsed"] is not None), rows[0])
    return {"id": row["id"], "prompt": row["prompt"], "expected_output": row["output"], "expected_answer": row["parsed"],
            "letters": "".join(sorted({*"ABCDE", *row["gold"]})), "max_tokens": max_tokens}  # fmt: skip


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _shipped_hashes(run_dir: Any, ex: dict[str, Any], quants: list[str]) -> dict[str, str]:
    """quant -> sha256 of each exported file the bundle may ship, hashed now: it must be the file the export
    recorded, and the file the eval stage measured (the choice is made on those measurements)."""
    from medcritical.steps import Step

    hashes = {}
    for q in quants:
        if q not in ex["ggufs"]:
            raise UserError(f"{run_dir.export}: has no {q} GGUF (made for other settings); run the export stage")
        f = run_dir.export / ex["ggufs"][q]["file"]
        h = sha256_file(f) if f.is_file() else None
        if h != ex["ggufs"][q]["sha256"]:
            raise UserError(f"{f}: missing or differs from what the export recorded; run the export stage again")
        if (Step("eval", run_dir.quant_eval(q), {}).manifest() or {}).get("material", {}).get("gguf") != h:
            raise UserError(f"{run_dir.quant_eval(q)}: not an evaluation of {f}; run the eval stage again")
        hashes[q] = h
    return hashes


def run(recipe: Any, run_dir: Any, console: Console) -> dict[str, Any]:
    """Write ``<run>/bundle`` (see the module doc); returns what was shipped and why."""
    import yaml

    from medcritical.steps import Step

    from .modelfile import write_modelfile
    from .stage import exported

    ex = exported(run_dir)
    summary_file = run_dir.eval / "summary.json"
    if not summary_file.is_file():
        raise UserError(f"{summary_file}: no evaluation of the exported GGUFs; run the eval stage first")
    ev = read_json(summary_file)
    cfg = recipe.export.ship
    candidates = cfg.candidates or list(recipe.export.quants)
    hashes = _shipped_hashes(run_dir, ex, [q for q in candidates if q in ev["quants"]])
    tf = {q: m.get("tf_answer_agreement") for q, m in ex["report"].get("models", {}).items()}
    quants = {
        q: r | {"size_bytes": ex["ggufs"][q]["size_bytes"], "tf_answer_agreement": tf.get(q)}
        for q, r in ev["quants"].items()
        if q in ex["ggufs"]
    }
    ship, why = choose(quants, candidates, cfg.tolerance)
    lang = ship_language(recipe, run_dir.templates)
    material = {
        "export": Step("export", run_dir.export, {}).manifest()["key"],
        "ggufs": hashes,
        "eval": sha256_json(ev),
        "ship": cfg.model_dump(),
        "candidates": candidates,
        "language": lang,
    }
    step = Step("bundle", run_dir.bundle, material, stale_root=run_dir.stale, label="bundle")
    if step.begin(console) == "complete":
        console.print(f"[green]bundle: up to date[/] ({run_dir.bundle}, {ship})")
        return step.metrics()
    b = run_dir.bundle
    gguf = b / ex["ggufs"][ship]["file"]
    _link_or_copy(run_dir.export / ex["ggufs"][ship]["file"], gguf)
    if sha256_file(gguf) != hashes[ship]:  # the copy is the file chosen
        raise UserError(f"{gguf}: differs from what the export recorded; run the export stage again")
    modelfile = write_modelfile(
        gguf, system=SYSTEM[lang], n_ctx=recipe.eval.n_ctx, num_predict=recipe.eval.max_new_tokens
    )
    atomic_write_text(b / "recipe.yaml", yaml.safe_dump(recipe.dump(), sort_keys=False, allow_unicode=True))
    rounds = read_json(run_dir.rounds_json) if run_dir.rounds_json.is_file() else None
    info = {
        "name": recipe.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shipped": ship,
        "why": why,
        "system_prompt": SYSTEM[lang],
        "language": lang,
        "round": ex["round"],
        "adapter_sha256": ex["adapter_sha256"],
        "ggufs": {
            gguf.name: {
                "quant": ship,
                "sha256": ex["ggufs"][ship]["sha256"],
                "check": _check_question(run_dir.quant_eval(ship) / "predictions.jsonl", recipe.eval.max_new_tokens),
            }
        },
        "n_ctx": recipe.eval.n_ctx,
    }
    atomic_write_json(b / "bundle.json", info)
    atomic_write_text(b / "MODEL_CARD.md", model_card(recipe, run_dir, info, ex, ev, rounds, quants))
    files = [gguf.name, modelfile.name, "MODEL_CARD.md", "recipe.yaml", "bundle.json"]
    sums = {f: (ex["ggufs"][ship]["sha256"] if f == gguf.name else sha256_file(b / f)) for f in files}
    atomic_write_text(b / "SHA256SUMS", "".join(f"{h}  {f}\n" for f, h in sums.items()))
    for stale in b.iterdir():  # a GGUF of another quant shipped by an earlier run of this step
        if stale.suffix == ".gguf" and stale.name != gguf.name:
            stale.unlink()
    metrics = {"shipped": ship, "file": gguf.name, "why": why, "round": ex["round"], "language": lang}
    step.done(metrics, outputs={f: {"size": (b / f).stat().st_size, "sha256": h} for f, h in sums.items()})
    console.print(f"[green]bundle:[/] {b} ships {gguf.name} (round {ex['round']}): {why}", soft_wrap=True)
    return metrics


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def model_card(
    recipe: Any,
    run_dir: Any,
    info: dict[str, Any],
    ex: dict[str, Any],
    ev: dict[str, Any],
    rounds: dict[str, Any] | None,
    quants: dict[str, dict[str, Any]],
) -> str:
    from medcritical.steps import Step

    from .stage import KNOWN_LICENSES

    teach = Step("teach", run_dir.teach, {}).manifest() or {}
    tm = teach.get("metrics", {})
    licence = KNOWN_LICENSES.get(recipe.model.name_or_path, "that of the base model (see its model card)")
    base_name = (
        "SmolLM2-135M-Instruct (embedded default)"
        if recipe.model.name_or_path == "default"
        else recipe.model.name_or_path
    )
    report = ex["report"]
    n_eval = ev["base"]["n"]
    lines = [
        f"# {recipe.name}: model card",
        "",
        f"> {NOTICE}",
        "",
        "## What this is",
        "",
        f"- File: `{next(iter(info['ggufs']))}` ({info['shipped']}), for llama.cpp / Ollama / `medcritical serve`.",
        f"- Base model: {base_name}. Licence: {licence}.",
        f"- Method: MedCritical (teacher templates + QLoRA SFT, then {recipe.rounds.num_rounds} self-correction "
        f"DPO round(s)); shipped policy: **round {info['round']}** (0 = the SFT model), adapter sha256 "
        f"`{info['adapter_sha256'][:16]}...`.",
        f"- System prompt ({info['language']}), used in training, evaluation, the Modelfile, `medcritical chat` "
        f'and `medcritical serve`: "{info["system_prompt"]}"',
        "- Intended use: research and education on medical exam questions, offline. Not for clinical decisions.",
        "",
        "## Data and teacher",
        "",
        f"- Sources: {', '.join(f'`{s.path}`' + (f' ({s.lang})' if s.lang != 'any' else '') for s in recipe.data.sources)}; "
        f"split by id hash (dev {recipe.data.dev:g}, test {recipe.data.test:g}, seed {recipe.data.split_seed}).",
        f"- Training questions: {tm.get('questions', '-')}, hash `{(teach.get('material') or {}).get('questions', '-')}`;"
        f" templates kept: {tm.get('kept', '-')} (wrong answer {tm.get('wrong_answer', '-')}, unparseable "
        f"{tm.get('unparseable', '-')}, truncated {tm.get('truncated', '-')}, leaked {tm.get('leaked', '-')}).",
        f"- Teacher: `{recipe.teach.backend}`"
        + (f" `{recipe.teach.model}`" if recipe.teach.model else "")
        + f", chain of thought {recipe.teach.reasoning}, key shown to the teacher: {recipe.teach.hinted}.",
        "- Recipe: `recipe.yaml` in this bundle (sha256 of the resolved recipe in the GGUF's "
        "`medcritical.recipe_sha256`).",
        "",
        "## Accuracy",
        "",
        f"Protocol: greedy decoding, at most {recipe.eval.max_new_tokens} new tokens, exact match of the answer set "
        f"read from the reply (multi-answer questions all-or-nothing), on the {n_eval} questions of the "
        f"`{recipe.eval.split}` split; parse rate = replies with a readable answer.",
        "",
        "| model | accuracy | parse rate | size MiB |",
        "|---|---:|---:|---:|",
        f"| base (untrained) | {_pct(ev['base']['accuracy'])} | {_pct(ev['base']['parse_rate'])} | - |",
    ]
    if rounds:
        for row in rounds["rounds"]:
            mark = " (shipped policy)" if row["round"] == rounds["selected"] else ""
            name = "SFT" if row["round"] == 0 else f"round {row['round']}"
            lines.append(f"| {name}{mark} | {_pct(row.get('dev_accuracy'))} | {_pct(row.get('dev_parse_rate'))} | - |")
    for q, r in quants.items():
        mark = " **shipped**" if q == info["shipped"] else ""
        lines.append(f"| {q}{mark} | {_pct(r['accuracy'])} | {_pct(r['parse_rate'])} | {r['size_bytes'] / 2**20:.0f} |")
    lines += [
        "",
        f"Rounds and SFT were evaluated on their own engine ({ev['base'].get('engine', '-')}: a q8_0 GGUF of the policy "
        "on CPU); the quant rows are the exported files themselves.",
        "",
        "## Agreement with the merged 16-bit model",
        "",
        f"On the first {report['questions']} dev questions. Teacher-forced: both read the merged model's own reply up "
        "to its answer and pick the most likely option letter. Free-running: each answers greedily; agreement counts "
        "only questions both answered.",
        "",
        "| GGUF | rel. logit error | TF answer agreement | free-running agreement (both answered) | accuracy here | merged accuracy here |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for q, s in report["models"].items():
        r = quants.get(q, {})
        both = f"{_pct(r.get('answer_agreement'))} ({r.get('answered_both', '-')})" if r else "-"
        rel = "-" if s["rel_error_max"] is None else f"{s['rel_error_max']:.2e}"
        lines.append(
            f"| {q} | {rel} | {_pct(s['tf_answer_agreement'])} | {both} | {_pct(r.get('compared_accuracy'))} "
            f"| {_pct(r.get('merged_accuracy'))} |"
        )
    lines += [
        "",
        "## Why this file",
        "",
        f"{info['shipped']}: {info['why']}.",
        "",
        "## Checking the bundle",
        "",
        "`medcritical verify .` checks `SHA256SUMS` and that the GGUF loads and gives the recorded answer to a "
        "recorded dev question (`bundle.json`).",
        "",
    ]
    return "\n".join(lines)


def verify(bundle: Path, console: Console) -> int:
    """Check a bundle: every checksum, and each GGUF's recorded answer. Returns an exit status."""
    from medcritical.engines import LlamaCppEngine
    from medcritical.grading import extract_answer

    bundle = Path(bundle)
    sums_file = bundle / "SHA256SUMS"
    if not sums_file.is_file():
        raise UserError(f"{bundle}: no SHA256SUMS; not a medcritical bundle")
    bad = []
    for line in sums_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        want, name = line.split(None, 1)
        name = name.strip().lstrip("*")
        p = bundle / name
        if not p.is_file():
            bad.append(f"{name}: missing")
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != want:
            bad.append(f"{name}: checksum mismatch")
    if bad:
        for b in bad:
            console.print(f"[red]FAIL[/] {b}")
        raise UserError(f"{bundle}: {len(bad)} file(s) fail their checksum ({bad[0]})")
    console.print(f"[green]ok[/] checksums ({sums_file})")
    info = read_json(bundle / "bundle.json")
    for name, g in info["ggufs"].items():
        c = g["check"]
        engine = LlamaCppEngine(bundle / name, n_ctx=info.get("n_ctx", 4096), seed=0)
        try:
            out = engine.complete(c["prompt"], max_new_tokens=c["max_tokens"])[0]
        finally:
            engine.close()
        got = extract_answer(out, c["letters"])
        got = sorted(got) if got is not None else None
        same_text = out == c["expected_output"]
        if got != c["expected_answer"]:
            raise UserError(
                f"{bundle / name}: answered {got} to dev question {c['id']} where the evaluation recorded "
                f"{c['expected_answer']}"
            )
        console.print(
            f"[green]ok[/] {name} answers dev question {c['id']} with {got} as recorded"
            + ("" if same_text else " (same answer, text differs: another CPU/build can break near-ties)")
        )
    return 0
