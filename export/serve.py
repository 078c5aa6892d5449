"""``medcritical serve MODEL.gguf``: an OpenAI-compatible server, offline.

This is llama-cpp-python's own server app (``llama_cpp.server``: FastAPI +
uvicorn; ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``), set up
for one GGUF. No ``chat_format`` is passed, so llama-cpp-python formats chats
with the template in the GGUF's metadata (the one the parity gate checked).
It listens on 127.0.0.1 unless told otherwise; ``--api-key`` (or
``$MEDCRITICAL_API_KEY``) makes every request need ``Authorization: Bearer KEY``.
Imports llama-cpp-python's server only: no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console

from medcritical.errors import UserError

API_KEY_ENV = "MEDCRITICAL_API_KEY"


def create_server_app(
    gguf: str | Path,
    *,
    api_key: str | None = None,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    alias: str | None = None,
) -> Any:
    """The FastAPI app serving ``gguf`` (the model is loaded here, not on the first request)."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from .gguf import gguf_metadata

    gguf = Path(gguf)
    if not gguf.is_file():
        raise UserError(f"{gguf}: no such GGUF file")
    if not gguf_metadata(gguf).get("tokenizer.chat_template"):
        # llama-cpp-python would fall back to a generic format without telling anyone.
        raise UserError(f"{gguf}: no chat template in the GGUF metadata (tokenizer.chat_template)")
    threads = n_threads or os.cpu_count() or 1
    model = ModelSettings(
        model=str(gguf),
        model_alias=alias or gguf.stem,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    return create_app(server_settings=ServerSettings(api_key=api_key), model_settings=[model])


def serve(
    gguf: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    n_ctx: int = 4096,
    alias: str | None = None,
    console: Console | None = None,
) -> int:
    """Serve until interrupted; returns the exit status."""
    import uvicorn

    console = console or Console(stderr=True, highlight=False)
    app = create_server_app(gguf, api_key=api_key, n_ctx=n_ctx, alias=alias)
    name = alias or Path(gguf).stem
    console.print(f"[bold]serving[/] {name} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning: listening on {host} without an API key (--api-key or ${API_KEY_ENV})[/]")
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
