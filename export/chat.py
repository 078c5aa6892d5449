"""``medcritical chat MODEL.gguf``: a terminal chat on llama.cpp, offline.

Prompts are rendered with the GGUF's own chat template by the same
:class:`~medcritical.engines.LlamaCppEngine` that evaluation uses, and, unless
told otherwise, under the system prompt the student was trained and evaluated
with (:data:`medcritical.prompts.SYSTEM`, in the language of the conversation's
first message): a question asked here is the prompt ``medcritical eval`` scores.
Lines are read from stdin (a pipe works as well as a terminal); a line holding
only ``\"\"\"`` starts a message of several lines, ended by another such line
(as in Ollama). Replies stream token by token. Imports llama-cpp-python and
rich only: no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape

from medcritical.engines import LlamaCppEngine
from medcritical.prompts import SYSTEM, detect_lang

HELP = '/reset clears the conversation, """ starts and ends a message of several lines, /exit or Ctrl-D quits'
AUTO = "auto"
BLOCK = '"""'


def system_setting(value: str | None) -> str | None:
    """``--system`` as given on the command line -> ``"auto"``, None (no system prompt) or a text.

    ``auto`` (the default): the trained system prompt in the language of the
    first user message; ``zh``/``en``: the trained prompt in that language;
    ``none``: no system message; anything else is the system prompt itself.
    """
    if value is None or value.strip().lower() == AUTO:
        return AUTO
    if value.strip().lower() == "none" or not value.strip():
        return None
    return SYSTEM.get(value.strip(), value)


def resolve_system(setting: str | None, messages: list[dict[str, Any]]) -> str | None:
    """The system prompt to send with ``messages`` (which carry none) under ``setting``."""
    if setting != AUTO:
        return setting
    first = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    return SYSTEM[detect_lang(first if isinstance(first, str) else "")]


def chat_messages(setting: str | None, history: list[dict[str, str]]) -> list[dict[str, str]]:
    """What chat renders: the system prompt (see :func:`resolve_system`) and the conversation."""
    system = resolve_system(setting, history)
    return ([{"role": "system", "content": system}] if system else []) + history


def _prompt_tokens(
    engine: LlamaCppEngine, setting: str | None, history: list[dict[str, str]], budget: int
) -> list[int]:
    """Tokens of the conversation, dropping the oldest exchanges until ``budget`` tokens fit."""
    while True:
        tokens = engine.tokenize(engine.render(chat_messages(setting, history)))
        if len(tokens) <= budget or len(history) <= 1:
            return tokens
        del history[:2]  # the oldest user message and its reply


def _read_message(stdin: TextIO, console: Console) -> str | None:
    """The next message: one line, or the lines between two ``\"\"\"`` lines; None at end of input."""
    line = stdin.readline()
    if not line:
        return None
    echo = not stdin.isatty()  # piped input: echo it, so the transcript reads like a session
    if line.strip() != BLOCK:
        if echo:
            console.print(line.strip(), markup=False)
        return line.strip()
    lines = []
    while True:
        more = stdin.readline()
        if not more or more.strip() == BLOCK:
            break
        lines.append(more.rstrip("\r\n"))
    text = "\n".join(lines).strip()
    if echo:
        console.print(f"{BLOCK}\n{text}\n{BLOCK}", markup=False)
    return text


def chat(
    gguf: str | Path,
    *,
    system: str | None = AUTO,
    n_ctx: int = 4096,
    max_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    stdin: TextIO | None = None,
    console: Console | None = None,
) -> int:
    """Run the chat loop until /exit or end of input; returns the exit status.

    ``system``: ``"auto"`` (the trained system prompt in the language of the
    first user message), None for none, or the system prompt's text.
    """
    stdin = stdin or sys.stdin
    console = console or Console(highlight=False)
    engine = LlamaCppEngine(gguf, n_ctx=n_ctx, seed=seed)
    llm = engine.llm
    # Keep room for a reply: at least a quarter of the context, at most max_tokens.
    budget = n_ctx - min(max_tokens, n_ctx // 4)
    console.print(f"[bold]medcritical chat[/] {Path(gguf).name}  [dim]({HELP})[/]")
    history: list[dict[str, str]] = []
    while True:
        console.print("[bold green]you>[/] ", end="")
        text = _read_message(stdin, console)
        if text is None:
            console.print()
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            console.print("[dim](conversation cleared)[/]")
            continue
        if text.startswith("/"):
            console.print(f"[yellow]unknown command {escape(text)}[/]; {HELP}")
            continue
        history.append({"role": "user", "content": text})
        before = len(history)
        tokens = _prompt_tokens(engine, system, history, budget)
        if len(history) < before:
            console.print(f"[dim](dropped the {before - len(history)} oldest messages to fit the context)[/]")
        if len(tokens) >= n_ctx:
            history.pop()
            console.print(f"[red]message too long: {len(tokens)} tokens, context is {n_ctx} (--n-ctx)[/]")
            continue
        console.print("[bold cyan]model>[/] ", end="")
        reply: list[str] = []
        stream: Any = llm.create_completion(
            tokens,
            max_tokens=min(max_tokens, n_ctx - len(tokens)),
            temperature=temperature,
            top_p=top_p,
            repeat_penalty=1.0,
            stop=[engine.eos] if engine.eos else None,
            stream=True,
        )
        try:
            for chunk in stream:
                piece = chunk["choices"][0]["text"]
                reply.append(piece)
                console.out(piece, end="", highlight=False)
        except KeyboardInterrupt:
            console.print(" [dim](stopped)[/]", end="")
        console.print()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
