"""Teacher backends: who writes the chain-of-thought templates.

Every model backend answers :class:`TeacherRequest` objects (chat messages plus
sampling settings) through one method, ``complete(requests)``, which yields
``(index, reply)`` pairs as calls finish, so the teach stage can write each
verdict the moment it is known:

* :class:`OpenAITeacher` - any OpenAI-compatible chat API (vLLM, llama.cpp's
  server, a hosted endpoint), called from a thread pool with exponential
  backoff and jitter on transient failures;
* :class:`EngineTeacher` - a local GGUF (llama.cpp) or transformers model
  through :mod:`medcritical.engines`.

:class:`CachedTeacher` puts a disk cache (:class:`ReplyCache`) in front of any
of them, so a crashed or repeated run never pays for a call twice. The
``dataset`` backend needs no model: :func:`dataset_template` builds a template
from the expert explanation the dataset ships with.

Nothing heavy (openai, torch, llama_cpp) is imported at import time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import skills
from .artifacts import atomic_write_json, read_json, sha256_json
from .errors import UserError

if TYPE_CHECKING:
    from .data import MCQ
    from .engines import Engine
    from .prompts import Lang
    from .recipe import TeachCfg

Messages = list[dict[str, str]]

# Bumped when the meaning of a cached reply changes, so old entries stop matching.
CACHE_VERSION = 1
# Room for the prompt on top of max_tokens when sizing a local GGUF's context.
PROMPT_ROOM_TOKENS = 2048


@dataclass(frozen=True)
class TeacherRequest:
    """One call: the teacher prompt and the sampling settings for this attempt."""

    messages: Messages
    temperature: float
    top_p: float
    max_tokens: int
    seed: int


@dataclass
class TeacherReply:
    """What came back. ``text`` is the raw reply, reasoning blocks included;
    ``error`` is set (and ``text`` empty) when the call failed after its retries."""

    text: str = ""
    reasoning: str = ""  # a separate reasoning field (vLLM's reasoning parser), kept for the record
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    seconds: float = 0.0
    error: str | None = None
    cached: bool = False
    key: str = ""

    def split(self) -> tuple[str, str]:
        """(the reasoning model's chain of thought, the reply after it): :func:`~medcritical.prompts.split_reasoning`."""
        from .prompts import split_reasoning

        return split_reasoning(self.text, self.reasoning)


class Teacher(Protocol):
    backend: str
    model: str
    base_url: str | None

    def complete(self, requests: Sequence[TeacherRequest]) -> Iterator[tuple[int, TeacherReply]]:
        """Yield ``(index into requests, reply)`` in completion order."""
        ...


# ---- OpenAI-compatible APIs -------------------------------------------------


class OpenAITeacher:
    """A chat-completions endpoint, ``concurrency`` calls in flight at once.

    The retry policy is the served engines' (:func:`medcritical.serving.client.call_with_retries`):
    connection errors, timeouts, 408/409/429 and 5xx are retried with
    exponential backoff and jitter (honouring ``Retry-After``); any other 4xx is
    a setup mistake (wrong key, model or URL) and raises :class:`UserError` at
    once. A server that stays unreachable after every retry also raises, since
    every later call would fail the same way; a call that keeps timing out or
    keeps getting 5xx only fails its own question.
    """

    backend = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout: float = 600,
        retries: int = 4,
        backoff: float = 1.0,
    ) -> None:
        from .serving.client import openai_client

        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.client = openai_client(base_url, api_key, timeout)

    def complete(self, requests: Sequence[TeacherRequest]) -> Iterator[tuple[int, TeacherReply]]:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher")
        try:
            futures = {pool.submit(self.call, req): i for i, req in enumerate(requests)}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            # On an error or Ctrl-C, do not wait for the queued calls: they are cached
            # individually, so a rerun picks up whatever did finish.
            pool.shutdown(wait=False, cancel_futures=True)

    def call(self, req: TeacherRequest) -> TeacherReply:
        """One request with retries; raises :class:`UserError` on a setup mistake."""
        from .serving.client import CallFailed, call_with_retries

        start = time.monotonic()
        where = f"teacher API {self.base_url}"
        try:
            resp = call_with_retries(
                lambda: self.client.chat.completions.create(
                    model=self.model,
                    messages=req.messages,  # type: ignore[arg-type]
                    temperature=req.temperature,
                    top_p=req.top_p,
                    max_tokens=req.max_tokens,
                    seed=req.seed,
                ),
                retries=self.retries, backoff=self.backoff, where=where, model=self.model,
            )  # fmt: skip
        except CallFailed as e:
            if e.unreachable:
                raise UserError(f"{where}: {e.failure} after {e.tries} tries; is the server running?") from None
            return TeacherReply(error=f"{e.failure} after {e.tries} tries", seconds=time.monotonic() - start)
        return _reply_of(resp, time.monotonic() - start)


