"""llama-cpp-python's OpenAI-compatible server on a GGUF: :class:`LlamaCppServer`.

That server decodes one request at a time (a global lock; it has no
parallel-slot setting), so ``n_parallel`` starts that many server processes,
each on its own share of the threads; prompts are spread over them (all
samples of a prompt go to one process, which then reuses the prompt's KV cache).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..engines import llama_threads
from ..errors import UserError
from .client import OpenAIEngine
from .process import ManagedServer, check_importable, free_port

# Request fields that make the server sample as the in-process engines do: temperature + top-p only (the server
# defaults to top_k 40, min_p 0.05, repeat_penalty 1.1).
LLAMACPP_SAMPLING: dict[str, Any] = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


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
        logits_all: bool = False,
    ) -> None:
        """``logits_all``: keep every position's logits, which llama-cpp-python's server needs to return
        log-probabilities (forced answers score the option letters through them)."""
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
        check_importable(
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
            cmd += ["--n_threads", str(per), "--n_threads_batch", str(per), "--logits_all", str(logits_all).lower()]
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
