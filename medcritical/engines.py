"""Inference engines behind one interface: transformers and llama.cpp.

Both take chat messages, render them with the model's own chat template (the
GGUF carries the same template as the tokenizer it was converted from) and
return text. Evaluation, rollouts and corrections go through :func:`open_engine`.

This module imports neither torch nor llama_cpp at import time: the llama.cpp
path must work on a machine that has only the inference requirements.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

Messages = list[dict[str, str]]
Progress = Callable[[int], None]

# llama.cpp threads when the caller names none (default: every core). Its threads spin-wait on each other,
# so on a machine other processes keep busy fewer threads are faster; tiny models run best on one.
THREADS_ENV = "MEDCRITICAL_LLAMA_THREADS"


def per_prompt(prefix: str | Sequence[str], n: int) -> list[str]:
    """A generation prefix for each of ``n`` prompts (one string: the same for all)."""
    return [prefix] * n if isinstance(prefix, str) else list(prefix)


def llama_threads() -> int:
    """``$MEDCRITICAL_LLAMA_THREADS``, else the number of cores."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if not env:
        return os.cpu_count() or 1
    if not env.isdigit() or int(env) < 1:
        raise UserError(f"{THREADS_ENV}={env!r}: expected a positive number of threads")
    return int(env)


@dataclass
class Reply:
    """One sampled reply, with what forcing an answer needs (:func:`sample_replies`).

    ``text``: the reply, the generation prefix included. ``cut``: it ended at the token cap (None: the engine
    cannot tell). ``scores``: log-probabilities of the question's option letters right after ``text`` and the
    answer cue, from the same model (None: not asked for, or the engine cannot score).
    """

    text: str
    cut: bool | None = None
    scores: dict[str, float] | None = None


class Engine(Protocol):
    name: str

    def render(self, messages: Messages) -> str: ...

    def generate(
        self,
        prompts: Sequence[Messages],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        on_done: Progress | None = None,
        prefix: str | Sequence[str] = "",
    ) -> list[list[str]]:
        """``n`` completions for each prompt; ``on_done(k)`` after k more prompts finish. ``prefix``: the
        assistant's reply starts with it (each returned text includes it)."""
        ...

    def letter_logprobs(
        self, prompts: Sequence[Messages], prefixes: Sequence[str], letters: Sequence[Sequence[str]]
    ) -> list[dict[str, float]]:
        """Log-probability of each option letter right after ``prompt + prefix``."""
        ...

    def close(self) -> None:
        """Free the model now."""
        ...


