"""Serve and chat on the embedded GGUF: the guarded server over real HTTP, the trained system prompt, bad files.

The server runs in this process (uvicorn in a thread, on a free 127.0.0.1
port) and is called with the official ``openai`` client and with plain urllib
for what a client library would never send. llama-cpp-python keeps its model
in module globals, so one llama app is built per module and each test puts its
own :class:`export.api_server.Guard` (key, origins, limits) in front of it. llama.cpp
runs on one thread: the 135M model is fast enough and the CI has 2 cores.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from medcritical.errors import UserError
from medcritical.prompts import SYSTEM, question_messages

ROOT = Path(__file__).resolve().parent.parent
ALIAS = "medcritical-smol"
KEY = "test-key-0123456789abcdef"
QUESTIONS = {
    "en": (
        "A 60-year-old man has crushing chest pain for 30 minutes. Which serum marker rises first?",
        {"A": "Troponin I", "B": "Myoglobin", "C": "CK-MB", "D": "LDH", "E": "AST"},
    ),
    "zh": (
        "急性心肌梗死后最早升高的血清标志物是",
        {"A": "肌钙蛋白I", "B": "肌红蛋白", "C": "CK-MB", "D": "乳酸脱氢酶", "E": "谷草转氨酶"},
    ),
}


# ---- fixtures and helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    old = os.environ.get("MEDCRITICAL_LLAMA_THREADS")
    os.environ["MEDCRITICAL_LLAMA_THREADS"] = "1"
    yield
    if old is None:
        os.environ.pop("MEDCRITICAL_LLAMA_THREADS", None)
    else:
        os.environ["MEDCRITICAL_LLAMA_THREADS"] = old


@pytest.fixture(scope="module")
def gguf() -> Path:
    from medcritical.default_model import default_gguf

    return Path(default_gguf())


@pytest.fixture(scope="module")
def llama_app(gguf: Path) -> Any:
    from export.api_server import build_llama_app

    return build_llama_app(gguf, alias=ALIAS, n_ctx=1024, n_threads=1)


@pytest.fixture(scope="module")
def engine(gguf: Path) -> Iterator[Any]:
    from medcritical.engines import LlamaCppEngine

    eng = LlamaCppEngine(gguf, n_ctx=1024, n_threads=1)
    yield eng
    eng.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def serve_with(llama_app: Any, gguf: Path):
    """``with serve_with(api_key=..., cors_origins=...) as base_url:``, all in front of the one llama app."""
    from export.api_server import GuardConfig, PromptCounter, harden

    counter = PromptCounter(gguf)

    def make(**settings: Any):
        settings.setdefault("max_tokens_limit", 64)
        return running(harden(llama_app, GuardConfig(alias=ALIAS, n_ctx=1024, **settings), counter))

    return make


def http(
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    method: str | None = None,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    """(status, lower-cased headers, body text) of one plain HTTP request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if data is not None else {}
    h |= {"Authorization": f"Bearer {key}"} if key else {}
    h |= headers or {}
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def client(base: str, key: str | None = None) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=key or "no-key", max_retries=0, timeout=120)


HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


@pytest.fixture
def generations(monkeypatch) -> list[Any]:
    """Every prompt llama.cpp is asked to complete (in this process), in order."""
    import llama_cpp

    prompts: list[Any] = []
    original = llama_cpp.Llama.create_completion

    def recording(self, prompt, *args, **kwargs):
        prompts.append(prompt)
        recording.kwargs = kwargs  # type: ignore[attr-defined]
        return original(self, prompt, *args, **kwargs)

    recording.kwargs = {}  # type: ignore[attr-defined]

    monkeypatch.setattr(llama_cpp.Llama, "create_completion", recording)
    return prompts


# ---- cross-origin access -------------------------------------------------------------------------------------------


