"""Artifacts on disk: atomic writes, resumable JSONL, hashes and manifests.

Stages talk only through files. Every file is written to a temporary name and
renamed, so a crash (even kill -9) leaves either the old file or the new one,
never half of one. Generation stages append JSONL keyed by id, so a rerun skips
what is done and drops a torn last line.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
TRACKED_PACKAGES = (
    "medcritical",
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "llama_cpp_python",
    "unsloth",
)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` on success.

    Used for model directories (weights + tokenizer + config): a reader never
    sees a directory with some of its files missing.
    """
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


class JsonlLog:
    """Append-only JSONL keyed by a field, resumable after a crash.

    Opening it reads the complete lines already there; a torn last line (the
    process died mid-write) is cut off and counted in ``torn``.
    """

    def __init__(self, path: str | Path, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self.rows: dict[str, dict] = {}
        self.torn = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._recover()
        else:
            self.path.touch()  # an empty log is a result too (nothing rejected, nothing to correct)

    def _recover(self) -> None:
        data = self.path.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not line.endswith(b"\n"):
                break
            self.rows[str(row[self.key])] = row
            good += len(line)
        if good < len(data):
            self.torn = 1
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, key: object) -> bool:
        return str(key) in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows[str(row[self.key])] = row

    def values(self) -> list[dict]:
        return list(self.rows.values())


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hash a file, or every file under a directory (names and contents)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode())


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide a run's numbers."""
    out = {"python": platform.python_version(), "platform": sys.platform}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_manifest(
    stage_dir: str | Path,
    stage: str,
    config: Any,
    inputs: dict[str, str],
    metrics: dict[str, Any] | None = None,
    status: str = "complete",
    **extra: Any,
) -> dict:
    """Write ``manifest.json``: what ran, on what inputs, with which versions."""
    manifest = {
        "stage": stage,
        "status": status,
        "config": config,
        "inputs": inputs,
        "inputs_hash": sha256_json(inputs),
        "config_hash": sha256_json(config),
        "versions": versions(),
        "metrics": metrics or {},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(stage_dir: str | Path) -> dict | None:
    p = Path(stage_dir) / MANIFEST
    return read_json(p) if p.exists() else None


def model_fingerprint(name_or_path: str | Path) -> str:
    """What identifies a base model in a step's key, cheaply.

    A local directory: its file names and sizes, small files (config, tokenizer)
    hashed whole and weight files by their first and last 4 MiB, so a 15 GB
    base is identified in milliseconds and a changed file still changes the
    key. A Hugging Face cache snapshot links its large files to blobs named by
    their sha256: that name is the whole file's hash, taken as it is. Anything
    else (an unresolved name) is identified by its name.
    """
    path = Path(name_or_path)
    if not path.exists():
        return f"name:{name_or_path}"
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        if p.name == MANIFEST:
            continue
        size = p.stat().st_size
        h.update(f"{p.relative_to(path)}:{size}:".encode())
        blob = p.resolve()
        if p.is_symlink() and blob.parent.name == "blobs" and len(blob.name) == 64:
            h.update(blob.name.encode())  # the hub's sha256 of the whole file
            continue
        with open(p, "rb") as f:
            if size <= 64 << 20:
                h.update(hashlib.sha256(f.read()).digest())
            else:
                h.update(f.read(4 << 20))
                f.seek(-(4 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()


def iter_batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
