"""Server processes this session starts, waits for and stops: :class:`ManagedServer`.

A managed server listens on 127.0.0.1 on a free port (:func:`free_port`), is
ready when ``/v1/models`` lists its model, writes its output to a log file
(its tail is in every error), runs in its own process group and dies with its
parent (Linux ``PR_SET_PDEATHSIG``, through a small reaper process);
``close()`` (or leaving the ``with`` block) terminates the group, then kills it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError, short


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


def get_json(url: str, timeout: float = 5.0, api_key: str | None = None) -> Any:
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
                models = get_json(f"{self.base_url}/models", timeout=5)
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


def check_importable(python: str, modules: Sequence[str], hint: str) -> None:
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
