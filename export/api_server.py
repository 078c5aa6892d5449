"""``medcritical serve MODEL.gguf``: an OpenAI-compatible server you can leave running, offline.

The generation endpoints are llama-cpp-python's own server app
(``llama_cpp.server``: FastAPI; ``POST /v1/chat/completions``,
``POST /v1/completions``), set up for one GGUF and with the chat template from
its metadata. In front of it sits :class:`Guard`, a small ASGI layer that every
request passes first:

- **origins**: llama-cpp-python allows every origin, with credentials, so any
  web page open in a browser could call the API and read the replies. Its CORS
  middleware is removed; cross-origin access exists only for the origins named
  with ``--cors-origin`` (no wildcard, no credentials). Requests whose ``Host``
  header is not a loopback name are refused while serving on loopback (DNS
  rebinding), and POST bodies must be ``application/json`` (a page cannot send
  that cross-origin without a preflight);
- **key**: ``--api-key-file`` (or ``$MEDCRITICAL_API_KEY``, or ``--api-key``)
  makes every request need ``Authorization: Bearer KEY``, compared in constant
  time; without a key, a non-loopback address is refused unless ``--insecure``;
- **requests**: bodies over ``max_request_bytes``, bodies that are not JSON,
  wrong types, unknown roles, empty ``messages``, ``max_tokens`` < 1 or over
  ``--max-tokens-limit``, prompts longer than the context (streamed or not): a
  4xx JSON error in OpenAI's shape, never a traceback, a local path or a
  generation; a 5xx from inside becomes a generic JSON error (the detail goes
  to the server log). Requests queue for the one model; a new request does not
  cut off a stream in progress;
- **model name**: the alias (default: the file stem) in every response, never
  the GGUF's path; ``/v1/models`` is answered here;
- **system prompt**: a chat request without a system message gets the one the
  student was trained and evaluated with (:data:`medcritical.prompts.SYSTEM`,
  in the language of the first user message), as ``medcritical chat`` and
  ``eval`` do; a request's own system message is kept. Sampling settings a
  request leaves out are eval's: greedy, no repetition penalty.

Only the routes above exist. Imports llama-cpp-python's server only: no torch.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console

from medcritical.errors import UserError
from medcritical.gguf.file import check_gguf, load_errors

from .chat import AUTO, resolve_system

API_KEY_ENV = "MEDCRITICAL_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: some 250k tokens of text, far more than any context
ROLES = ("system", "user", "assistant")
# What eval decodes with, for the sampling settings a request leaves out.
EVAL_SAMPLING = {"temperature": 0.0, "repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}

log = logging.getLogger("medcritical.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# ---- settings ----------------------------------------------------------------------------------------------------


def read_api_key_file(path: str | Path) -> str:
    """The key in ``path`` (one line); refused when missing, empty, or readable by group or others."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such API key file")
    if not path.is_file():
        raise UserError(f"{path}: not a file (--api-key-file wants a file holding the key)")
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise UserError(
                f"{path}: API key file is accessible to other users (mode {mode:04o}); "
                f"restrict it with: chmod 600 {path}"
            )
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the API key file: {getattr(e, 'strerror', None) or e}") from None
    if not key:
        raise UserError(f"{path}: API key file is empty")
    if any(c.isspace() for c in key) or not key.isprintable():
        raise UserError(f"{path}: API key file must hold one key on one line, without spaces")
    return key


def resolve_api_key(api_key: str | None = None, api_key_file: str | Path | None = None) -> str | None:
    """The key to require: ``--api-key-file``, else ``--api-key``, else ``$MEDCRITICAL_API_KEY``, else none."""
    if api_key and api_key_file:
        raise UserError("serve: give --api-key or --api-key-file, not both")
    if api_key_file:
        return read_api_key_file(api_key_file)
    key = api_key or os.environ.get(API_KEY_ENV, "")
    key = key.strip()
    if key and (any(c.isspace() for c in key) or not key.isprintable()):
        raise UserError("serve: the API key must be one word of printable characters")
    return key or None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable from this machine only."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool = False) -> None:
    """Refuse to listen beyond this machine without a key, unless told ``--insecure``."""
    if not api_key and not insecure and not is_loopback(host):
        raise UserError(
            f"serve: refusing to listen on {host} without an API key: anyone who reaches this address could use "
            f"the model; give --api-key-file FILE (or ${API_KEY_ENV}), or --insecure if the network is trusted"
        )