def test_no_cross_origin_access_by_default(serve_with, generations) -> None:
    evil = {"Origin": "http://evil.example"}
    preflight = evil | {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with serve_with() as base:
        status, headers, _ = http(f"{base}/v1/chat/completions", method="OPTIONS", headers=preflight)
        assert status >= 400 and "access-control-allow-origin" not in headers
        status, headers, _ = http(f"{base}/v1/models", headers=evil)
        assert status == 200 and "access-control-allow-origin" not in headers
        status, headers, _ = http(f"{base}/v1/chat/completions", HELLO, headers=evil)
        assert status == 200 and "access-control-allow-origin" not in headers
        # A page may POST text/plain cross-site without a preflight: refused before any generation.
        n = len(generations)
        status, headers, _ = http(
            f"{base}/v1/chat/completions", raw=json.dumps(HELLO).encode(), headers=evil | {"Content-Type": "text/plain"}
        )
        assert status == 415 and "access-control-allow-origin" not in headers and len(generations) == n
        # DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own Host.
        assert http(f"{base}/v1/models", headers={"Host": "evil.example:80"})[0] == 421


def test_cors_origin_allows_only_the_named_origin(serve_with) -> None:
    from export.api_server import check_cors_origin

    def preflight(origin: str) -> dict[str, str]:
        return {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }

    with serve_with(cors_origins=("http://ok.example",)) as base:
        status, headers, _ = http(
            f"{base}/v1/chat/completions", method="OPTIONS", headers=preflight("http://ok.example")
        )
        assert status == 200 and headers["access-control-allow-origin"] == "http://ok.example"
        assert "access-control-allow-credentials" not in headers
        status, headers, _ = http(
            f"{base}/v1/chat/completions", method="OPTIONS", headers=preflight("http://evil.example")
        )
        assert "access-control-allow-origin" not in headers
        _, headers, _ = http(f"{base}/v1/models", headers={"Origin": "http://ok.example"})
        assert headers["access-control-allow-origin"] == "http://ok.example"
        _, headers, _ = http(f"{base}/v1/models", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in headers
    assert check_cors_origin("https://intranet.example:8443/") == "https://intranet.example:8443"
    for bad in ("*", "http://*.example", "intranet.example", "http://ok.example/path"):
        with pytest.raises(UserError, match="--cors-origin"):
            check_cors_origin(bad)


# ---- API key ---------------------------------------------------------------------------------------------------------


def test_api_key_is_required_and_checked(serve_with) -> None:
    import openai

    with serve_with(api_key=KEY) as base:
        assert http(f"{base}/v1/models")[0] == 401
        assert http(f"{base}/v1/models", key=KEY[:-1])[0] == 401
        assert http(f"{base}/v1/models", key=KEY + "x")[0] == 401
        assert http(f"{base}/v1/chat/completions", HELLO)[0] == 401
        assert http(f"{base}/v1/models", key=KEY)[0] == 200
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").chat.completions.create(model="x", messages=HELLO["messages"], max_tokens=2)
        reply = client(base, KEY).chat.completions.create(model="x", messages=HELLO["messages"], max_tokens=2)
        assert reply.choices[0].message.role == "assistant"


def test_api_key_file_must_be_private(tmp_path: Path, monkeypatch) -> None:
    from export.api_server import API_KEY_ENV, read_api_key_file, resolve_api_key

    f = tmp_path / "key"
    f.write_text(KEY + "\n")
    f.chmod(0o600)
    assert read_api_key_file(f) == KEY
    assert resolve_api_key(None, f) == KEY
    for mode in (0o644, 0o640, 0o604):
        f.chmod(mode)
        with pytest.raises(UserError, match=re.escape(f"chmod 600 {f}")):
            read_api_key_file(f)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(UserError, match="empty"):
        read_api_key_file(empty)
    with pytest.raises(UserError, match="no such API key file"):
        read_api_key_file(tmp_path / "missing")
    with pytest.raises(UserError, match="not both"):
        resolve_api_key("k", f)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None, None) == "from-env"
    assert resolve_api_key("from-flag", None) == "from-flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert resolve_api_key(None, None) is None


def test_serve_command_refuses_bad_keys_and_open_binds(gguf: Path, tmp_path: Path, capfd) -> None:
    from export.api_server import check_bind, is_loopback
    from medcritical.cli import main

    world = tmp_path / "key"
    world.write_text(KEY)
    world.chmod(0o644)
    cases = [
        (["--api-key-file", str(world)], "chmod 600"),
        (["--api-key-file", str(tmp_path / "nope")], "no such API key file"),
        (["--host", "0.0.0.0"], "--insecure"),
        (["--host", "192.0.2.7", "--port", "0"], "without an API key"),
        (["--cors-origin", "*"], "wildcards"),
    ]
    for extra, expected in cases:
        capfd.readouterr()
        assert main(["serve", str(gguf), *extra]) == 1
        out, err = capfd.readouterr()
        lines = [s for s in err.splitlines() if s.strip()]
        assert len(lines) == 1 and expected in lines[0], (extra, err)
        assert "Traceback" not in out + err
    for host in ("127.0.0.1", "127.0.0.9", "localhost", "::1", "[::1]"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.0.2.7", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(UserError, match="--insecure"):
            check_bind(host, None)
        check_bind(host, KEY)
        check_bind(host, None, insecure=True)


# ---- requests --------------------------------------------------------------------------------------------------------


def test_malformed_requests_get_clean_4xx_and_the_server_stays_up(serve_with, gguf: Path, generations) -> None:
    chat, completions = "/v1/chat/completions", "/v1/completions"
    user = {"role": "user", "content": "hi"}
    cases: list[tuple[str, dict[str, Any]]] = [
        (chat, {"raw": b"{not json"}),
        (chat, {"raw": b"\xff\xfe\x00"}),
        (chat, {"raw": b"[" * 3000 + b"]" * 3000}),
        (chat, {"body": []}),
        (chat, {"body": "messages"}),
        (chat, {"body": {}}),
        (chat, {"body": {"messages": "hello"}}),
        (chat, {"body": {"messages": []}}),
        (chat, {"body": {"messages": ["hi"]}}),
        (chat, {"body": {"messages": [{"role": "wizard", "content": "hi"}]}}),
        (chat, {"body": {"messages": [{"role": "user"}]}}),
        (chat, {"body": {"messages": [{"role": "user", "content": 5}]}}),
        (chat, {"body": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}}),
        (chat, {"body": {"messages": [{"role": "system", "content": "only a system message"}]}}),
        (chat, {"body": {"messages": [user], "temperature": "hot"}}),
        (chat, {"body": {"messages": [user], "top_p": 7}}),
        (chat, {"body": {"messages": [user], "stop": 5}}),
        (chat, {"body": {"messages": [user], "n": 3}}),
        (chat, {"raw": json.dumps({"messages": [{"role": "user", "content": "x" * 9000}]}).encode()}),
        (chat, {"method": "GET"}),
        (completions, {"body": {"prompt": 5}}),
        (completions, {"body": {"prompt": ["a", "b"]}}),
        (completions, {"body": {"prompt": ""}}),
        ("/v1/embeddings", {"body": {"input": "x"}}),
        ("/docs", {}),
    ]
    with serve_with(max_request_bytes=8192) as base:
        for path, kwargs in cases:
            status, headers, text = http(base + path, **kwargs)
            assert 400 <= status < 500, (path, kwargs, status, text)
            error = json.loads(text)["error"]
            assert error["message"] and error["type"], text
            for leak in ("Traceback", 'File "', str(gguf.parent), str(ROOT), "site-packages"):
                assert leak not in text, (path, kwargs, text)
        assert not generations  # nothing reached llama.cpp
        status, _, text = http(base + chat, HELLO)
        assert status == 200 and json.loads(text)["choices"][0]["message"]["role"] == "assistant"
        assert len(generations) == 1


def test_max_tokens_limit(serve_with, generations) -> None:
    msgs = [{"role": "user", "content": "Tell me a long story about the heart."}]
    with serve_with(max_tokens_limit=8) as base:
        url = f"{base}/v1/chat/completions"
        for value in (-5, 0, 9, 10**9, 1.5, "8", True):
            status, _, text = http(url, {"messages": msgs, "max_tokens": value})
            assert status == 400 and "max_tokens" in json.loads(text)["error"]["message"], (value, text)
        status, _, text = http(url, {"messages": msgs, "max_completion_tokens": 9})
        assert status == 400 and "max_completion_tokens" in text
        assert http(f"{base}/v1/completions", {"prompt": "The heart", "max_tokens": 9})[0] == 400
        assert not generations
        for body in ({"messages": msgs, "max_tokens": 8}, {"messages": msgs}, {"messages": msgs, "max_tokens": None}):
            status, _, text = http(url, body)
            assert status == 200 and 1 <= json.loads(text)["usage"]["completion_tokens"] <= 8, text


def test_prompt_longer_than_the_context_is_refused(serve_with, generations) -> None:
    import openai

    long = [{"role": "user", "content": "heart " * 1100}]  # over the 1024-token context
    with serve_with() as base:
        api = client(base)
        for stream in (False, True):  # streamed, llama.cpp would fail after the 200: an empty stream
            with pytest.raises(openai.BadRequestError, match="context") as e:
                api.chat.completions.create(model=ALIAS, messages=long, max_tokens=4, stream=stream)
            assert e.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError, match="context"):
            api.completions.create(model=ALIAS, prompt="heart " * 1100, max_tokens=4)
        assert not generations
        assert api.chat.completions.create(model=ALIAS, messages=HELLO["messages"], max_tokens=1).choices