def _reply_of(resp: Any, seconds: float) -> TeacherReply:
    if not resp.choices:
        return TeacherReply(error="the API returned no choices", seconds=seconds)
    choice = resp.choices[0]
    extra = choice.message.model_extra or {}
    return TeacherReply(
        text=choice.message.content or "",
        reasoning=extra.get("reasoning_content") or extra.get("reasoning") or "",
        finish_reason=choice.finish_reason,
        usage=resp.usage.model_dump() if resp.usage else None,
        seconds=seconds,
    )


# ---- local models -------------------------------------------------------------


class EngineTeacher:
    """A local model through :mod:`medcritical.engines` (llama.cpp or transformers).

    Requests are generated in chunks of ``batch_size`` with shared settings.
    llama.cpp seeds each prompt by its position in a call, so it gets
    ``batch_size=1``: a request's seed alone then decides its sample.
    """

    base_url = None

    def __init__(self, engine: Engine, backend: str, model: str, batch_size: int = 1) -> None:
        self.engine = engine
        self.backend = backend
        self.model = model
        self.batch_size = batch_size

    def complete(self, requests: Sequence[TeacherRequest]) -> Iterator[tuple[int, TeacherReply]]:
        def settings(i: int) -> tuple:
            r = requests[i]
            return r.temperature, r.top_p, r.max_tokens, r.seed

        for _, same in groupby(sorted(range(len(requests)), key=settings), key=settings):
            group = list(same)
            for start in range(0, len(group), self.batch_size):
                yield from self._generate(requests, group[start : start + self.batch_size])

    def _generate(self, requests: Sequence[TeacherRequest], chunk: list[int]) -> Iterator[tuple[int, TeacherReply]]:
        first = requests[chunk[0]]
        start = time.monotonic()
        outs = self.engine.generate(
            [requests[i].messages for i in chunk],
            max_new_tokens=first.max_tokens,
            temperature=first.temperature,
            top_p=first.top_p,
            n=1,
            seed=first.seed,
        )
        seconds = (time.monotonic() - start) / len(chunk)
        for i, out in zip(chunk, outs, strict=True):
            yield i, TeacherReply(text=out[0], seconds=seconds)


def make_teacher(cfg: TeachCfg, seed: int = 0) -> Teacher:
    """The model backend a recipe's ``teach`` section names (not ``dataset``)."""
    if cfg.backend == "openai":
        return OpenAITeacher(
            base_url=str(cfg.base_url),
            model=str(cfg.model),
            api_key=os.environ.get(cfg.api_key_env),
            concurrency=cfg.concurrency,
            timeout=cfg.timeout,
            retries=cfg.retries,
        )
    if cfg.backend == "gguf":
        from .engines import LlamaCppEngine

        engine = LlamaCppEngine(str(cfg.model), n_ctx=cfg.max_tokens + PROMPT_ROOM_TOKENS, seed=seed)
        return EngineTeacher(engine, "gguf", str(cfg.model), batch_size=1)
    if cfg.backend == "transformers":
        from .engines import open_engine

        engine = open_engine(str(cfg.model), seed=seed)
        return EngineTeacher(engine, "transformers", str(cfg.model), batch_size=cfg.concurrency)
    raise ValueError(f"backend {cfg.backend!r} has no model to call")


# ---- cache ------------------------------------------------------------------------


