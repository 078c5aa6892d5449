"""The OpenAI-compatible client behind the ``Engine`` protocol: :class:`OpenAIEngine`.

Generation through the official ``openai`` client (chat completions) against
one or more base URLs, ``concurrency`` requests in flight per URL. Retries are
the SDK's own (``max_retries``: exponential backoff with jitter, honouring
``Retry-After``, on timeouts, connection errors, 408/409/429 and 5xx); what is
left here is the one-line error mapping (:func:`call_openai`): another 4xx is
a setup mistake and raises :class:`UserError` at once, a call that failed
every try raises :class:`CallFailed`. One request per sample, each seeded
from (call seed, prompt index, sample index) with
:func:`medcritical.engines.sample_seed` (:func:`request_seed`), so a resumed
call regenerates the same samples wherever the server honours seeds. A server
that stays down raises one :class:`UserError`; prompts already finished were
reported through ``on_done`` and stay the caller's.

Nothing heavy (openai, llama_cpp, transformers) is imported at import time.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from ..engines import Messages, Progress, is_gguf, sample_seed
from ..errors import UserError, short

T = TypeVar("T")

# HTTP statuses the SDK retries besides 5xx: timeouts, conflicts, rate limits. Any other 4xx is a setup mistake.
RETRYABLE_STATUS = {408, 409, 429}
MAX_BACKOFF_S = 60.0
# How often a waiting call looks at the managed server: a dead one is reported at once, not after the retries.
SERVER_POLL_S = 0.5


class CallFailed(Exception):
    """A call that failed on every try; ``unreachable``: the last failure was a refused/broken connection."""

    def __init__(self, failure: str, tries: int, unreachable: bool, retry_after: str | None = None) -> None:
        super().__init__(f"{failure} after {tries} tries")
        self.failure, self.tries, self.unreachable, self.retry_after = failure, tries, unreachable, retry_after


class Stopped(Exception):
    """The call was called off (another request of the same call already failed)."""


def openai_client(base_url: str, api_key: str | None, timeout: float, max_retries: int = 0) -> Any:
    """The SDK client; ``max_retries``: the SDK's own retries of transient failures."""
    from openai import OpenAI

    # Local servers (vLLM, llama.cpp) accept any key, but the SDK insists on one.
    return OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=max_retries)


def call_openai(call: Callable[[], T], *, tries: int, where: str, model: str | None = None) -> T:
    """``call()`` (an ``openai`` client call that retries by itself) with its failures mapped to one line.

    A 4xx other than 408/409/429 is a setup mistake (wrong key, model or URL)
    and raises :class:`UserError` naming ``where`` (and ``model``); a transient
    failure the SDK gave up on raises :class:`CallFailed` (``tries``: how many
    the client was allowed, for the message).
    """
    import openai

    try:
        return call()
    except openai.APIStatusError as e:
        if e.status_code < 500 and e.status_code not in RETRYABLE_STATUS:
            for_model = f" for model {model!r}" if model is not None else ""
            raise UserError(f"{where}: HTTP {e.status_code}{for_model}: {short(e.message)}") from None
        after = e.response.headers.get("retry-after")
        raise CallFailed(f"HTTP {e.status_code}", tries, unreachable=False, retry_after=after) from None
    except openai.APITimeoutError:  # a subclass of APIConnectionError: first
        raise CallFailed("timed out", tries, unreachable=False) from None
    except openai.APIConnectionError as e:
        raise CallFailed(f"connection failed ({short(str(e.__cause__ or e))})", tries, unreachable=True) from None


# ---- the hand-written retry loop of teachers.OpenAITeacher -------------------------------------------------
# OpenAITeacher builds its client with openai_client(..., max_retries=0) and retries here; it moves to
# openai_client(max_retries=...) + call_openai when teachers.py is next rewritten, and this section goes.


def retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:  # an HTTP date instead of seconds: fall back to our own backoff
        return None


def backoff_delay(attempt: int, backoff: float, after: float | None = None) -> float:
    """Exponential backoff with jitter (spreads concurrent workers' retries), at least ``Retry-After``."""
    delay = min(MAX_BACKOFF_S, backoff * 2**attempt) * random.uniform(0.5, 1.5)
    return max(delay, min(after, MAX_BACKOFF_S)) if after else delay


def call_with_retries(
    call: Callable[[], T], *, retries: int, backoff: float, where: str, model: str | None = None
) -> T:
    """:func:`call_openai` tried ``retries + 1`` times, :func:`backoff_delay` apart, for a client without retries."""
    for attempt in range(retries):
        try:
            return call_openai(call, tries=retries + 1, where=where, model=model)
        except CallFailed as e:
            time.sleep(backoff_delay(attempt, backoff, retry_after(e.retry_after)))
    return call_openai(call, tries=retries + 1, where=where, model=model)


# ---- chat templates -------------------------------------------------------------------------------


