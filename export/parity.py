"""The parity gate: does each GGUF behave like the merged transformers model?

On N dev questions (the student's real prompt, :func:`question_messages`),
each side renders the prompt with its own chat template (transformers: the
tokenizer's; llama.cpp: the one in the GGUF) and tokenizes it. The merged
model then answers greedily (its *reply*). For each GGUF the report has

* ``render_identical`` / ``tokens_identical``: both sides produced the same
  prompt text and the same token ids (llama.cpp's tokenizer vs transformers');
* ``rel_error_max`` / ``rel_error_mean``: the relative error of the next-token
  logits at the end of the prompt, ``max |gguf - hf| / max |hf|`` (max-abs
  error over the vocabulary, relative to the reference's largest logit; it
  does not shrink with vocabulary size the way a norm ratio does);
* ``top1_agreement``: the same most likely next token at the end of the prompt;
* teacher-forced, on the merged model's reply (what quantization does to each
  decision, without the drift of two diverging generations):
  ``tf_answer_agreement``: both sides read the prompt plus the reply up to its
  *decision point* (:func:`decision_prefix`: where the reply writes the answer
  :func:`extract_answer` reads, else its last answer cue, else the language's
  cue appended; at a stated answer the context is the reply's own tokens up
  to the one that spells the letter) and pick the most likely option letter,
  as :meth:`medcritical.engines.Engine.letter_logprobs` scores them; the fraction
  of questions where the GGUF picks the merged model's letter (``tf_scored``
  questions could be scored, ``tf_in_reply`` had their decision point in the
  reply; ``tf_flip_margin_max``: the largest margin, in nats, by which the
  merged model preferred its letter on a question the GGUF answered
  differently: small means every flip was a near tie);
  ``tf_top1_agreement``: per question, the fraction of the reply's positions
  (prompt end included) where the GGUF's most likely next token is the merged
  model's, averaged (``tf_top1_min``: the worst question);
* free-running (``free_run=True``): ``answer_agreement``: among the questions
  where greedy generation (``max_new_tokens``: the recipe's evaluation length,
  so answers happen where they do in evaluation) gave an answer on *both*
  sides (``answered_both``), the share where the answers are the same; two
  unparsable replies are not agreement, and the parse rates
  (``parse_rate_gguf``, ``parse_rate_hf``) are reported apart; and
  ``greedy_identical``: the same generated tokens. One flipped near-tie early
  in a reply changes everything after it, so on small models it is lower than
  the teacher-forced number. The pipeline's export runs without it: its
  ``eval`` stage evaluates each quant on the dev split with the same settings
  and compares those answers with the merged model's (:data:`Reference`
  answers are in the report's ``reference``).

The llama.cpp side is always fed the transformers token ids, so a tokenizer
difference and a weight difference show up separately. The gate: the 16-bit
GGUF must render and tokenize every prompt identically and stay within
``f16_max_rel_error``; quantized GGUFs are reported, not gated. The report
also states an answer criterion, q8_0's ``tf_answer_agreement`` >=
:data:`ANSWER_AGREEMENT_MIN` (met or not; it does not fail the export). The
report is written before the gate raises, so a failed export still explains
itself.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcritical.artifacts import atomic_write_json, atomic_write_text
from medcritical.data import MCQ
from medcritical.errors import UserError
from medcritical.grading import extract_answer
from medcritical.prompts import HEADINGS, choose_lang, question_messages

REL_ERROR = "max |gguf - hf| / max |hf| over the next-token logits at the end of the prompt"
# Bumped whenever the report's fields change, so a cached report of another version is recomputed.
REPORT_VERSION = 3
# The quantized GGUF whose teacher-forced answer agreement is held to ANSWER_AGREEMENT_MIN.
CRITERION_MODEL = "q8_0"
CRITERION_METRIC = "tf_answer_agreement"
ANSWER_AGREEMENT_MIN = 0.98
# The last answer cue in a reply: "Answer:", "**Answer:**", "答案：" (the colon may be ASCII or full-width).
_CUE = re.compile(r"(?:(?i:\banswer)|答案)[ \t*]*[:：][ \t*]*")
# An option letter standing alone (not the start of a word), ASCII or full-width.
_LETTER = re.compile(r"(?<![A-Za-zＡ-Ｚａ-ｚ])[A-ZＡ-Ｚ](?![a-zａ-ｚ])")


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
    # Teacher-forced: the most likely next token after ids + generated[:i], i = 0..len(generated).
    top1: list[int] = field(default_factory=list)
    decided_at: str = ""  # where the decision point is: "answer", "cue" or "appended" (see decision_prefix)
    # Contexts (prompt ids + reply up to the decision point) and, per option letter, (context index, token id).
    # Empty when an option letter is not a single token there.
    contexts: list[list[int]] = field(default_factory=list)
    letter_slots: dict[str, tuple[int, int]] = field(default_factory=dict)
    letter_logprobs: dict[str, float] = field(default_factory=dict)


def _answer(text: str, letters: Sequence[str]) -> list[str] | None:
    found = extract_answer(text, letters)
    return sorted(found) if found is not None else None


def greedy_generate(
    model: Any,
    ids: Any,
    max_new_tokens: int,
    *,
    pad_token_id: int | None,
    eos_token_id: int | list[int] | None = None,
    min_new_tokens: int | None = None,
    streamer: Any = None,
) -> Any:
    """``model.generate`` greedily on one prompt (``ids``: 1 x n), sampling settings cleared.

    ``eos_token_id`` None keeps the generation config's; ``min_new_tokens``
    (the benchmark sets it to ``max_new_tokens``) keeps end of sequence from
    stopping it early. Returns the prompt and the new tokens, as ``generate``.
    """
    import torch

    extra = {"eos_token_id": eos_token_id, "min_new_tokens": min_new_tokens, "streamer": streamer}
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            **{k: v for k, v in extra.items() if v is not None},
        )


def reference_placement(merged_dir: str | Path) -> tuple[str, str]:
    """(device, dtype) of the reference the GGUFs are held to.

    A CUDA GPU with room for the merged model: there, in the dtype it was saved
    in. Else the CPU: float32 up to 2B parameters (exact logits, a few GB), the
    saved 16-bit dtype above (a 7B in float32 would take 30 GB of RAM).
    """
    from medcritical.gguf.merge import compute_dtype
    from medcritical.models import cuda_available

    stored = compute_dtype(str(merged_dir))
    size = sum(p.stat().st_size for p in Path(merged_dir).glob("*.safetensors"))
    if cuda_available():
        import torch

        if torch.cuda.mem_get_info()[0] > 1.2 * size:
            return "cuda", stored
    params = size / (4 if stored == "float32" else 2)
    return "cpu", "float32" if params <= 2e9 else stored


def load_merged(merged_dir: str | Path, placement: tuple[str, str] | None = None) -> tuple[Any, Any]:
    """The merged model (eval mode, placed by :func:`reference_placement` unless given) and its tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from medcritical.models import load_causal_lm

    device, dtype = placement or reference_placement(merged_dir)
    tok = AutoTokenizer.from_pretrained(merged_dir)
    model = load_causal_lm(merged_dir, getattr(torch, dtype), on_gpu=device == "cuda", what="merged model")
    return model.eval(), tok