def test_model_alias_in_every_response(serve_with, gguf: Path) -> None:
    with serve_with() as base:
        api = client(base)
        assert [m.id for m in api.models.list()] == [ALIAS]
        assert api.models.retrieve(ALIAS).id == ALIAS
        reply = api.chat.completions.create(model="gpt-4o", messages=HELLO["messages"], max_tokens=2)
        assert reply.model == ALIAS
        text = api.completions.create(model="whatever", prompt="The heart has", max_tokens=2)
        assert text.model == ALIAS
        chunks = list(api.chat.completions.create(model="x", messages=HELLO["messages"], max_tokens=3, stream=True))
        assert chunks and {c.model for c in chunks} == {ALIAS}
        for path, body in (("/v1/models", None), ("/v1/chat/completions", HELLO)):
            _, _, raw = http(base + path, body)
            assert ALIAS in raw and str(gguf) not in raw and gguf.name not in raw and str(gguf.parent) not in raw


def test_streaming_with_the_openai_client(serve_with) -> None:
    msgs = [{"role": "user", "content": "Name three heart valves."}]
    with serve_with() as base:
        api = client(base)
        chunks = list(api.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=12, stream=True))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert 2 <= len(pieces) <= 12  # token by token, not one block
        assert "".join(pieces).strip()
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        # (Not compared with a non-streamed reply: llama.cpp's greedy tokens can differ in the last bits with how
        # much of the prompt was cached.) The server answers again after a stream: the model lock was released.
        assert api.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=1).choices