def check_cors_origin(origin: str) -> str:
    """``scheme://host[:port]`` as browsers send it in ``Origin``; no wildcard."""
    value = origin.strip().rstrip("/")
    if value == "*" or "*" in value:
        raise UserError(f"--cors-origin {origin}: wildcards are not allowed; name each origin, e.g. http://host:3000")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.fragment:
        raise UserError(f"--cors-origin {origin}: expected scheme://host[:port], e.g. https://intranet.example")
    return value


@dataclass(frozen=True)
class GuardConfig:
    """What :class:`Guard` enforces."""

    alias: str
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_tokens_limit: int = 4096
    max_request_bytes: int = MAX_REQUEST_BYTES
    n_ctx: int | None = None  # with a PromptCounter: prompts that do not fit are refused before generating
    system: str | None = AUTO  # "auto", None (add none) or the text to add
    # Host header names accepted (DNS rebinding); None accepts any.
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    created: int = field(default_factory=lambda: int(time.time()))


class PromptCounter:
    """Prompt lengths in tokens, rendered and tokenized as llama-cpp-python's chat handler does (vocabulary only).

    A prompt longer than the context fails inside llama-cpp-python; for a
    streamed request that happens after the 200, and the client gets an empty
    stream. Counting first turns it into a 400 for both.
    """

    def __init__(self, gguf: str | Path) -> None:
        import threading

        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from medcritical.gguf.file import open_llama

        self.llm = open_llama(gguf, vocab_only=True, verbose=False)
        meta = self.llm.metadata

        def token_text(key: str) -> str:
            tid = meta.get(key)
            return self.llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid is not None else ""

        template = meta.get("tokenizer.chat_template") or ""
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=token_text("tokenizer.ggml.eos_token_id"),
            bos_token=token_text("tokenizer.ggml.bos_token_id"),
        )
        self._lock = threading.Lock()

    def chat(self, messages: list[dict[str, str]]) -> int:
        result = self.formatter(messages=messages)
        with self._lock:
            return len(self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True))

    def text(self, prompt: str) -> int:
        with self._lock:
            return len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))


# ---- the guard ---------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the guard answers itself with a 4xx JSON error."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_content(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(400, f"{where}: only text content parts are supported", param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(400, f"{where}: expected a string", param=where)


def _max_tokens(body: dict[str, Any], limit: int, default: int | None) -> None:
    """Check ``max_tokens`` (or ``max_completion_tokens``) against 1..limit; fill in ``default``."""
    name, value = "max_tokens", body.get("max_tokens")
    other = body.pop("max_completion_tokens", None)
    if value is None and other is not None:
        name, value = "max_completion_tokens", other
    if value is None:
        if default is None:
            body.pop("max_tokens", None)
        else:
            body["max_tokens"] = default
        return
    if not _is_int(value):
        raise RequestError(400, f"{name}: expected an integer, got {_short(value)}", param=name)
    if value < 1:
        raise RequestError(400, f"{name}: must be at least 1, got {value}", param=name)
    if value > limit:
        raise RequestError(400, f"{name}: {value} is over this server's limit of {limit} tokens", param=name)
    body["max_tokens"] = value


def _common(body: Any, cfg: GuardConfig) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(400, "n: only 1 completion per request is supported", param="n")
    for key, value in EVAL_SAMPLING.items():
        if body.get(key) is None:
            body[key] = value
    body["model"] = cfg.alias  # the reply names the alias, whatever the client asked for
    return body