def decision_prefix(reply: str, letters: Sequence[str], lang: str) -> tuple[str, str]:
    """The reply up to the point where it decides its answer, and which point that is.

    * ``answer``: the reply states an answer (:func:`extract_answer` reads one):
      the text before the first letter of that statement. The statement is
      found by trying each occurrence of an answer letter, earliest first: the
      first one whose replacement by a letter that is not an option changes
      what :func:`extract_answer` reads (so the letters it decided on, not an
      option echoed earlier or discussed later; for "A, C" the "A");
    * ``cue``: no answer, but an answer cue (``Answer:``, ``**Answer:**``,
      ``答案：``): the reply up to and including the last one;
    * ``appended``: neither (the reply was cut off, or never concluded): the
      whole reply with the language's cue appended on a new line.
    """
    found = extract_answer(reply, letters)
    if found:
        other = next(c for c in "ZYXWVUTSRQ" if c not in found and c not in letters)
        for m in _LETTER.finditer(reply):
            if unicodedata.normalize("NFKC", m.group()) in found:
                if extract_answer(reply[: m.start()] + other + reply[m.end() :], letters) != found:
                    return reply[: m.start()], "answer"
    cues = list(_CUE.finditer(reply))
    if cues:
        return reply[: cues[-1].end()], "cue"
    return (reply.rstrip() + "\n" if reply.strip() else "") + HEADINGS[lang][2], "appended"