def _letter_token(tokenize: Callable[[str], list[int]], context: str, letter: str) -> tuple[str, int]:
    """The context to feed and the single token that spells ``letter`` after it.

    Most BPE vocabularies spell "B" after "Answer: " as one token. Some merge
    the space into the letter (" B"): then the space moves out of the context.
    """
    base = tokenize(context)
    full = tokenize(context + letter)
    if full[: len(base)] == base and len(full) == len(base) + 1:
        return context, full[-1]
    if context.endswith(" "):
        ctx = context[:-1]
        base, full = tokenize(ctx), tokenize(ctx + " " + letter)
        if full[: len(base)] == base and len(full) == len(base) + 1:
            return ctx, full[-1]
    raise UserError(f"loglik mode: option letter {letter!r} is not a single token for this tokenizer")


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """A sampling seed for sample ``sample`` of prompt ``prompt`` in a call seeded ``seed``.

    Hashed, not added: ``seed + prompt + sample`` would hand the same seed to
    neighbouring calls (rollouts seed each chunk with ``seed + rows done``).
    31 bits, so it never equals llama.cpp's "pick a random seed" value 0xFFFFFFFF.
    """
    digest = hashlib.sha256(f"{seed}:{prompt}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class HFEngine:
    """transformers generation, batched with left padding."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tok = tokenizer
        self.tok.padding_side = "left"

    def render(self, messages: Messages) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, texts: list[str]) -> Any:
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in enc.items()}

    def generate(
        self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=0, on_done=None, batch_size: int = 8,
        prefix: str | Sequence[str] = "",
    ):  # fmt: skip
        import torch

        starts = per_prompt(prefix, len(prompts))
        texts = [self.render(m) + pf for m, pf in zip(prompts, starts)]
        # Longest first: similar lengths share a batch, so less padding is computed.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: list[list[str]] = [[] for _ in texts]
        sample = temperature > 0
        # Greedy decoding gives one answer however often it is asked: generate it once.
        copies, n = (n, 1) if not sample else (1, n)
        per = max(1, batch_size // n)
        torch.manual_seed(seed)
        for start in range(0, len(order), per):
            idx = order[start : start + per]
            enc = self._encode([texts[i] for i in idx])
            with torch.inference_mode():
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=top_p if sample else None,
                    top_k=None,
                    num_return_sequences=n,
                    pad_token_id=self.tok.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            decoded = self.tok.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(idx):
                out[i] = [(starts[i] + s.strip()).strip() for s in decoded[j * n : (j + 1) * n]] * copies
            if on_done:
                on_done(len(idx))
        return out

    def close(self) -> None:
        """Drop the model (the caller's reference to the engine may outlive it)."""
        self.model = None
        gc.collect()

    def letter_logprobs(self, prompts, prefixes, letters):
        import torch

        results = []
        tokenize = lambda s: self.tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        for msgs, prefix, lets in zip(prompts, prefixes, letters):
            context = self.render(msgs) + prefix
            pairs = [_letter_token(tokenize, context, x) for x in lets]
            scores: dict[str, float] = {}
            for ctx in dict.fromkeys(c for c, _ in pairs):
                enc = self._encode([ctx])
                with torch.inference_mode():
                    logits = self.model(**enc).logits[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                for x, (c, t) in zip(lets, pairs):
                    if c == ctx:
                        scores[x] = float(logp[t])
            results.append(scores)
        return results


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, on a GGUF file.

    ``generate(..., batch_size=B)`` decodes up to ``B`` sequences together
    (``B // n`` prompts with their ``n`` samples each): every step evaluates one
    token of every live sequence in one ``llama_decode`` call, so the weights are
    read once per step for all of them, which is what makes CPU decoding fast
    (one sequence at a time is bound by memory bandwidth). Each sequence has its
    own KV stream (``n_seq_max = B``, not unified), its own sampler chain and
    seed; a prompt is evaluated once and its KV copied to its other samples; a
    finished sequence leaves the batch. The sequences of a call depend only on
    the call's prompts, settings and seed: callers cut their work in fixed
    chunks, so a resumed step regenerates what an uninterrupted one did.

    Batching changes no text: a sequence's tokens are the same whatever else
    shares its batch (``tests/test_eval.py`` checks it token for token), so
    ``batch_size`` only decides the speed. ``batch_size=1`` takes one prompt at
    a time (its ``n`` samples still together).
    Sampling is temperature + top-p as in transformers (top-k and min-p off);
    llama.cpp applies top-p before the temperature, transformers after it.
    """

    name = "llamacpp"

    def __init__(self, gguf: str | Path, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 0) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from .gguf.file import open_llama

        gguf = Path(gguf)
        self.gguf = gguf
        threads = n_threads or llama_threads()
        # Checks the file first: a missing, truncated or foreign file, or a model llama.cpp cannot run, is a UserError.
        self.llm = open_llama(gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False)
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise UserError(f"{gguf}: no chat template in the GGUF metadata")

        def token_text(key: str) -> str:
            tid = meta.get(key)
            return self.llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid is not None else ""

        self.threads = threads
        self.n_ctx = n_ctx
        self._streams: tuple[int, int, Any] | None = None  # (sequences, tokens each, context) of the batched path
        self.eos = token_text("tokenizer.ggml.eos_token_id")
        self.formatter = Jinja2ChatFormatter(
            template=template, eos_token=self.eos, bos_token=token_text("tokenizer.ggml.bos_token_id")
        )

    def render(self, messages: Messages) -> str:
        return self.formatter(messages=messages).prompt

    def tokenize(self, text: str) -> list[int]:
        # The chat template already holds every special token it needs.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def complete(self, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, n: int = 1) -> list[str]:  # fmt: skip
        """``n`` completions of an already rendered ``prompt`` (greedy: one, repeated).

        Every call starts from an empty KV cache, so a prompt's samples never
        depend on what was generated before it: a resumed step regenerates
        exactly what an uninterrupted one did. Its ``n`` samples share the
        evaluated prompt and are decoded together.
        """
        streams = 1 if temperature <= 0 else n
        done = self._decode_together([self.tokenize(prompt)], [seed], streams, max_new_tokens, temperature, top_p)[0]
        texts = [r.text for r in done]
        return texts if len(texts) == n else texts * n

    def generate(
        self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=0, on_done=None, batch_size: int = 1,
        prefix: str | Sequence[str] = "",
    ):  # fmt: skip
        replies = self.replies(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed,
            on_done=on_done, batch_size=batch_size, prefix=prefix,
        )  # fmt: skip
        return [[r.text for r in row] for row in replies]

    def replies(
        self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=0, on_done=None, batch_size: int = 1,
        prefix: str | Sequence[str] = "", letters: Sequence[Sequence[str]] | None = None,
        cue: Sequence[str] | None = None,
    ) -> list[list[Reply]]:  # fmt: skip
        """As :meth:`generate`, as :class:`Reply` records. With ``letters`` and ``cue`` (per prompt), each
        sequence, where it ends, is fed its cue ("Answer: ") and the letters are scored there: one more decode
        step for the whole batch, not a second pass over each reply."""
        starts = per_prompt(prefix, len(prompts))
        tokens = [self.tokenize(self.render(m) + pf) for m, pf in zip(prompts, starts)]
        seeds = [sample_seed(seed, i, 0) for i in range(len(prompts))]
        streams = 1 if temperature <= 0 else n  # greedy: one sequence per prompt, its answer repeated
        per = max(1, batch_size // streams)
        scoring = None
        if letters is not None and cue is not None:
            scoring = [self._cue_tokens(c, lets) for c, lets in zip(cue, letters)]
        out: list[list[Reply]] = []
        for start in range(0, len(prompts), per):
            group = range(start, min(start + per, len(prompts)))
            done = self._decode_together(
                [tokens[i] for i in group], [seeds[i] for i in group], streams, max_new_tokens, temperature, top_p,
                on_done, [scoring[i] for i in group] if scoring else None,
            )  # fmt: skip
            for i, row in zip(group, done):
                row = [Reply((starts[i] + r.text).strip(), r.cut, r.scores) for r in row]
                out.append(row if len(row) == n else [Reply(r.text, r.cut, r.scores) for r in row * n])
        return out

    def _cue_tokens(self, cue: str, letters: Sequence[str]) -> tuple[list[int], dict[str, int]]:
        """The cue's tokens and each letter's single token after it (:func:`_letter_token`)."""
        pairs = {x: _letter_token(self.tokenize, cue, x) for x in letters}
        contexts = {c for c, _ in pairs.values()}
        if len(contexts) != 1:
            raise UserError(f"{self.gguf}: the option letters tokenize differently after {cue!r}")
        return self.tokenize(contexts.pop()), {x: t for x, (_, t) in pairs.items()}

    def _stream_context(self, sequences: int, per_seq: int) -> Any:
        """A context with ``sequences`` KV streams of at least ``per_seq`` tokens each, kept for later calls."""
        import llama_cpp
        from llama_cpp import _internals

        if self._streams and self._streams[0] >= sequences and self._streams[1] >= per_seq:
            return self._streams[2]
        if self._streams:
            self._streams[2].close()
            self._streams = None
        per_seq = -(-per_seq // 256) * 256
        # The one-stream context's settings (flash attention, KV types, threads...), so both paths compute alike.
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_ctx = sequences * per_seq
        params.n_batch = max(512, sequences)
        params.n_ubatch = max(512, sequences)
        params.n_seq_max = sequences
        params.kv_unified = False
        try:
            ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
        except ValueError as e:
            raise UserError(f"{self.gguf}: llama.cpp could not make a context for {sequences} sequences of "
                            f"{per_seq} tokens (lower the batch size): {e}") from e  # fmt: skip
        self._streams = (sequences, per_seq, ctx)
        return ctx

    def _decode_together(
        self, prompts: list[list[int]], seeds: list[int], streams: int, max_new_tokens: int,
        temperature: float, top_p: float, on_done: Progress | None = None,
        scoring: list[tuple[list[int], dict[str, int]]] | None = None,
    ) -> list[list[Reply]]:  # fmt: skip
        """``streams`` completions of each tokenized prompt, every sequence decoded in one batch; with
        ``scoring`` (per prompt: cue tokens, letter tokens), the letters' log-probabilities after each
        sequence's end and its cue."""
        import llama_cpp
        from llama_cpp import _internals

        cue_room = max((len(c) + 1 for c, _ in scoring), default=0) if scoring else 0
        for p in prompts:
            if len(p) + cue_room >= self.n_ctx:
                raise UserError(f"{self.gguf}: a prompt of {len(p)} tokens does not fit n_ctx {self.n_ctx}")
        seqs = [(i, j) for i in range(len(prompts)) for j in range(streams)]
        per_seq = min(self.n_ctx, max(len(p) for p in prompts) + max_new_tokens + cue_room)
        ctx = self._stream_context(len(seqs), per_seq)
        room = min(self.n_ctx, self._streams[1])
        mem = llama_cpp.llama_get_memory(ctx.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        vocab = self.llm._model.vocab
        samplers = []
        for i, j in seqs:
            smp = _internals.LlamaSampler()
            if temperature <= 0:
                smp.add_greedy()
            else:  # what create_completion builds with top_k=0, min_p=0 (those two are no-ops)
                smp.add_top_p(top_p, 1)
                smp.add_temp(temperature)
                smp.add_dist(sample_seed(seeds[i], 0, j))
            samplers.append(smp)
        limit = [max(1, min(max_new_tokens, room - cue_room - len(prompts[i]))) for i, _ in seqs]
        made: list[list[int]] = [[] for _ in seqs]
        cut = [False] * len(seqs)
        live: list[int] = []  # sequence numbers still generating
        left = [streams] * len(prompts)  # unfinished samples per prompt
        batch = llama_cpp.llama_batch_init(max(512, len(seqs)), 0, 1)

        def take(s: int, idx: int) -> None:
            """Sample sequence ``s``'s next token from batch row ``idx``; retire it when it ends."""
            tok = llama_cpp.llama_sampler_sample(samplers[s].sampler, ctx.ctx, idx)
            if not llama_cpp.llama_vocab_is_eog(vocab, tok):
                made[s].append(tok)
                if len(made[s]) < limit[s]:
                    live.append(s)
                    return
                cut[s] = True  # its last token is sampled but not yet in the KV
            if scoring is None:  # else its KV stays for the cue
                llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)
            i = seqs[s][0]
            left[i] -= 1
            if left[i] == 0 and on_done:
                on_done(1)

        def decode(rows: list[tuple[int, int, int, bool]]) -> None:
            batch.n_tokens = len(rows)
            for r, (tok, pos, seq, want) in enumerate(rows):
                batch.token[r], batch.pos[r], batch.n_seq_id[r], batch.logits[r] = tok, pos, 1, want
                batch.seq_id[r][0] = seq
            rc = llama_cpp.llama_decode(ctx.ctx, batch)
            if rc != 0:
                raise UserError(f"{self.gguf}: llama_decode failed ({rc}) on {len(seqs)} sequences")

        try:
            # What every prompt starts with (the system prompt and instructions: often half of each prompt) is
            # evaluated once, on the first sequence, and its KV copied to each prompt's first sequence.
            shared = _common_prefix(prompts) if len(prompts) > 1 else 0
            if shared >= 16:
                for start in range(0, shared, 512):
                    decode([(prompts[0][k], k, 0, False) for k in range(start, min(start + 512, shared))])
                for i in range(1, len(prompts)):
                    llama_cpp.llama_memory_seq_cp(mem, 0, i * streams, -1, -1)
            else:
                shared = 0
            # Prompts: the rest of each evaluated once, on its first sample's sequence, in batches of up to 512
            # tokens.
            rows: list[tuple[int, int, int, bool]] = []
            ends: list[tuple[int, int]] = []  # (prompt, batch row of its last token)
            for i, p in enumerate(prompts):
                for pos in range(shared, len(p)):
                    tok = p[pos]
                    last = pos == len(p) - 1
                    if last:
                        ends.append((i, len(rows)))
                    rows.append((tok, pos, i * streams, last))
                    if len(rows) == 512 or (last and i == len(prompts) - 1):
                        decode(rows)
                        for k, idx in ends:
                            for j in range(1, streams):
                                llama_cpp.llama_memory_seq_cp(mem, k * streams, k * streams + j, -1, -1)
                            for j in range(streams):
                                take(k * streams + j, idx)
                        rows, ends = [], []
            # Then one token of every live sequence per step.
            while live:
                now = sorted(live)
                live.clear()
                decode([(made[s][-1], len(prompts[seqs[s][0]]) + len(made[s]) - 1, s, True) for s in now])
                for r, s in enumerate(now):
                    take(s, r)
            scores = self._score_cues(decode, ctx, prompts, seqs, made, cut, scoring) if scoring else None
        finally:
            llama_cpp.llama_batch_free(batch)
            for smp in samplers:
                smp.close()
        replies = [
            Reply(
                self.llm.detokenize(made[s], prev_tokens=prompts[i]).decode("utf-8", errors="ignore").strip(),
                cut[s],
                scores[s] if scores else None,
            )  # fmt: skip
            for s, (i, _) in enumerate(seqs)
        ]
        return [replies[i * streams : (i + 1) * streams] for i in range(len(prompts))]

    def _score_cues(self, decode, ctx, prompts, seqs, made, cut, scoring) -> list[dict[str, float]]:  # noqa: ANN001
        """Feed every finished sequence its cue (after its last sampled token, when the cap cut it) and read the
        letters' log-probabilities at the cue's last token, in batches of up to 512 rows."""
        import llama_cpp
        import numpy as np

        rows: list[tuple[int, int, int, bool]] = []
        ends: list[tuple[int, int]] = []  # (sequence, batch row of its cue's last token)
        scores: list[dict[str, float]] = [{} for _ in seqs]

        def flush() -> None:
            decode(rows)
            for s, idx in ends:
                ptr = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
                logits = np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float64)
                lse = float(logits.max() + np.log(np.exp(logits - logits.max()).sum()))
                scores[s] = {x: float(logits[t]) - lse for x, t in scoring[seqs[s][0]][1].items()}
            rows.clear()
            ends.clear()

        for s, (i, _) in enumerate(seqs):
            feed = ([made[s][-1]] if cut[s] else []) + scoring[i][0]
            pos = len(prompts[i]) + len(made[s]) - len(feed) + len(scoring[i][0])
            if len(rows) + len(feed) > 512:
                flush()
            for k, tok in enumerate(feed):
                last = k == len(feed) - 1
                if last:
                    ends.append((s, len(rows)))
                rows.append((tok, pos + k, s, last))
        if rows:
            flush()
        return scores

    def close(self) -> None:
        """Free the model and its contexts now (not whenever the engine is collected)."""
        if self._streams:
            self._streams[2].close()
            self._streams = None
        self.llm.close()

    def next_token_logits(self, tokens: list[int]) -> Any:
        """Logits after ``tokens`` (for log-likelihood scoring and parity checks)."""
        import llama_cpp
        import numpy as np

        self.llm.reset()
        self.llm.eval(tokens)
        # Llama.scores is only filled with logits_all=True; read the last row from the context.
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def letter_logprobs(self, prompts, prefixes, letters):
        results = []
        for msgs, prefix, lets in zip(prompts, prefixes, letters):
            context = self.render(msgs) + prefix
            pairs = [_letter_token(self.tokenize, context, x) for x in lets]
            scores: dict[str, float] = {}
            for ctx in dict.fromkeys(c for c, _ in pairs):
                logits = self.next_token_logits(self.tokenize(ctx))
                m = float(logits.max())
                lse = m + math.log(float(sum(math.exp(float(v) - m) for v in logits)))
                for x, (c, t) in zip(lets, pairs):
                    if c == ctx:
                        scores[x] = float(logits[t]) - lse
            results.append(scores)
        return results


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens all ``prompts`` start with, leaving each at least its last token of its own (its logits)."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for k in range(max(n, 0)):
        t = first[k]
        if any(p[k] != t for p in prompts):
            return k
    return max(n, 0)


def sample_replies(
    engine: Any,
    prompts: Sequence[Messages],
    *,
    letters: Sequence[Sequence[str]] | None = None,
    cue: Sequence[str] | None = None,
    needs_score: Callable[[str], bool] = lambda text: True,
    prefix: str | Sequence[str] = "",
    **gen: Any,
) -> list[list[Reply]]:
    """``engine.generate`` as :class:`Reply` records; with ``letters`` and ``cue`` (per prompt), each reply
    for which ``needs_score(text)`` holds is scored: the letters' log-probabilities after the reply and its cue.

    llama.cpp scores in its batched decoder where each sequence ends (one step); any other engine scores with
    :meth:`Engine.letter_logprobs` on the prompt, the reply and the cue.
    """
    if hasattr(engine, "replies"):
        return engine.replies(prompts, letters=letters, cue=cue, prefix=prefix, **gen)
    texts = engine.generate(prompts, prefix=prefix, **gen) if prefix else engine.generate(prompts, **gen)
    out = [[Reply(t) for t in row] for row in texts]
    if letters is None or cue is None:
        return out
    todo = [(i, r) for i, row in enumerate(out) for r in row if needs_score(r.text)]
    scored = engine.letter_logprobs(
        [prompts[i] for i, _ in todo], [r.text + cue[i] for i, r in todo], [letters[i] for i, _ in todo]
    )
    for (_, r), sc in zip(todo, scored):
        r.scores = sc
    return out


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def open_engine(
    model: str,
    *,
    adapter: str | None = None,
    model_cfg: Any = None,
    load_in_4bit: bool = False,
    n_ctx: int = 4096,
    seed: int = 0,
) -> Engine:
    """A GGUF path opens llama.cpp; anything else (``default``, a directory) transformers."""
    if is_gguf(model):
        return LlamaCppEngine(model, n_ctx=n_ctx, seed=seed)
    from .models import load_model
    from .recipe import ModelCfg

    cfg = model_cfg or ModelCfg()
    loaded = load_model(cfg, path=model, adapter=adapter, load_in_4bit=load_in_4bit)
    return HFEngine(loaded.model, loaded.tokenizer)