def check_chat_request(body: Any, cfg: GuardConfig) -> dict[str, Any]:
    """A chat request, checked and completed (system prompt, max_tokens, model); raises RequestError."""
    body = _common(body, cfg)
    messages = body.get("messages")
    if messages is None:
        raise RequestError(400, "messages: required", param="messages")
    if not isinstance(messages, list):
        raise RequestError(400, "messages: expected a list of {role, content} objects", param="messages")
    if not messages:
        raise RequestError(400, "messages: empty; send at least one user message", param="messages")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(400, f"{where}: expected an object with role and content", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                400, f"{where}.role: {_short(role)} is not one of {', '.join(ROLES)}", param=f"{where}.role"
            )
        clean.append({"role": role, "content": _text_content(m.get("content"), f"{where}.content")})
    if not any(m["role"] == "user" for m in clean):
        raise RequestError(400, "messages: no user message", param="messages")
    if not any(m["role"] == "system" for m in clean):
        system = resolve_system(cfg.system, clean)
        if system:
            clean.insert(0, {"role": "system", "content": system})
    body["messages"] = clean
    _max_tokens(body, cfg.max_tokens_limit, default=cfg.max_tokens_limit)
    return _llama_validated(body, "chat")


def check_completion_request(body: Any, cfg: GuardConfig) -> dict[str, Any]:
    """A text completion request, checked (prompt, max_tokens, model); raises RequestError."""
    body = _common(body, cfg)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = body["prompt"] = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "prompt: expected a non-empty string", param="prompt")
    _max_tokens(body, cfg.max_tokens_limit, default=None)  # OpenAI's default is 16 tokens
    return _llama_validated(body, "completion")


def _llama_validated(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """Validate the rest the way llama-cpp-python's route will, but report it as a clean 400."""
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from pydantic import ValidationError

    model = CreateChatCompletionRequest if kind == "chat" else CreateCompletionRequest
    try:
        model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False, include_context=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise RequestError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where) from None
    return body