# ---- the trained system prompt -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_chat_and_serve_send_evals_prompt(lang: str, serve_with, engine, gguf: Path, generations, monkeypatch) -> None:
    """A question without a system message reaches the model as evaluation's prompt, token for token."""
    import llama_cpp
    from rich.console import Console

    from export.chat import chat

    question, options = QUESTIONS[lang]
    messages = question_messages(question, options, False, lang)  # what eval renders (system + user)
    assert messages[0] == {"role": "system", "content": SYSTEM[lang]}
    user = messages[1]
    expected = engine.tokenize(engine.render(messages))

    with serve_with() as base:
        api = client(base)
        reply = api.chat.completions.create(model=ALIAS, messages=[user], max_tokens=1)
        assert generations[-1] == expected and reply.choices[0].message.content is not None
        # The sampling settings the request left out are eval's: greedy, no repetition penalty.
        used = llama_cpp.Llama.create_completion.kwargs
        assert used["temperature"] == 0 and used["repeat_penalty"] == 1.0 and used["max_tokens"] == 1
        if lang == "en":  # a request's own system message is kept
            own = [{"role": "system", "content": "Be brief."}, user]
            api.chat.completions.create(model=ALIAS, messages=own, max_tokens=1)
            assert generations[-1] == engine.tokenize(engine.render(own))

    def no_generation(self, prompt, *args, **kwargs):
        generations.append(prompt)
        return iter([{"choices": [{"text": "B"}]}])

    monkeypatch.setattr(llama_cpp.Llama, "create_completion", no_generation)
    settings = [("auto", expected)] + ([(None, engine.tokenize(engine.render([user])))] if lang == "en" else [])
    for setting, want in settings:  # chat: the question pasted between two """ lines
        stdin = io.StringIO(f'"""\n{user["content"]}\n"""\n/exit\n')
        assert chat(gguf, system=setting, stdin=stdin, n_ctx=1024, console=Console(file=io.StringIO())) == 0
        assert generations[-1] == want