class ReplyCache:
    """One JSON file per call, ``<root>/<key[:2]>/<key>.json``, written atomically.

    A file per key (rather than one JSONL) lets concurrent runs share a cache
    directory without coordinating, makes a lookup one ``stat`` without loading
    every long reply into memory, and cannot be torn by a crash.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> TeacherReply | None:
        p = self.path(key)
        if not p.exists():
            return None
        reply = read_json(p)["reply"]
        return TeacherReply(**reply, cached=True, key=key)

    def put(self, key: str, identity: dict[str, Any], request: TeacherRequest, reply: TeacherReply) -> None:
        stored = {k: v for k, v in asdict(reply).items() if k not in ("error", "cached", "key")}
        atomic_write_json(
            self.path(key),
            {
                "key": key,
                "teacher": identity,
                "request": asdict(request),
                "reply": stored,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )


@dataclass
class CachedTeacher:
    """Serve requests from :class:`ReplyCache` and pass only misses to ``teacher``.

    The key is sha256 over the teacher's identity (backend, model, base URL)
    and the whole request (messages, temperature, top_p, max_tokens, seed; the
    stage derives the seed from the attempt number). The API key is never part
    of it. Failed calls are not cached, so a rerun retries them.
    """

    teacher: Teacher
    cache: ReplyCache
    hits: int = 0
    calls: int = 0
    _identity: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        t = self.teacher
        self._identity = {"backend": t.backend, "model": t.model, "base_url": t.base_url}

    def key(self, req: TeacherRequest) -> str:
        return sha256_json({"v": CACHE_VERSION, **self._identity, **asdict(req)})

    def complete(self, requests: Sequence[TeacherRequest]) -> Iterator[tuple[int, TeacherReply]]:
        keys = [self.key(r) for r in requests]
        misses = []
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            if hit is None:
                misses.append(i)
            else:
                self.hits += 1
                yield i, hit
        for j, reply in self.teacher.complete([requests[i] for i in misses]):
            i = misses[j]
            self.calls += 1
            reply.key = keys[i]
            if reply.error is None:
                self.cache.put(keys[i], self._identity, requests[i], reply)
            yield i, reply


# ---- leaks ----------------------------------------------------------------------------

# Phrases by which a hinted teacher gives away that it was told the key. The
# student never sees a hint, so a template that leans on one teaches it to cite
# an authority that will not be there. Kept narrow: "the key finding is" and
# "key point" are ordinary reasoning and must pass.
_LEAKS = re.compile(
    r"(?i:reference\s+(?:answer|solution|key)"
    r"|answer\s+key"
    r"|(?:given|told|provided|stated|supplied)\s+(?:that\s+)?(?:the\s+)?(?:correct\s+|right\s+)?answer\s+is"
    r"|(?:the|this)\s+(?:provided|given|supplied|stated|expected|official)\s+(?:correct\s+)?(?:answer|key)\b"
    r"|(?:as|since|because)\s+the\s+key\s+(?:indicates|says|states|shows|suggests)"
    r"|according\s+to\s+the\s+(?:key|hint|reference)"
    r"|\b(?:I|we)\s+(?:was|were|am|are|have\s+been|had\s+been)\s+told"
    r"|(?:you|the\s+user|the\s+prompt)\s+(?:told|gave|provided|gives|says|said|mentioned|indicated)\b[^.\n]{0,30}\b(?:answer|key)"
    r"|for\s+(?:your|my)\s+reference"
    r"|\bthe\s+hint\b)"
    # "the key is C" echoes the hint; "the key is ACE inhibition" is reasoning.
    r"|\b[Tt]he\s+key\s+is\s*:?\s*\(?[A-H]{1,5}\)?(?=[ \t]*(?:[.,;:。，\n]|$))"
    r"|参考答案|标准答案|已知答案|给定答案|给出的答案|所给答案|提供的答案|告知的答案|供你参考|根据答案|按照答案"
    r"|(?:被|已|已经)告知[^。\n]{0,4}答案|题目(?:已经?)?(?:给出|告诉)[^。\n]{0,4}答案"
    r"|提示[^。\n]{0,6}答案|答案[^。\n]{0,4}提示"
)


def find_leak(text: str) -> str | None:
    """The first phrase in ``text`` that reveals a hint, or None."""
    m = _LEAKS.search(text)
    return m.group(0) if m else None


# ---- the dataset teacher ----------------------------------------------------------------

_ZH_SENTENCE = re.compile(r"(?<=[。！？；])")
_EN_SENTENCE = re.compile(r"(?<=[.!?;])\s+(?=[A-Z(\"'])")
# An exam-type marker in front of a stem: "（多选题）", "[Multiple answers]".
_TYPE_MARK = re.compile(r"^\s*[（(【\[][^）)】\]]{0,12}[）)】\]]\s*")


def _sentences(text: str, lang: Lang) -> list[str]:
    pattern = _ZH_SENTENCE if lang == "zh" else _EN_SENTENCE
    return [s.strip() for line in text.splitlines() for s in pattern.split(line) if s.strip()]


def dataset_template(mcq: MCQ, lang: Lang) -> tuple[str, str] | None:
    """(plan, steps) from the dataset's expert explanation, or None when it has none.

    The plan names what the question asks and the generic way to answer such a
    question; it says nothing the question does not. The steps are the
    explanation itself, which argues for the key, followed by a verdict on every
    option. Sentences that cite an answer key ("参考答案：D") are dropped: the
    student must learn the argument, not an appeal to a key it will never have.
    The caller renders the final answer line from the key.
    """
    if mcq.source.startswith(f"{skills.SOURCE}:"):  # generated: the rule-written working is the template
        return skills.template(mcq)
    kept = [s for s in _sentences(mcq.explanation, lang) if find_leak(s) is None]
    if not kept:
        return None
    stem = _TYPE_MARK.sub("", mcq.question).strip()
    stem_sentences = _sentences(stem, lang) or [stem]
    ask = stem_sentences[-1]
    vignette = len(stem_sentences) > 1
    gold = set(mcq.answer)
    if lang == "zh":
        plan = (
            f"本题所问：“{ask.rstrip('。？?')}”。\n解法："
            + ("先抓住题干中的关键信息，" if vignette else "")
            + "回忆相关知识点，逐项判断各选项，"
            + ("选出所有正确的选项（两个或以上）。" if mcq.multi else "选出唯一最佳答案。")
        )
        verdicts = [f"{k}. {v}：{'正确' if k in gold else '错误'}。" for k, v in mcq.options.items()]
        steps = "".join(kept) + "\n\n逐项分析：\n" + "\n".join(verdicts)
    else:
        plan = (
            f"The question asks: {ask}\nApproach: "
            + ("pick out the key findings in the stem, " if vignette else "")
            + "recall the relevant facts, check every option against them, and choose "
            + ("every option that is correct (two or more)." if mcq.multi else "the single best answer.")
        )
        verdicts = [f"{k}. {v}: {'correct' if k in gold else 'incorrect'}." for k, v in mcq.options.items()]
        steps = " ".join(kept) + "\n\nChecking each option:\n" + "\n".join(verdicts)
    return plan, steps