def _json(status: int, payload: Any, extra: Sequence[tuple[bytes, bytes]] = ()) -> tuple[Message, Message]:
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *extra]
    return {"type": "http.response.start", "status": status, "headers": headers}, {
        "type": "http.response.body",
        "body": data,
    }


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class Guard:
    """The ASGI app in front of llama-cpp-python's: hosts, key, routes, request checks, model name, errors."""

    ROUTES = {
        "/v1/chat/completions": "POST",
        "/v1/completions": "POST",
        "/v1/models": "GET",
    }

    def __init__(self, app: Any, cfg: GuardConfig, counter: PromptCounter | None = None) -> None:
        self.app, self.cfg, self.counter = app, cfg, counter
        self._key = cfg.api_key.encode("utf-8") if cfg.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: none here
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        try:
            await self._http(scope, receive, send)
        except RequestError as e:
            extra = [(b"www-authenticate", b"Bearer")] if e.status == 401 else []
            if e.status == 405:
                extra.append((b"allow", self.ROUTES.get(scope["path"], "GET").encode()))
            for message in _json(e.status, _error_body(e.message, e.type, e.param, e.code), extra):
                await send(message)
        except _ClientGone:
            return
        except Exception:  # a bug here: the client gets a generic error, the log the traceback
            log.exception("error while checking a request to %s", scope.get("path"))
            await self._internal_error(send)

    def _headers(self, scope: Scope) -> dict[str, str]:
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

    def _check_host(self, headers: dict[str, str]) -> None:
        allowed = self.cfg.allowed_hosts
        host = headers.get("host")
        if allowed is None or host is None:
            return
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
        if name.lower() not in allowed:
            raise RequestError(421, "this server answers requests for its loopback address only", type_="host_error")

    def _check_key(self, headers: dict[str, str]) -> None:
        if self._key is None:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self._key)
        if not ok:
            raise RequestError(
                401, "missing or wrong API key (send Authorization: Bearer KEY)", type_="authentication_error"
            )

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        limit = self.cfg.max_request_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _BodyTooLarge
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = self._headers(scope)
        self._check_host(headers)
        self._check_key(headers)
        path, method = scope["path"], scope["method"]
        if path == "/v1/models" or path == f"/v1/models/{self.cfg.alias}":
            if method != "GET":
                raise RequestError(405, f"{method} is not allowed here")
            card = {"id": self.cfg.alias, "object": "model", "created": self.cfg.created, "owned_by": "medcritical"}
            payload = {"object": "list", "data": [card]} if path == "/v1/models" else card
            for message in _json(200, payload):
                await send(message)
            return
        want = self.ROUTES.get(path)
        if want is None:
            raise RequestError(404, f"no such endpoint: {path[:80]}", type_="not_found_error")
        if method != want:
            raise RequestError(405, f"{method} is not allowed here; use {want}")
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(415, "the request body must be JSON (Content-Type: application/json)")
        try:
            raw = await self._read_body(receive, headers)
        except _BodyTooLarge:
            raise RequestError(
                413, f"request body over this server's limit of {self.cfg.max_request_bytes} bytes"
            ) from None
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise RequestError(400, "the request body is not valid JSON") from None
        is_chat = path == "/v1/chat/completions"
        body = (check_chat_request if is_chat else check_completion_request)(body, self.cfg)
        await self._check_length(body, is_chat)
        await self._forward(scope, receive, send, json.dumps(body).encode("utf-8"))

    async def _check_length(self, body: dict[str, Any], is_chat: bool) -> None:
        n_ctx, counter = self.cfg.n_ctx, self.counter
        if counter is None or n_ctx is None:
            return
        from starlette.concurrency import run_in_threadpool

        if is_chat:
            n = await run_in_threadpool(counter.chat, body["messages"])
        else:
            n = await run_in_threadpool(counter.text, body["prompt"])
        if n >= n_ctx:
            where = "messages" if is_chat else "prompt"
            raise RequestError(
                400,
                f"{where}: {n} prompt tokens; this model's context is {n_ctx} tokens, and the reply needs room too",
                param=where,
                code="context_length_exceeded",
            )

    async def _forward(self, scope: Scope, receive: Receive, send: Send, data: bytes) -> None:
        """Pass the checked body to llama-cpp-python's app; replace a 5xx reply with a generic error."""
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        inner_scope = dict(scope, headers=[*headers, (b"content-length", str(len(data)).encode())])
        sent = False

        async def inner_receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        state = {"started": False, "failed": False}

        async def inner_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] >= 500:
                    state["failed"] = True
                    log.error("llama-cpp-python answered %s on %s", message["status"], scope["path"])
                    return
                state["started"] = True
            elif state["failed"]:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    await self._internal_error(send)
                return
            await send(message)

        try:
            await self.app(inner_scope, inner_receive, inner_send)
        except Exception:
            log.exception("error while answering %s", scope["path"])
            if not state["started"]:
                await self._internal_error(send)

    @staticmethod
    async def _internal_error(send: Send) -> None:
        payload = _error_body("internal error while generating; the server log has the details", "server_error")
        for message in _json(500, payload):
            await send(message)


# ---- apps --------------------------------------------------------------------------------------------------------


def build_llama_app(gguf: str | Path, *, alias: str, n_ctx: int = 4096, n_threads: int | None = None) -> Any:
    """llama-cpp-python's FastAPI app for ``gguf`` with its CORS middleware removed (the model loads here).

    llama-cpp-python keeps the model in module globals: one such app per process.
    """
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from starlette.middleware.cors import CORSMiddleware

    from medcritical.engines import llama_threads

    gguf = Path(gguf)
    facts = check_gguf(gguf)
    if not facts["tensor_count"]:
        raise UserError(f"{gguf}: GGUF without tensors (a vocabulary-only file?): no model to serve")
    template = facts["metadata"].get("tokenizer.chat_template")
    threads = n_threads or llama_threads()
    # pydantic-settings would fill every other field from environment variables of the same name (MODEL,
    # HF_MODEL_REPO_ID, LORA_PATH, API_KEY, ...): a prefix nothing uses keeps the environment out.
    isolated: dict[str, Any] = {"_env_prefix": "MEDCRITICAL_UNUSED_", "_env_file": None}
    model = ModelSettings(
        model=str(gguf),
        model_alias=alias,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        # The GGUF's own template, rendered by the same formatter as eval's (no look-alike built-in format).
        chat_format="chat_template.default" if template else None,
        verbose=False,
        **isolated,
    )
    # Requests queue instead of cutting off a stream in progress; keys are the guard's job.
    settings = ServerSettings(api_key=None, interrupt_requests=False, **isolated)
    config_file = os.environ.pop("CONFIG_FILE", None)  # create_app would take every setting from it
    try:
        with load_errors(gguf, facts):
            app = create_app(server_settings=settings, model_settings=[model])
    finally:
        if config_file is not None:
            os.environ["CONFIG_FILE"] = config_file
    if not template:
        # llama-cpp-python would fall back to a generic format without telling anyone.
        raise UserError(f"{gguf}: no chat template in the GGUF metadata (tokenizer.chat_template)")
    app.user_middleware[:] = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    return app


