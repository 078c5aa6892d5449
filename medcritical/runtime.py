"""What every command and stage process shares: consoles, the offline environment,
the one-line error printer, and child processes that die with their parent.

A leaf module: it imports nothing from medcritical but :mod:`medcritical.errors`,
so the CLI, the pipeline, the stages and ``export/`` can all use it without
importing each other.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from .errors import UserError

# Written to a file or a pipe (a CI log, `... 2>&1 | tee run.log`), rich would wrap at 80 columns and cut
# table cells; a wide fixed width keeps every row whole there. A terminal keeps its own width.
LOG_WIDTH = 160


def make_console(stderr: bool = True) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else LOG_WIDTH
    return Console(stderr=stderr, width=width, highlight=False)


err_console = make_console(stderr=True)
out_console = make_console(stderr=False)


def print_error(e: UserError, console: Console | None = None) -> None:
    """A user's mistake: one line, no traceback."""
    (console or err_console).print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True, markup=True)


def offline_quiet() -> None:
    """Offline by default (no hub lookups; a recipe naming a remote endpoint is the only
    network use) and no third-party progress bars over our own."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' "Loading weights" bars
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }.items():
        os.environ.setdefault(key, value)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def die_with_parent() -> None:
    """In a child (``preexec_fn``): receive SIGKILL when the parent dies (Linux).

    So killing ``medcritical run`` (even with kill -9) never leaves a stage, a
    converter or a server writing into the run directory.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` for a child that must not outlive this process."""
    preexec = die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(list(argv), preexec_fn=preexec, **kwargs)  # noqa: PLW1509 (only sets a death signal)


def child_run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` (output captured as text) for a child that must not outlive this process."""
    with child_popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


class Ticker:
    """Progress as plain lines, for a log file.

    rich draws its progress bars only on a terminal; written to a file or a
    pipe it shows nothing until the bar ends. A ticker prints a line at most
    every ``every`` seconds there (and nothing on a terminal, where the bar is).
    """

    def __init__(self, console: Any, label: str, every: float = 30.0) -> None:
        import time

        self.console, self.label, self.every = console, label, every
        self.clock = time.monotonic
        self.start = self.last = self.clock()
        self.on = not console.is_terminal

    def __call__(self, done: int, total: int | None, stats: str = "") -> None:
        now = self.clock()
        if not self.on or (now - self.last < self.every and done != total):
            return
        self.last = now
        of = f"/{total}" if total else ""
        self.console.print(f"{self.label}: {done}{of} {stats} ({now - self.start:.0f}s)", highlight=False, markup=False)
