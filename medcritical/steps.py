"""The artifact model: every unit of work that writes files is a *step* with a key.

A step is a directory (a stage, a round's rollouts, a checkpointed training run,
an evaluation, a GGUF build) and a *key*: the hash of everything that decides
its content - the resolved config it reads, the hashes of its input artifacts
and data, the seed, and :data:`CODE`'s version tag of the code that writes it.
:meth:`Step.begin` compares the key with the directory's ``manifest.json``:

* complete, same key -> ``"complete"``: skip, read the outputs;
* partial (status ``running``), same key -> ``"resume"``: checkpoints and JSONL
  logs in the directory are continued;
* anything else with content -> the old directory is moved to
  ``<run>/.stale/<time>/...`` with a note saying which inputs changed, one line is
  printed, and the step starts empty (``"new"``). Work made for other inputs is
  never resumed.

The key goes into the manifest when the step starts (status ``running``) and
again when it ends (``complete``, with its outputs' sizes and hashes), so a
reader can always tell what a directory was made for. Downstream keys include
upstream output hashes, so a change ripples exactly as far as it must.

Every ``begin`` is logged in :data:`EVENTS`; the pipeline reports them per stage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from .artifacts import (
    MANIFEST,
    atomic_write_json,
    atomic_write_text,
    read_manifest,
    sha256_file,
    sha256_json,
    sha256_tree,
    versions,
)
from .errors import UserError

# Version tags of the code that writes each kind of step: bump one when its output would change for the
# same inputs, so directories written by the old code stop matching.
CODE = {
    "teach": 4,
    "sft": 4,
    "rollouts": 5,
    "corrections": 5,
    "pairs": 5,
    "dpo": 4,
    "eval": 4,
    "gguf": 4,
    "export": 5,
    "bundle": 3,
    "merge": 3,
}

EVENTS: list[dict[str, Any]] = []


def library_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of the distributions ``names`` (None: not installed), for the keys of the steps
    whose content they decide: an upgraded trainer or engine redoes what it made."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed for one piece of work (``derive_seed(seed, "rollouts", round, chunk)``).

    Hashed, not added, so neighbouring rounds, steps and chunks never share seeds.
    """
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (the first level that differs)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [prefix or "<all>"]


