"""The parity gate: does each GGUF behave like the merged transformers model?

On N dev questions (the student's real prompt, :func:`question_messages`),
each side renders the prompt with its own chat template (transformers: the
tokenizer's; llama.cpp: the one in the GGUF) and tokenizes it; then, for each
GGUF, the report has

* ``render_identical`` / ``tokens_identical``: both sides produced the same
  prompt text and the same token ids (llama.cpp's tokenizer vs transformers');
* ``rel_error_max`` / ``rel_error_mean``: the relative error of the next-token
  logits at the end of the prompt, ``max |gguf - hf| / max |hf|`` (max-abs
  error over the vocabulary, relative to the reference's largest logit; it
  does not shrink with vocabulary size the way a norm ratio does);
* ``top1_agreement``: the same most likely next token;
* ``answer_agreement``: greedy generation (``max_new_tokens``) on both sides
  gives the same :func:`extract_answer` result (both unparsable counts as
  agreeing; ``answered_both`` says how often both gave an answer), and
  ``greedy_identical``: the same generated tokens.

The llama.cpp side is always fed the transformers token ids, so a tokenizer
difference and a weight difference show up separately. The gate: the 16-bit
GGUF must render and tokenize every prompt identically and stay within
``f16_max_rel_error``; quantized GGUFs are reported, not gated. The report is
written before the gate raises, so a failed export still explains itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcritical.artifacts import atomic_write_json, atomic_write_text
from medcritical.data import MCQ
from medcritical.errors import UserError
from medcritical.grading import extract_answer
from medcritical.prompts import choose_lang, question_messages

REL_ERROR = "max |gguf - hf| / max |hf| over the next-token logits at the end of the prompt"


@dataclass
class Reference:
    """The merged transformers model's side of one question."""

    id: str
    messages: list[dict[str, str]]
    letters: list[str]
    text: str
    ids: list[int]
    logits: Any  # numpy float32, the next-token logits after the prompt
    generated: list[int]
    answer: list[str] | None


def _answer(text: str, letters: Sequence[str]) -> list[str] | None:
    found = extract_answer(text, letters)
    return sorted(found) if found is not None else None


def hf_references(
    merged_dir: str | Path, records: Sequence[MCQ], *, language: str = "auto", max_new_tokens: int = 64
) -> tuple[list[Reference], set[int]]:
    """Prompt, token ids, next-token logits and greedy answer of the merged model, per question.

    Returns the references and the stop ids used (the tokenizer's and the
    generation config's end-of-sequence ids); the GGUF side stops on the same.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    stop = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    if tok.eos_token_id is not None:
        stop.add(int(tok.eos_token_id))
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(stop)
    refs = []
    with torch.inference_mode():
        for r in records:
            msgs = question_messages(r.question, r.options, r.multi, choose_lang(r.question, language))
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits[0, -1].float().numpy()
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(stop),
                pad_token_id=pad,
            )
            gen = [t for t in out[0, ids.shape[1] :].tolist() if t not in stop]
            letters = list(r.options)
            answer = _answer(tok.decode(gen, skip_special_tokens=True), letters)
            refs.append(Reference(r.id, msgs, letters, text, ids[0].tolist(), logits, gen, answer))
    return refs, stop


def _last_logits(llm: Any, ids: list[int]) -> Any:
    """llama.cpp's next-token logits after ``ids``.

    Read from the context (``llama_get_logits_ith``): llama-cpp-python keeps
    ``Llama.scores`` only when the model was opened with ``logits_all``.
    """
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(ids)
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def compare_gguf(
    gguf: str | Path,
    refs: Sequence[Reference],
    stop: set[int],
    *,
    max_new_tokens: int = 64,
    n_ctx: int = 4096,
    n_threads: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Compare one GGUF with the references; returns (summary, per-question rows)."""
    import numpy as np

    from medcritical.engines import LlamaCppEngine

    engine = LlamaCppEngine(gguf, n_ctx=n_ctx, n_threads=n_threads)
    llm = engine.llm
    rows = []
    for ref in refs:
        text = engine.render(ref.messages)
        ids = engine.tokenize(text)
        logits = _last_logits(llm, ref.ids)
        row: dict[str, Any] = {
            "id": ref.id,
            "render_same": text == ref.text,
            "tokens_same": ids == ref.ids,
            "n_tokens": len(ref.ids),
        }
        if logits.shape != ref.logits.shape:
            row |= {"rel_error": None, "top1_same": False}  # different vocabulary sizes
        else:
            scale = max(float(np.abs(ref.logits).max()), 1e-30)
            row |= {
                "rel_error": float(np.abs(logits - ref.logits).max() / scale),
                "top1_same": int(logits.argmax()) == int(ref.logits.argmax()),
            }
        gen: list[int] = []
        for t in llm.generate(ref.ids, temp=0.0, repeat_penalty=1.0, reset=True):
            if t in stop or len(gen) >= max_new_tokens:
                break
            gen.append(int(t))
        answer = _answer(llm.detokenize(gen).decode("utf-8", "replace"), ref.letters)
        row |= {
            "answer_hf": ref.answer,
            "answer_gguf": answer,
            "answer_same": answer == ref.answer,
            "greedy_same": gen == ref.generated,
        }
        rows.append(row)
    llm.close()  # free the model before the next GGUF is loaded
    n = len(rows)
    errors = [r["rel_error"] for r in rows]
    comparable = bool(errors) and None not in errors
    summary = {
        "file": Path(gguf).name,
        "size_bytes": Path(gguf).stat().st_size,
        "n": n,
        "render_identical": sum(r["render_same"] for r in rows),
        "tokens_identical": sum(r["tokens_same"] for r in rows),
        "rel_error_max": max(errors) if comparable else None,
        "rel_error_mean": sum(errors) / n if comparable else None,
        "top1_agreement": sum(r["top1_same"] for r in rows) / n if n else None,
        "answer_agreement": sum(r["answer_same"] for r in rows) / n if n else None,
        "answered_both": sum(r["answer_hf"] is not None and r["answer_gguf"] is not None for r in rows),
        "greedy_identical": sum(r["greedy_same"] for r in rows) / n if n else None,
    }
    return summary, rows