def _log_softmax_at(logits: Any, tokens: Sequence[int]) -> list[float]:
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    m = float(x.max())
    lse = m + math.log(float(np.exp(x - m).sum()))
    return [float(x[t]) - lse for t in tokens]


def _pick(scores: dict[str, float]) -> str | None:
    return max(scores, key=lambda k: scores[k]) if scores else None


def _margin(scores: dict[str, float]) -> float | None:
    top = sorted(scores.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else None


def _letter_scores(logits_per_context: Sequence[Any], slots: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Log-probability of each option letter's token after its context."""
    by_ctx: dict[int, list[str]] = {}
    for letter, (c, _) in slots.items():
        by_ctx.setdefault(c, []).append(letter)
    out: dict[str, float] = {}
    for c, letters in by_ctx.items():
        for letter, lp in zip(letters, _log_softmax_at(logits_per_context[c], [slots[x][1] for x in letters])):
            out[letter] = lp
    return out


Slots = tuple[list[list[int]], dict[str, tuple[int, int]]]


def _text_slots(tok: Any, prompt_ids: list[int], prefix: str, letters: Sequence[str]) -> Slots:
    """Contexts (``prompt_ids`` + ``prefix`` tokenized) and (context index, token) per option letter after ``prefix``.

    As eval's loglik mode scores letters (``medcritical.engines._letter_token``:
    a trailing space moves into the letter's token where the vocabulary spells
    " B"). Empty when a letter is not one token there: the question is not scored.
    """
    from medcritical.engines import _letter_token

    def tokenize(s: str) -> list[int]:
        return tok(s, add_special_tokens=False).input_ids

    try:
        pairs = [_letter_token(tokenize, prefix, x) for x in letters]
    except UserError:
        return [], {}
    texts = list(dict.fromkeys(c for c, _ in pairs))
    contexts = [prompt_ids + tokenize(c) for c in texts]
    return contexts, {x: (texts.index(c), t) for x, (c, t) in zip(letters, pairs)}


def _reply_slots(tok: Any, prompt_ids: list[int], gen: list[int], reply: str, at: int, letters: Sequence[str]) -> Slots:
    """The reply's own tokens up to the one that spells the answer letter at ``reply[at]``, and per option
    letter that token with the letter swapped (" C" -> " A", " B", ...).

    Teacher forcing on the exact trajectory, so no retokenization can shift the
    context; empty when it does not line up (the token spells more than the
    letter, as "AC" may; a letter variant is not a single token; the decoded
    prefixes do not match the reply), and the caller falls back to
    :func:`_text_slots`.
    """
    done, k = "", 0
    for k in range(len(gen)):
        upto = tok.decode(gen[: k + 1], skip_special_tokens=False)
        if len(upto) > at:
            break
        done = upto
    else:
        return [], {}
    piece, off = tok.decode([gen[k]], skip_special_tokens=False), at - len(done)
    if not reply.startswith(done) or not 0 <= off < len(piece) or piece[off] != reply[at]:
        return [], {}
    if any(c.isalnum() for c in piece[:off] + piece[off + 1 :]):  # "AC" in one token: not one letter's decision
        return [], {}
    wide = reply[at] != unicodedata.normalize("NFKC", reply[at])  # full-width letters stay full-width
    slots = {}
    for x in letters:
        spelled = piece[:off] + (chr(ord(x) + 0xFEE0) if wide else x) + piece[off + 1 :]
        ids = tok(spelled, add_special_tokens=False).input_ids
        if len(ids) != 1:
            return [], {}
        slots[x] = (0, ids[0])
    if gen[k] not in {t for _, t in slots.values()}:
        return [], {}
    return [prompt_ids + gen[:k]], slots


def hf_references(
    merged_dir: str | Path,
    records: Sequence[MCQ],
    *,
    language: str = "auto",
    max_new_tokens: int = 64,
    placement: tuple[str, str] | None = None,
) -> tuple[list[Reference], set[int]]:
    """Prompt, token ids, logits, greedy reply and answer of the merged model, per question.

    Besides the free-running answer, each reference holds the teacher-forced
    side: the most likely next token at every position of its own reply
    (one forward pass over prompt + reply) and the option letters'
    log-probabilities at the reply's decision point (:func:`decision_prefix`).
    Returns the references and the stop ids used (the tokenizer's and the
    generation config's end-of-sequence ids); the GGUF side stops on the same.
    """
    import torch

    model, tok = load_merged(merged_dir, placement)
    eos = model.generation_config.eos_token_id
    stop = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
    if tok.eos_token_id is not None:
        stop.add(int(tok.eos_token_id))
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(stop)
    refs = []
    for r in records:
        lang = choose_lang(r.question, language)
        msgs = question_messages(r.question, r.options, r.multi, lang)
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        out = greedy_generate(model, ids, max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stop))
        gen = [t for t in out[0, ids.shape[1] :].tolist() if t not in stop]
        letters = list(r.options)
        answer = _answer(tok.decode(gen, skip_special_tokens=True), letters)
        prompt = ids[0].tolist()
        with torch.inference_mode():
            full = torch.tensor([prompt + gen], device=model.device)
            rows = model(input_ids=full, logits_to_keep=len(gen) + 1).logits[0].float().cpu()
            reply = tok.decode(gen, skip_special_tokens=False)
            prefix, decided_at = decision_prefix(reply, letters, lang)
            contexts, slots = [], {}
            if decided_at == "answer":
                contexts, slots = _reply_slots(tok, prompt, gen, reply, len(prefix), letters)
            if not slots:
                contexts, slots = _text_slots(tok, prompt, prefix, letters)
            decision_logits = [
                model(input_ids=torch.tensor([c], device=model.device), logits_to_keep=1).logits[0, -1].float().cpu()
                for c in contexts
            ]
        ref = Reference(r.id, msgs, letters, text, prompt, rows[0].numpy(), gen, answer)
        ref.top1 = rows.argmax(-1).tolist()
        ref.decided_at, ref.contexts, ref.letter_slots = decided_at, contexts, slots
        ref.letter_logprobs = _letter_scores([x.numpy() for x in decision_logits], slots)
        refs.append(ref)
    return refs, stop


def _eval_logits(llm: Any, ids: list[int], first: int) -> tuple[Any, list[int]]:
    """Run ``ids`` through llama.cpp in one pass: the logits after position ``first`` and the
    most likely next token after every position from ``first`` on.

    Logits are requested only for those positions (llama-cpp-python's
    ``Llama.eval`` keeps either the last row or, with ``logits_all``, an
    n_ctx x vocabulary array), so the batch is filled here, with its
    internals (pinned llama-cpp-python 0.3.36). The KV cache is cleared first
    and ``n_tokens`` left at 0, so the next ``eval``/``generate`` starts clean.
    """
    import llama_cpp
    import numpy as np

    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    n_vocab = llm.n_vocab()
    head, top1 = None, []
    for start in range(0, len(ids), llm.n_batch):
        chunk = ids[start : start + llm.n_batch]
        llm._batch.set_batch(batch=chunk, n_past=start, logits_all=False)  # logits for the chunk's last token
        wanted = [i for i in range(len(chunk)) if start + i >= first]
        for i in wanted:
            llm._batch.batch.logits[i] = True
        llm._ctx.decode(llm._batch)
        for i in wanted:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(n_vocab,))
            if head is None:
                head = row.copy()
            top1.append(int(row.argmax()))
    llm.reset()
    return head, top1