def _listing(changed: list[str]) -> str:
    return ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "") or "unknown"


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, paths -> strings)."""
    import json

    return json.loads(json.dumps(value, default=str))


@dataclass
class Step:
    """One unit of work in ``dir``, keyed by ``material`` (see the module doc).

    ``stale_root``: where a directory made for other inputs is moved (the run's
    ``.stale``); ``label``: how messages name the step (default: the directory).
    """

    kind: str
    dir: Path
    material: dict[str, Any]
    stale_root: Path | None = None
    label: str | None = None
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)
        self.material = _plain(self.material)
        self.key = sha256_json({"kind": self.kind, "code": CODE[self.kind], **self.material})
        self.label = self.label or str(self.dir)
        if self.stale_root is None:
            self.stale_root = self.dir.parent / ".stale"

    # ---- state ---------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any] | None:
        try:
            return read_manifest(self.dir)
        except (OSError, ValueError):
            return None

    def _outputs_intact(self, m: dict[str, Any]) -> bool:
        for rel, info in (m.get("outputs") or {}).items():
            p = self.dir / rel
            if not p.exists() or (p.is_file() and p.stat().st_size != info.get("size")):
                return False
        return True

    def state(self) -> str:
        """``complete``, ``partial`` (same key, not finished), ``other`` (made for other inputs) or ``empty``."""
        m = self.manifest()
        if m is not None and m.get("key") == self.key:
            return "complete" if m.get("status") == "complete" and self._outputs_intact(m) else "partial"
        if self.dir.exists() and any(self.dir.iterdir()):
            return "other"
        return "empty"

    @property
    def complete(self) -> bool:
        return self.state() == "complete"

    def metrics(self) -> dict[str, Any]:
        return (self.manifest() or {}).get("metrics", {})

    def changes(self) -> list[str]:
        """What differs between the inputs the directory was made for and this key's (dotted paths)."""
        old = self.manifest() or {}
        changed = _changed(old.get("material"), self.material) if old.get("material") is not None else []
        if old and old.get("code") != CODE[self.kind]:
            changed.append(f"code version {old.get('code')} -> {CODE[self.kind]}")
        return changed

    def require(self, fix: str = "") -> None:
        """Refuse, in one line, to read this step unless it is complete for its key; ``fix`` says what to run."""
        state = self.state()
        if state == "complete":
            return
        if state == "other":
            why = f"made for other inputs ({_listing(self.changes())} changed)"
        else:
            why = "not finished" if state == "partial" else "not done"
        raise UserError(f"{self.label}: {why}" + (f"; {fix}" if fix else ""))

    # ---- transitions -------------------------------------------------------------------------

    def begin(self, console: Console | None = None, quiet: bool = False) -> str:
        """Claim the directory for this key: ``complete`` (skip), ``resume`` or ``new`` (see the module doc)."""
        state = self.state()
        event: dict[str, Any] = {"step": self.label, "kind": self.kind}
        if state == "complete":
            EVENTS.append(event | {"outcome": "skipped"})
            return "complete"
        if state == "other":
            moved, changed = self.move_aside()
            event |= {"outcome": "replaced", "moved_to": str(moved), "changed": changed}
            if console is not None:
                console.print(
                    f"[yellow]{self.label}: made for other inputs ({_listing(changed)} changed); "
                    f"moved it to {moved}[/]",
                    soft_wrap=True,
                )
        else:
            event["outcome"] = "resumed" if state == "partial" else "new"
        EVENTS.append(event)
        self.dir.mkdir(parents=True, exist_ok=True)
        if state != "partial":
            self._write("running", {}, {})
        elif console is not None and not quiet:
            console.print(f"[dim]{self.label}: resuming partial work made for the same inputs[/]", soft_wrap=True)
        return "resume" if state == "partial" else "new"

    def done(
        self, metrics: dict[str, Any] | None = None, outputs: list[str] | dict[str, Any] | None = None, **extra: Any
    ) -> dict:
        """Mark complete. ``outputs``: paths relative to the directory, recorded here with size and hash,
        or such records already made (``{path: {"size": ..., "sha256": ...}}``)."""
        if isinstance(outputs, dict):
            return self._write("complete", metrics or {}, outputs, **extra)
        recorded = {}
        for rel in outputs or []:
            p = self.dir / rel
            if p.is_file():
                recorded[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
            elif p.is_dir():
                recorded[rel] = {"size": None, "sha256": sha256_tree(p)}
            else:
                raise FileNotFoundError(f"{p}: declared output of {self.label} is missing")
        return self._write("complete", metrics or {}, recorded, **extra)

    def progress(self, metrics: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Record finished outputs of a step still running (a build adds files one by one)."""
        self._write("running", metrics, outputs)

    def output_hash(self, rel: str) -> str:
        """The hash recorded for an output of a complete step."""
        return (self.manifest() or {})["outputs"][rel]["sha256"]

    def _write(self, status: str, metrics: dict[str, Any], outputs: dict[str, Any], **extra: Any) -> dict:
        m = {
            "kind": self.kind,
            "status": status,
            "key": self.key,
            "code": CODE[self.kind],
            "material": self.material,
            "outputs": outputs,
            "metrics": metrics,
            "versions": versions(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        atomic_write_json(self.dir / MANIFEST, m)
        return m

    def move_aside(self) -> tuple[Path, list[str]]:
        """Move the directory under ``stale_root`` with a note; returns (new place, changed inputs)."""
        old = self.manifest() or {}
        changed = self.changes()
        why = (
            f"It was made for other inputs.\nold key: {old.get('key')}\nnew key: {self.key}\n"
            f"changed: {', '.join(changed) or 'unknown (no manifest or no recorded inputs)'}"
        )
        return move_aside(self.dir, Path(self.stale_root), why), changed


STALE_ENV = "MEDCRITICAL_STALE_STAMP"


def stale_stamp() -> str:
    """The folder under ``.stale`` for this run: one per ``medcritical`` command (its stages share it)."""
    if STALE_ENV not in os.environ:
        os.environ[STALE_ENV] = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    return os.environ[STALE_ENV]


def move_aside(path: Path, stale_root: Path, why: str) -> Path:
    """Move ``path`` to ``<stale_root>/<stamp>/<its path under the run>`` with a ``.STALE.txt`` note beside it.

    Returns the new place. ``<stamp>`` is one per command (:func:`stale_stamp`),
    so everything one run replaced sits together.
    """
    try:
        rel = path.resolve().relative_to(stale_root.resolve().parent)
    except ValueError:
        rel = Path(path.name)
    dest = stale_root / stale_stamp() / rel
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{path.name}.{n}")
    # (a second replacement of the same path in one command gets a numbered sibling)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(dest))
    atomic_write_text(
        dest.parent / f"{dest.name}.STALE.txt",
        f"{path} was moved here on {time.strftime('%Y-%m-%d %H:%M:%S')}.\n{why}\n"
        "Nothing reads it any more; delete it when you no longer need it.\n",
    )
    return dest


def pending_chunks(ids: list[str], size: int, done: set[str]) -> Iterator[tuple[int, list[int]]]:
    """(chunk number, positions) of the chunks of ``ids`` that still have an id not in ``done``.

    Chunks are cut over the whole list, the same way on every run, so a
    resumed generation step redoes a partly written chunk with the same
    members and the same seed as the run that was interrupted (its rows already
    on disk come out the same and are not written twice).
    """
    size = max(1, size)
    for c, start in enumerate(range(0, len(ids), size)):
        positions = list(range(start, min(start + size, len(ids))))
        if any(ids[i] not in done for i in positions):
            yield c, positions


# ---- one process per run directory ---------------------------------------------------------------

LOCK_ENV = "MEDCRITICAL_RUN_LOCK"


@contextmanager
def run_lock(run_dir: Path, what: str) -> Iterator[None]:
    """Hold ``<run>/.lock`` while working in a run directory.

    A second process on the same directory fails at once in one line naming
    the holder. Stage children of ``medcritical run`` inherit their parent's
    lock (announced through ``$MEDCRITICAL_RUN_LOCK``) instead of taking it.
    The lock is an ``flock``: the kernel drops it when the holder dies, even by
    kill -9, so a crashed run never blocks the next one.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    holder = os.environ.get(LOCK_ENV)
    if holder and Path(holder.split(":", 1)[1]).resolve() == path.resolve():
        yield  # a child of the process that holds it
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        # One process of a multi-process launch (`accelerate launch`, torchrun): rank 0 holds the lock for all
        # of them. Should it fail to, it exits and the launcher stops this rank, which waits for rank 0 at its
        # first barrier before writing anything (`training.main_process_begin`).
        yield
        return
    import fcntl  # POSIX only: imported here so that importing this module never fails

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(f"{run_dir} is in use by {info}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()})\n".encode(), 0)
        old = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = f"{os.getpid()}:{path.resolve()}"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = old
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