def gate_failures(summary: dict[str, Any], threshold: float) -> list[str]:
    """Why the 16-bit GGUF fails the gate (empty: it passes)."""
    n = summary["n"]
    out = []
    if summary["render_identical"] < n:
        out.append(f"chat template renders differently on {n - summary['render_identical']}/{n} prompts")
    if summary["tokens_identical"] < n:
        out.append(f"token ids differ on {n - summary['tokens_identical']}/{n} prompts")
    if summary["rel_error_max"] is None:
        out.append("next-token logits not comparable (the vocabulary sizes differ)")
    elif not summary["rel_error_max"] <= threshold:  # also catches NaN
        out.append(f"relative logit error {summary['rel_error_max']:.3g} > {threshold:g}")
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    """A short Markdown table of the report (``report.md``)."""
    gate = report["gate"]
    lines = [
        f"# Export parity: {'PASSED' if gate['passed'] else 'FAILED'}",
        "",
        f"{report['questions']} dev questions, greedy {report['max_new_tokens']} new tokens; "
        f"rel. error = {REL_ERROR}; gate: {gate['checked']} <= {gate['threshold']:g}.",
        "",
        "| GGUF | size MiB | render same | tokens same | rel. error max | rel. error mean "
        "| top-1 agree | answer agree | both answered | greedy identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["models"].values():
        n = s["n"]
        lines.append(
            f"| {s['file']} | {s['size_bytes'] / 2**20:.1f} | {s['render_identical']}/{n} | {s['tokens_identical']}/{n} "
            f"| {_fmt(s['rel_error_max'], '.2e')} | {_fmt(s['rel_error_mean'], '.2e')} "
            f"| {_fmt(s['top1_agreement'], '.0%')} | {_fmt(s['answer_agreement'], '.0%')} "
            f"| {s['answered_both']}/{n} | {_fmt(s['greedy_identical'], '.0%')} |"
        )
    if gate["failures"]:
        lines += ["", "Gate failures:", *[f"- {f}" for f in gate["failures"]]]
    return "\n".join(lines) + "\n"


def run_parity(
    merged_dir: str | Path,
    ggufs: dict[str, str | Path],
    records: Sequence[MCQ],
    out_dir: str | Path,
    *,
    gated: str = "f16",
    threshold: float = 1e-2,
    language: str = "auto",
    max_new_tokens: int = 64,
    n_threads: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare every GGUF (``{type: path}``) with ``merged_dir``; write report.json/.md; gate ``gated``.

    ``n_threads`` is llama.cpp's (default: all cores); tiny models run faster
    on one, since llama.cpp's threads spin-wait on each other at every op.
    Raises UserError after writing the report when the gated GGUF fails.
    """
    if not records:
        raise UserError("parity: no dev questions to compare on (check data.dev and the data sources)")
    if gated not in ggufs:
        raise UserError(f"parity: no {gated} GGUF to gate")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    refs, stop = hf_references(merged_dir, records, language=language, max_new_tokens=max_new_tokens)
    # Just the context the longest question needs (rounded up): less memory than a default 4096.
    n_ctx = -(-(max(len(r.ids) for r in refs) + max_new_tokens + 1) // 256) * 256
    models, rows = {}, {}
    for kind, path in ggufs.items():
        models[kind], rows[kind] = compare_gguf(
            path, refs, stop, max_new_tokens=max_new_tokens, n_ctx=n_ctx, n_threads=n_threads
        )
    failures = gate_failures(models[gated], threshold)
    report = {
        "gate": {"passed": not failures, "checked": gated, "threshold": threshold, "failures": failures},
        "questions": len(refs),
        "max_new_tokens": max_new_tokens,
        "language": language,
        "rel_error_definition": REL_ERROR,
        "models": models,
        **(extra or {}),
        "seconds": round(time.perf_counter() - t0, 2),
        "rows": rows,
    }
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown(report))
    if failures:
        raise UserError(f"parity gate failed for {ggufs[gated]}: {'; '.join(failures)} (see {out_dir / 'report.md'})")
    return report