def test_chat_streams_tokens(gguf: Path) -> None:
    from rich.console import Console

    from export.chat import chat

    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, s: str) -> int:
            self.writes.append(s)
            return super().write(s)

    rec = Recorder()
    stdin = io.StringIO("Hello there\n/reset\nWhat is aspirin?\n/exit\nnever read\n")
    assert chat(gguf, stdin=stdin, max_tokens=6, n_ctx=1024, console=Console(file=rec, width=200)) == 0
    text = rec.getvalue()
    assert text.count("model>") == 2 and "conversation cleared" in text and "never read" not in text
    start = next(i for i, w in enumerate(rec.writes) if "model>" in w)
    end = next(i for i, w in enumerate(rec.writes) if i > start and "you>" in w)
    assert end - start - 1 > 2  # the reply arrived token by token, then a newline


def test_chat_command_reads_stdin(gguf: Path, monkeypatch, capsys) -> None:
    from medcritical.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/exit\n"))
    assert main(["chat", str(gguf), "--max-tokens", "4", "--n-ctx", "1024", "--system", "en"]) == 0
    assert "model>" in capsys.readouterr().out


def test_chat_and_serve_do_not_import_torch(gguf: Path) -> None:
    code = (
        "import io, json, sys\n"
        "from medcritical import cli\n"
        "sys.stdin = io.StringIO('hi\\n/exit\\n')\n"
        f"rc = cli.main(['chat', {str(gguf)!r}, '--max-tokens', '3', '--n-ctx', '512'])\n"
        "from export.api_server import create_server_app\n"
        f"create_server_app({str(gguf)!r}, n_ctx=512)\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'bitsandbytes', 'peft', 'gguf') if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    env = dict(os.environ, MEDCRITICAL_LLAMA_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}


def test_system_settings() -> None:
    from export.chat import AUTO, resolve_system, system_setting

    assert system_setting(None) == system_setting("auto") == AUTO
    assert system_setting("none") is None
    assert system_setting("zh") == SYSTEM["zh"] and system_setting("en") == SYSTEM["en"]
    assert system_setting("Be brief.") == "Be brief."
    zh = [{"role": "user", "content": "下列哪项正确？"}]
    assert resolve_system(AUTO, zh) == SYSTEM["zh"]
    assert resolve_system(AUTO, [{"role": "user", "content": "Which is right?"}]) == SYSTEM["en"]
    assert resolve_system("Be brief.", zh) == "Be brief." and resolve_system(None, zh) is None


def test_modelfile_carries_the_kits_system_prompt(gguf: Path, tmp_path: Path) -> None:
    from export.modelfile import write_modelfile

    link = tmp_path / "student.gguf"
    link.symlink_to(gguf)
    text = write_modelfile(link, system=SYSTEM["en"]).read_text(encoding="utf-8")
    assert f'SYSTEM """{SYSTEM["en"]}"""' in text and "SmolLM" not in text
    assert text.count("SYSTEM ") == 1 and "FROM ./student.gguf" in text
    zh = write_modelfile(link, system=SYSTEM["zh"]).read_text(encoding="utf-8")
    assert f'SYSTEM """{SYSTEM["zh"]}"""' in zh


# ---- bad model files -------------------------------------------------------------------------------------------------


def _tiny_gguf(path: Path, arch: str) -> Path:
    import gguf as gguf_pkg
    import numpy as np

    w = gguf_pkg.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bad_files(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    truncated = d / "truncated.gguf"
    with gguf.open("rb") as f:
        truncated.write_bytes(f.read(1000))
    text = d / "notes.gguf"
    text.write_text("Not a model: the GGUF is on the shared drive.\n")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    safetensors = d / "model.gguf"
    safetensors.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    (d / "folder.gguf").mkdir()
    return {
        "missing": d / "missing.gguf",
        "truncated": truncated,
        "not a GGUF": text,
        "safetensors": safetensors,
        "directory": d / "folder.gguf",
        "wrong architecture": _tiny_gguf(d / "nonesuch.gguf", "nonesuch"),
    }


EXPECTED = {
    "missing": "no such GGUF file",
    "truncated": "truncated GGUF",
    "not a GGUF": "not a GGUF file",
    "safetensors": "safetensors",
    "directory": "is a directory",
    "wrong architecture": "unsupported architecture 'nonesuch'",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("command", ["eval", "chat", "serve"])
def test_bad_model_file_is_one_line(command: str, kind: str, bad_files, tmp_path: Path, capfd, monkeypatch) -> None:
    from medcritical.cli import main

    path = bad_files[kind]
    argv = {
        "eval": ["eval", "--model", str(path), "--limit", "1", "--output", str(tmp_path / "eval")],
        "chat": ["chat", str(path)],
        "serve": ["serve", str(path), "--port", "0"],
    }[command]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    capfd.readouterr()
    assert main(argv) == 1
    out, err = capfd.readouterr()
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1, err
    assert str(path) in lines[0] and EXPECTED[kind] in lines[0], lines[0]
    assert "Traceback" not in out + err


def test_check_gguf_reads_the_header(gguf: Path, tmp_path: Path) -> None:
    import gguf as gguf_pkg
    import numpy as np

    from medcritical.gguf.file import GGML_BLOCKS, check_gguf

    facts = check_gguf(gguf)
    assert facts["version"] == 3 and facts["architecture"] == "llama" and facts["tensor_count"] == 272
    assert facts["data_offset"] + facts["data_bytes"] == facts["file_size"] == gguf.stat().st_size
    assert facts["metadata"]["tokenizer.chat_template"].startswith("{%")
    # The block sizes agree with gguf's, except Q8_1, which gguf sizes as in old ggml (never stored in files).
    theirs = {int(t): size for t, size in gguf_pkg.GGML_QUANT_SIZES.items() if int(t) != 9}
    assert {t: GGML_BLOCKS[t] for t in theirs} == theirs

    # Every value type, arrays of strings and numbers, quantized tensors, another alignment: read as gguf reads it.
    w = gguf_pkg.GGUFWriter(str(tmp_path / "kinds.gguf"), "llama")
    w.add_custom_alignment(64)
    w.add_string("general.name", "kinds")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "", "汉字"])
    w.add_array("some.floats", [1.5, 2.5])
    w.add_uint64("some.u64", 2**40)
    w.add_int8("some.i8", -3)
    w.add_bool("some.flag", True)
    w.add_float64("some.f64", 0.25)
    w.add_tensor("a", np.ones((3, 64), dtype=np.float32))
    w.add_tensor("b", np.ones((2, 64), dtype=np.float16))
    q8 = gguf_pkg.quants.quantize(np.ones((4, 64), dtype=np.float32), gguf_pkg.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", q8, raw_dtype=gguf_pkg.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    kinds = check_gguf(tmp_path / "kinds.gguf")
    reader = gguf_pkg.GGUFReader(tmp_path / "kinds.gguf")
    assert kinds["tensor_count"] == len(reader.tensors) == 3 and kinds["alignment"] == 64
    assert kinds["kv_count"] == len([k for k in reader.fields if not k.startswith("GGUF.")])
    assert kinds["data_offset"] == reader.data_offset
    assert kinds["data_bytes"] == max(t.data_offset + t.n_bytes for t in reader.tensors) - reader.data_offset
    meta = kinds["metadata"]
    assert (meta["some.u64"], meta["some.i8"], meta["some.flag"], meta["some.f64"]) == (2**40, -3, True, 0.25)
    assert meta["general.name"] == "kinds" and "tokenizer.ggml.tokens" not in meta  # arrays are left out

    def fails(data: bytes, match: str) -> None:
        p = tmp_path / "x.gguf"
        p.write_bytes(data)
        with pytest.raises(UserError, match=match):
            check_gguf(p)

    with gguf.open("rb") as f:
        head = f.read(4096)
    fails(b"", "empty file")
    fails(b"GG", "truncated GGUF")
    fails(head[:30], "ends inside its header")
    fails(head, "ends inside its header")
    fails(b"GGUF" + struct.pack("<I", 1) + b"\0" * 16, "version 1 is too old")
    fails(b"GGUF" + struct.pack(">I", 3) + b"\0" * 16, "big-endian")
    fails(b"GGUF" + struct.pack("<I", 99) + b"\0" * 16, "unsupported GGUF version 99")
    fails(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n", "git lfs pull")
    fails(b"PK\x03\x04" + b"\0" * 60, "zip")
    cut = tmp_path / "cut.gguf"
    with gguf.open("rb") as f:
        cut.write_bytes(f.read(facts["file_size"] - 4096))
    with pytest.raises(UserError, match=f"tensor data needs {facts['file_size']}"):
        check_gguf(cut)
    assert check_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "nonesuch"))["architecture"] == "nonesuch"


def test_open_llama_names_the_file(bad_files) -> None:
    from medcritical.gguf.file import open_llama

    with pytest.raises(UserError, match=r"nonesuch\.gguf: unsupported architecture 'nonesuch'"):
        open_llama(bad_files["wrong architecture"], n_ctx=64)


# ---- the command, end to end ---------------------------------------------------------------------------------------


def test_serve_command_end_to_end(gguf: Path, tmp_path: Path) -> None:
    """``medcritical serve`` in its own process: key file, default alias, CORS flag, then a clean stop."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    port = _free_port()
    args = ["serve", str(gguf), "--port", str(port), "--n-ctx", "512", "--threads", "1"]
    args += ["--api-key-file", str(key_file), "--cors-origin", "http://ok.example", "--max-tokens-limit", "16"]
    env = {k: v for k, v in os.environ.items() if k != "MEDCRITICAL_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcritical", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "server exited"
            try:
                status, _, text = http(f"{base}/v1/models", key=KEY)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "server did not come up in 90 s"
                time.sleep(0.3)
        assert status == 200 and [m["id"] for m in json.loads(text)["data"]] == [gguf.stem]
        assert http(f"{base}/v1/models")[0] == 401
        _, headers, _ = http(f"{base}/v1/models", key=KEY, headers={"Origin": "http://ok.example"})
        assert headers["access-control-allow-origin"] == "http://ok.example"
        reply = client(base, KEY).chat.completions.create(model="x", messages=HELLO["messages"], max_tokens=3)
        assert reply.model == gguf.stem and reply.usage.completion_tokens >= 1
        assert http(f"{base}/v1/chat/completions", HELLO | {"max_tokens": 17}, key=KEY)[0] == 400
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "Traceback" not in err, err
