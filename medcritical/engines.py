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
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

Messages = list[dict[str, str]]
Progress = Callable[[int], None]

# llama.cpp threads when the caller names none (default: every core). Its threads spin-wait on each other,
# so on a machine other processes keep busy fewer threads are faster; tiny models run best on one.
THREADS_ENV = "MEDCRITICAL_LLAMA_THREADS"


def llama_threads() -> int:
    """``$MEDCRITICAL_LLAMA_THREADS``, else the number of cores."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if not env:
        return os.cpu_count() or 1
    if not env.isdigit() or int(env) < 1:
        raise UserError(f"{THREADS_ENV}={env!r}: expected a positive number of threads")
    return int(env)


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
    ) -> list[list[str]]:
        """``n`` completions for each prompt; ``on_done(k)`` after k more prompts finish."""
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
        self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=0, on_done=None, batch_size: int = 8
    ):
        import torch

        texts = [self.render(m) for m in prompts]
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
                out[i] = [s.strip() for s in decoded[j * n : (j + 1) * n]] * copies
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

    One sequence at a time. The ``n`` samples of a prompt reuse its evaluated
    tokens: ``create_completion`` keeps the longest common prefix of its KV
    cache and the new prompt, so after the first sample only the prompt's last
    token is evaluated again. Each prompt starts from an empty cache, so its
    samples depend only on the prompt and the seed. Sampling is temperature + top-p as in transformers
    (top-k and min-p off); llama.cpp applies top-p before the temperature,
    transformers after it.
    """

    name = "llamacpp"

    def __init__(self, gguf: str | Path, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 0) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from .gguf_file import open_llama

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

        The KV cache is cleared first, so a prompt's samples never depend on what
        was generated before it: a resumed step regenerates exactly what an
        uninterrupted one did. Its ``n`` samples still share the evaluated prompt.
        """
        tokens = self.tokenize(prompt)
        max_tokens = max(1, min(max_new_tokens, self.llm.n_ctx() - len(tokens)))
        self.llm.reset()
        outs = []
        # Greedy decoding gives one answer however often it is asked: generate it once.
        for j in range(n if temperature > 0 else 1):
            res = self.llm.create_completion(
                tokens,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                min_p=0.0,
                seed=sample_seed(seed, 0, j),
                stop=[self.eos] if self.eos else None,
            )
            outs.append(res["choices"][0]["text"].strip())
        return outs if len(outs) == n else outs * n

    def generate(
        self, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, n=1, seed=0, on_done=None, batch_size: int = 1
    ):
        out = []
        for i, msgs in enumerate(prompts):
            out.append(
                self.complete(
                    self.render(msgs),
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=sample_seed(seed, i, 0),
                    n=n,
                )  # fmt: skip
            )
            if on_done:
                on_done(1)
        return out

    def close(self) -> None:
        """Free the model and its context now (not whenever the engine is collected)."""
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