def make_renderer(spec: Any) -> Callable[[Messages], str]:
    """How :meth:`OpenAIEngine.render` shows a prompt: the served model's chat template, when known.

    ``spec``: a tokenizer (anything with ``apply_chat_template``), a model or
    adapter directory (its tokenizer), a ``.gguf`` file (the template in its
    metadata, rendered as llama.cpp renders it), a Jinja template string, or
    None (the messages as JSON: the server applies a template we cannot see).
    """
    if spec is None:
        return lambda messages: json.dumps(messages, ensure_ascii=False)
    if hasattr(spec, "apply_chat_template"):
        tok = spec
        return lambda messages: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = str(spec)
    if "{%" in text or "{{" in text:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        tpl = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(text)
        return lambda messages: tpl.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    path = Path(text)
    if is_gguf(path):
        return _gguf_renderer(path)
    if path.is_dir():
        from ..models import load_tokenizer

        return make_renderer(load_tokenizer(str(path)))
    raise UserError(f"{spec}: not a tokenizer, model directory, GGUF file or chat template")


def _gguf_renderer(gguf: Path) -> Callable[[Messages], str]:
    """The GGUF's chat template as :class:`medcritical.engines.LlamaCppEngine` (and llama.cpp's server) renders it."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if not gguf.is_file():
        raise UserError(f"{gguf}: no such GGUF file")
    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        meta = llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise UserError(f"{gguf}: no chat template in the GGUF metadata")

        def token_text(key: str) -> str:
            tid = meta.get(key)
            return llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid is not None else ""

        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
        )
    finally:
        llm.close()
    return lambda messages: formatter(messages=messages).prompt


# ---- the engine -------------------------------------------------------------------------------------


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of sample ``sample`` of prompt ``prompt`` in a call seeded ``seed``.

    The in-process llama.cpp engine's own scheme (``LlamaCppEngine.generate``
    seeds prompt ``i`` with ``sample_seed(seed, i, 0)`` and ``complete`` its
    sample ``j`` with ``sample_seed(that, 0, j)``), so a llama.cpp server,
    whose sampler chain is the same, draws the very samples the in-process
    engine draws (``tests/test_served.py`` checks it).
    """
    return sample_seed(sample_seed(seed, prompt, 0), 0, sample)