def harden(app: Any, cfg: GuardConfig, counter: PromptCounter | None = None) -> Any:
    """``app`` behind :class:`Guard`, and behind CORS for ``cfg.cors_origins`` only (when any)."""
    from starlette.middleware.cors import CORSMiddleware

    guarded = Guard(app, cfg, counter)
    if not cfg.cors_origins:
        return guarded
    return CORSMiddleware(
        guarded,
        allow_origins=list(cfg.cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
        allow_credentials=False,
        max_age=600,
    )


def create_server_app(
    gguf: str | Path,
    *,
    api_key: str | None = None,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    alias: str | None = None,
    cors_origins: Sequence[str] = (),
    max_tokens_limit: int | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    system: str | None = AUTO,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
) -> Any:
    """The ASGI app serving ``gguf`` (the model is loaded here, not on the first request).

    ``max_tokens_limit`` defaults to ``n_ctx``; ``system`` is ``"auto"``, None
    or a text (see :func:`export.chat.resolve_system`); ``allowed_hosts`` are
    the Host header names answered (None: any; the default suits loopback).
    """
    limit = n_ctx if max_tokens_limit is None else max_tokens_limit
    if limit < 1:
        raise UserError(f"serve: --max-tokens-limit must be at least 1, got {limit}")
    name = alias or Path(gguf).stem
    cfg = GuardConfig(
        alias=name,
        api_key=api_key or None,
        cors_origins=tuple(check_cors_origin(o) for o in cors_origins),
        max_tokens_limit=limit,
        max_request_bytes=max_request_bytes,
        system=system,
        allowed_hosts=None if allowed_hosts is None else tuple(h.lower() for h in allowed_hosts),
        n_ctx=n_ctx,
    )
    app = build_llama_app(gguf, alias=name, n_ctx=n_ctx, n_threads=n_threads)
    return harden(app, cfg, PromptCounter(gguf))


def serve(
    gguf: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    insecure: bool = False,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    alias: str | None = None,
    cors_origins: Sequence[str] = (),
    max_tokens_limit: int | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    system: str | None = AUTO,
    console: Console | None = None,
) -> int:
    """Serve until interrupted; returns the exit status."""
    import uvicorn

    console = console or Console(stderr=True, highlight=False)
    check_bind(host, api_key, insecure)
    origins = [check_cors_origin(o) for o in cors_origins]
    loopback = is_loopback(host)
    app = create_server_app(
        gguf,
        api_key=api_key,
        n_ctx=n_ctx,
        n_threads=n_threads,
        alias=alias,
        cors_origins=origins,
        max_tokens_limit=max_tokens_limit,
        max_request_bytes=max_request_bytes,
        system=system,
        allowed_hosts=(*LOOPBACK_HOSTS, host.strip("[]")) if loopback else None,
    )
    name = alias or Path(gguf).stem
    shown = f"[{host}]" if ":" in host else host
    console.print(f"[bold]serving[/] {name} at http://{shown}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)")
    console.print(
        f"[dim]API key: {'required' if api_key else 'none'}; cross-origin: {', '.join(origins) or 'none'}; "
        f"max_tokens up to {n_ctx if max_tokens_limit is None else max_tokens_limit}[/]",
        soft_wrap=True,
    )
    if not api_key and not loopback:
        console.print(f"[yellow]warning: listening on {host} without an API key (--insecure)[/]")
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
    return 0
