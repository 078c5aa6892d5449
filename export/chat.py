"""``medcritical chat MODEL.gguf``: a terminal chat on llama.cpp, offline.

Prompts are rendered with the GGUF's own chat template by the same
:class:`~medcritical.engines.LlamaCppEngine` that evaluation uses, so a reply
here is what ``medcritical eval --model MODEL.gguf`` would score. Lines are
read from stdin (a pipe works as well as a terminal); replies stream token by
token. Imports llama-cpp-python and rich only: no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console

from medcritical.engines import LlamaCppEngine
from medcritical.prompts import SYSTEM

HELP = "/reset clears the conversation, /exit or Ctrl-D quits"


def system_prompt(value: str | None) -> str | None:
    """``zh``/``en`` select the system prompt the student was trained with; other text is used as is."""
    return SYSTEM.get(value, value) if value else None


def _prompt_tokens(engine: LlamaCppEngine, system: str | None, history: list[dict[str, str]], budget: int) -> list[int]:
    """Tokens of the conversation, dropping the oldest exchanges until ``budget`` tokens fit."""
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        tokens = engine.tokenize(engine.render(messages))
        if len(tokens) <= budget or len(history) <= 1:
            return tokens
        del history[:2]  # the oldest user message and its reply


def chat(
    gguf: str | Path,
    *,
    system: str | None = None,
    n_ctx: int = 4096,
    max_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    stdin: TextIO | None = None,
    console: Console | None = None,
) -> int:
    """Run the chat loop until /exit or end of input; returns the exit status."""
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
        line = stdin.readline()
        if not line:
            console.print()
            return 0
        text = line.strip()
        if not stdin.isatty():  # piped input: echo it, so the transcript reads like a session
            console.print(text, markup=False)
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            console.print("[dim](conversation cleared)[/]")
            continue
        if text.startswith("/"):
            console.print(f"[yellow]unknown command {text}[/]; {HELP}")
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