class OpenAIEngine:
    """Generation through OpenAI-compatible chat completions, behind the ``Engine`` protocol.

    ``base_url`` may list several URLs serving the same model (replicas):
    prompt ``i`` goes to URL ``i % len(urls)``, all its samples to the same
    one, so a server that caches prompts evaluates each prompt once. Each URL
    gets ``concurrency`` requests in flight. ``extra_body`` is merged into
    every request (``llamacpp.LLAMACPP_SAMPLING``, ``vllm.VLLM_SAMPLING``:
    sample as the in-process engines do). ``retries``: the SDK's retries of a
    transient failure. ``server``: a managed server (or group) this engine
    owns; its death is reported at once with its log tail, and :meth:`close`
    stops it.

    ``temperature == 0`` makes one greedy request per prompt, its answer
    reused ``n`` times (as the other engines do). ``batch_size`` is accepted
    for the protocol and ignored: the server batches.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 4,
        tokenizer_or_template: Any = None,
        extra_body: dict[str, Any] | None = None,
        name: str = "openai",
        server: Any = None,
    ) -> None:
        self.base_urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not self.base_urls:
            raise UserError("OpenAIEngine: no base URL")
        if concurrency < 1:
            raise UserError(f"OpenAIEngine: concurrency {concurrency}: expected at least 1")
        self.model = model
        self.name = name
        self.concurrency = concurrency
        self.retries = retries
        self.extra_body = dict(extra_body or {})
        self.server = server
        self.gguf = getattr(server, "gguf", None)  # what a llama.cpp server samples (recorded like LlamaCppEngine's)
        self.clients = [openai_client(u, api_key, timeout, max_retries=retries) for u in self.base_urls]
        self._render = make_renderer(tokenizer_or_template)
        self._templated = tokenizer_or_template is not None  # else render() shows JSON, not the model's prompt

    def render(self, messages: Messages) -> str:
        return self._render(messages)

    def generate(
        self,
        prompts: Sequence[Messages],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int = 0,
        batch_size: int | None = None,
        on_done: Progress | None = None,
        prefix: str | Sequence[str] = "",
    ) -> list[list[str]]:
        """``n`` completions for each prompt; ``on_done(1)`` as each prompt's last sample arrives. With a
        ``prefix`` the reply starts with it: the prompt is rendered here and sent as a text completion."""
        starts = [prefix] * len(prompts) if isinstance(prefix, str) else list(prefix)
        if any(starts):
            self._need_template("a reply started with a prefix")
            prompts = [self.render(m) + pf for m, pf in zip(prompts, starts)]  # type: ignore[misc]
        sample = temperature > 0
        per = n if sample else 1  # greedy decoding gives one answer however often it is asked
        out: list[list[str]] = [[""] * per for _ in prompts]
        left = [per] * len(prompts)
        stop = threading.Event()
        pools = [
            ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"{self.name}-{k}")
            for k in range(len(self.base_urls))
        ]
        futures: dict[Future, tuple[int, int]] = {}
        try:
            for i, msgs in enumerate(prompts):
                k = i % len(self.base_urls)
                for j in range(per):
                    params = {
                        "temperature": temperature if sample else 0.0,
                        "top_p": top_p if sample else 1.0,
                        "max_tokens": max_new_tokens,
                        "seed": request_seed(seed, i, j),
                    }
                    futures[pools[k].submit(self._call, k, msgs, params, stop)] = (i, j)
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=SERVER_POLL_S, return_when=FIRST_COMPLETED)
                self._check_server()
                for fut in done:
                    i, j = futures[fut]
                    out[i][j] = fut.result()  # the first failure raises here; the rest are called off below
                    left[i] -= 1
                    if left[i] == 0 and on_done:
                        on_done(1)
        except CallFailed as e:
            raise self._failure(e) from None
        finally:
            stop.set()  # queued requests are cancelled; those in flight end on their own, unwaited
            for pool in pools:
                pool.shutdown(wait=False, cancel_futures=True)
        # as the in-process engines join them: the prefix, then the generated text stripped
        out = [[(pf + t.strip()).strip() if pf else t for t in texts] for pf, texts in zip(starts, out)]
        return [texts if len(texts) == n else texts * n for texts in out]

    def _need_template(self, what: str) -> None:
        if self._templated is False:
            raise UserError(
                f"{self.name}: {what} needs the served model's chat template (give the engine its tokenizer, "
                "model directory or GGUF), or set rounds.force_answer: false and rounds.rollouts.lead: false"
            )

    def _call(self, k: int, messages: Messages | str, params: dict[str, Any], stop: threading.Event) -> str:
        if stop.is_set():
            raise Stopped
        self._check_server()
        where = f"{self.name} server {self.base_urls[k]}"
        if isinstance(messages, str):  # a rendered prompt: a text completion
            resp = call_openai(
                lambda: self.clients[k].completions.create(
                    model=self.model, prompt=messages, extra_body=self.extra_body or None, **params
                ),
                tries=self.retries + 1, where=where, model=self.model,
            )  # fmt: skip
            if not resp.choices:
                raise UserError(f"{where}: the reply for model {self.model!r} has no choices")
            return resp.choices[0].text or ""
        resp = call_openai(
            lambda: self.clients[k].chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                extra_body=self.extra_body or None,
                **params,
            ),
            tries=self.retries + 1, where=where, model=self.model,
        )  # fmt: skip
        if not resp.choices:
            raise UserError(f"{where}: the reply for model {self.model!r} has no choices")
        return (resp.choices[0].message.content or "").strip()

    def _check_server(self) -> None:
        """A managed server that died is reported now, not after the SDK's retries."""
        if self.server is not None and not self.server.alive():
            raise UserError(self.server.death_message())

    def _failure(self, e: CallFailed) -> UserError:
        what = f"{self.name} server {', '.join(self.base_urls)} (model {self.model!r}): {e}"
        if self.server is not None and not self.server.alive():
            return UserError(self.server.death_message())
        if e.unreachable:
            what += "; is the server running?"
        if self.server is not None:
            what += f" (server log: {self.server.log_file})"
        return UserError(what)

    def letter_logprobs(self, prompts, prefixes, letters):
        """The letters' log-probabilities after ``render(prompt) + prefix``, from the server's top-20 next-token
        log-probabilities of a one-token text completion (vLLM and llama.cpp's server give them); a letter
        outside the top 20 gets the 20th's value (an upper bound)."""
        self._need_template("scoring option letters")
        out = []
        for i, (msgs, prefix, lets) in enumerate(zip(prompts, prefixes, letters)):
            k = i % len(self.base_urls)
            where = f"{self.name} server {self.base_urls[k]}"
            text = self.render(msgs) + prefix
            try:
                resp = call_openai(
                    lambda k=k, text=text: self.clients[k].completions.create(
                        model=self.model, prompt=text, max_tokens=1, temperature=0.0, logprobs=20,
                        extra_body=self.extra_body or None,
                    ),
                    tries=self.retries + 1, where=where, model=self.model,
                )  # fmt: skip
            except CallFailed as e:
                raise self._failure(e) from None
            lp = resp.choices[0].logprobs if resp.choices else None
            top = (lp.top_logprobs or [None])[0] if lp is not None else None
            if not top:
                raise UserError(f"{where}: no log-probabilities in the reply; this server cannot score letters")
            floor = min(top.values())
            out.append({x: max((v for t, v in top.items() if t.strip() == x), default=floor) for x in lets})
        return out

    def close(self) -> None:
        """Close the HTTP clients, and stop the server this engine owns."""
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        if self.server is not None:
            self.server.close()