def compare_gguf(
    gguf: str | Path,
    refs: Sequence[Reference],
    stop: set[int],
    *,
    max_new_tokens: int = 64,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    free_run: bool = True,
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
        logits, top1 = _eval_logits(llm, ref.ids + ref.generated, len(ref.ids) - 1)
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
        # Teacher-forced: the merged model's reply, position by position, and its answer at the decision point.
        scores = _letter_scores([_eval_logits(llm, c, len(c) - 1)[0] for c in ref.contexts], ref.letter_slots)
        tf_hf, tf_gguf = _pick(ref.letter_logprobs), _pick(scores)
        margin = _margin(ref.letter_logprobs)
        row |= {
            "tf_decided_at": ref.decided_at,
            "tf_answer_hf": tf_hf,
            "tf_answer_gguf": tf_gguf,
            "tf_answer_same": tf_hf is not None and tf_hf == tf_gguf,
            "tf_margin_hf": None if margin is None else round(margin, 4),
            "tf_positions": len(ref.top1),
            "tf_top1": sum(a == b for a, b in zip(top1, ref.top1)) / len(ref.top1),
        }
        row["answer_hf"] = ref.answer
        if free_run:  # each side generates its own reply
            gen: list[int] = []
            for t in llm.generate(ref.ids, temp=0.0, repeat_penalty=1.0, reset=True):
                if t in stop or len(gen) >= max_new_tokens:
                    break
                gen.append(int(t))
            answer = _answer(llm.detokenize(gen).decode("utf-8", "replace"), ref.letters)
            row |= {
                "answer_gguf": answer,
                "answer_same": answer is not None and answer == ref.answer,
                "greedy_same": gen == ref.generated,
            }
        rows.append(row)
    llm.close()  # free the model before the next GGUF is loaded
    return summarize(gguf, rows), rows


def summarize(gguf: str | Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One GGUF's summary from its per-question rows (the keys are described in the module doc)."""
    n = len(rows)
    errors = [r["rel_error"] for r in rows]
    comparable = bool(errors) and None not in errors
    scored = [r for r in rows if r["tf_answer_hf"] is not None]
    flips = [r["tf_margin_hf"] for r in scored if not r["tf_answer_same"] and r["tf_margin_hf"] is not None]
    tf_top1 = [r["tf_top1"] for r in rows]

    def share(key: str, among: Sequence[dict[str, Any]] = rows) -> float | None:
        return sum(r[key] for r in among) / len(among) if among and key in among[0] else None

    free = bool(rows) and "answer_gguf" in rows[0]
    both = [r for r in rows if free and r["answer_hf"] is not None and r["answer_gguf"] is not None]

    return {
        "file": Path(gguf).name,
        "size_bytes": Path(gguf).stat().st_size,
        "n": n,
        "render_identical": sum(r["render_same"] for r in rows),
        "tokens_identical": sum(r["tokens_same"] for r in rows),
        "rel_error_max": max(errors) if comparable else None,
        "rel_error_mean": sum(errors) / n if comparable else None,
        "top1_agreement": share("top1_same"),
        "tf_answer_agreement": share("tf_answer_same", scored),
        "tf_scored": len(scored),
        "tf_flip_margin_max": max(flips) if flips else None,
        "tf_in_reply": sum(r["tf_decided_at"] != "appended" for r in rows),
        "tf_top1_agreement": share("tf_top1"),
        "tf_top1_min": min(tf_top1) if tf_top1 else None,
        "answer_agreement": share("answer_same", both) if free else None,
        "answered_both": len(both) if free else None,
        "parse_rate_hf": sum(r["answer_hf"] is not None for r in rows) / n if n else None,
        "parse_rate_gguf": sum(r["answer_gguf"] is not None for r in rows) / n if free and n else None,
        "greedy_identical": share("greedy_same") if free else None,
    }


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


def criterion(models: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The answer criterion on the q8_0 GGUF (None when none was made). Reported, not gated."""
    s = models.get(CRITERION_MODEL)
    if s is None:
        return None
    value = s[CRITERION_METRIC]
    return {
        "model": CRITERION_MODEL,
        "metric": CRITERION_METRIC,
        "min": ANSWER_AGREEMENT_MIN,
        "value": value,
        "scored": s["tf_scored"],
        "met": value is not None and value >= ANSWER_AGREEMENT_MIN,
    }


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    """A short Markdown table of the report (``report.md``)."""
    gate = report["gate"]
    lines = [
        f"# Export parity: {'PASSED' if gate['passed'] else 'FAILED'}",
        "",
        f"{report['questions']} dev questions; the merged model's greedy reply: {report['max_new_tokens']} "
        f"new tokens at most. rel. error = {REL_ERROR}; gate: {gate['checked']} <= {gate['threshold']:g}.",
        "",
        "Teacher-forced (TF): both sides read the merged model's own reply up to where it states its answer (else "
        "its last answer cue, else the cue appended) and pick the most likely option letter (answer), or the next "
        "token at every position of the reply (top-1, mean over questions). Free-running: each side generates its "
        "own reply and the parsed answers are compared.",
        "",
        "| GGUF | size MiB | render same | tokens same | rel. error max | rel. error mean | top-1 agree "
        "| TF answer agree | TF top-1 along reply | free-run answer agree | both answered | greedy identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["models"].values():
        n = s["n"]
        lines.append(
            f"| {s['file']} | {s['size_bytes'] / 2**20:.1f} | {s['render_identical']}/{n} | {s['tokens_identical']}/{n} "
            f"| {_fmt(s['rel_error_max'], '.2e')} | {_fmt(s['rel_error_mean'], '.2e')} "
            f"| {_fmt(s['top1_agreement'], '.0%')} | {_fmt(s['tf_answer_agreement'], '.0%')} ({s['tf_scored']}) "
            f"| {_fmt(s['tf_top1_agreement'], '.1%')} | {_fmt(s['answer_agreement'], '.0%')} "
            f"| {'-' if s['answered_both'] is None else str(s['answered_both']) + '/' + str(n)} "
            f"| {_fmt(s['greedy_identical'], '.0%')} |"
        )
    first = next(iter(report["models"].values()), None)
    if first is not None:
        at = [r["tf_decided_at"] for r in next(iter(report["rows"].values()))]
        flips = ", ".join(
            f"{s['file']} {s['tf_flip_margin_max']:.3f}" for s in report["models"].values() if s["tf_flip_margin_max"]
        )
        lines += [
            "",
            f"TF answer agree (k): k questions scored. Decision point: the reply's stated answer on "
            f"{at.count('answer')}, its answer cue on {at.count('cue')}, the cue appended on {at.count('appended')} "
            f"of {first['n']}. Largest margin (nats) by which the merged model preferred its letter where a GGUF "
            f"picked another: {flips or 'no flips'}.",
        ]
    c = report.get("criterion")
    if c is not None:
        lines += [
            "",
            f"Answer criterion: {c['model']} {c['metric']} = {_fmt(c['value'], '.1%')} "
            f"(on {c['scored']} questions) >= {c['min']:.0%}: {'met' if c['met'] else 'NOT met'} (reported, not gated).",
        ]
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
    free_run: bool = True,
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
    placement = reference_placement(merged_dir)
    refs, stop = hf_references(
        merged_dir, records, language=language, max_new_tokens=max_new_tokens, placement=placement
    )
    # Just the context the longest sequence needs (rounded up): less memory than a default 4096.
    longest = max(max(len(r.ids) + max_new_tokens, len(r.ids) + len(r.generated), *map(len, r.contexts)) for r in refs)
    n_ctx = -(-(longest + 1) // 256) * 256
    models, rows = {}, {}
    for kind, path in ggufs.items():
        models[kind], rows[kind] = compare_gguf(
            path, refs, stop, max_new_tokens=max_new_tokens, n_ctx=n_ctx, n_threads=n_threads, free_run=free_run
        )
    failures = gate_failures(models[gated], threshold)
    report = {
        "version": REPORT_VERSION,
        "gate": {"passed": not failures, "checked": gated, "threshold": threshold, "failures": failures},
        "criterion": criterion(models),
        "questions": len(refs),
        "max_new_tokens": max_new_tokens,
        "language": language,
        "rel_error_definition": REL_ERROR,
        "free_run": free_run,
        "reference_on": dict(zip(("device", "dtype"), placement)),
        "models": models,
        **(extra or {}),
        "seconds": round(time.perf_counter() - t0, 2),
        "reference": [{"id": r.id, "answer": r.answer, "gold": list(q.answer)} for r, q in zip(refs, records)],
        "rows": rows,
    }
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown(report))
    if failures:
        raise UserError(f"parity gate failed for {ggufs[gated]}: {'; '.join(failures)} (see {out_dir / 'report.md'})")
    return report
