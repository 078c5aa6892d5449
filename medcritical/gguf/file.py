"""Open GGUF files with one-line errors: :func:`check_gguf` and :func:`open_llama`.

llama.cpp reports a bad model file as ``ValueError: Failed to load model from
file`` (the reason goes to a log that ``verbose=False`` hides), and a few kinds
of damage make it abort the whole process. So every GGUF is first read here,
with the standard library only (inference machines have neither torch nor the
``gguf`` package): magic bytes, version, the key/value section, the tensor
infos, and whether the file is as long as its tensor data needs. The format is
llama.cpp's ``docs/gguf.md``::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64[n_dims], ggml type: u32, offset: u64)
    padding to general.alignment (default 32), then the tensor data

Strings are a u64 length and UTF-8 bytes; everything is little-endian.
:func:`open_llama` then loads the file with llama-cpp-python and turns its
failure into a :class:`~medcritical.errors.UserError` that names the file and
the reason llama.cpp logged (e.g. an architecture it does not know).

Imports nothing heavy: no torch, transformers or gguf; llama_cpp only inside
:func:`open_llama`.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what llama.cpp reads; version 1 (2023) used 32-bit counts and is refused by it
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 1 << 24  # longer metadata strings are checked for extent but not returned

# GGUF value types: id -> (struct format, size); 8 = string and 9 = array are handled apart.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),  # uint8
    1: ("<b", 1),  # int8
    2: ("<H", 2),  # uint16
    3: ("<h", 2),  # int16
    4: ("<I", 4),  # uint32
    5: ("<i", 4),  # int32
    6: ("<f", 4),  # float32
    7: ("<?", 1),  # bool
    10: ("<Q", 8),  # uint64
    11: ("<q", 8),  # int64
    12: ("<d", 8),  # float64
}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (elements per block, bytes per block), as in ggml's type_traits.
# Ids missing here were removed from ggml (4, 5, 31-33, 36-38) or are newer than this table:
# their size is not checked (llama.cpp itself refuses a type it does not know).
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}


class _Truncated(Exception):
    """The header ends before a value it announces."""


class _Reader:
    """Little-endian reads from a buffer, each checked against its end."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated

    def unpack(self, fmt: str, n: int) -> Any:
        self.need(n)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self) -> int:
        return self.unpack("<I", 4)

    def u64(self) -> int:
        return self.unpack("<Q", 8)

    def string(self) -> bytes:
        n = self.u64()
        self.need(n)
        value = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return value

    def skip_string(self) -> None:
        n = self.u64()
        self.need(n)
        self.pos += n


def _sniff(head: bytes) -> str:
    """What a file that is not a GGUF seems to be, for the error message."""
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the model itself: fetch it with git lfs pull"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack_from("<Q", head)[0] < 1 << 30:
        return "looks like a safetensors file: convert it with medcritical export"
    if head.startswith(b"PK\x03\x04"):
        return "looks like a zip archive (a PyTorch checkpoint?)"
    if head[:1] == b"\x80":
        return "looks like a Python pickle (a PyTorch checkpoint?)"
    if head.lstrip()[:1] in (b"<", b"{", b"["):
        return "looks like a text file (HTML, JSON or XML)"
    try:
        head.decode("utf-8")
        if head.isascii() or not any(b < 9 for b in head):
            return "looks like a text file"
    except UnicodeDecodeError:
        pass
    return f"starts with {head[:4]!r}, not b'GGUF'"


def _value(r: _Reader, vtype: int, depth: int = 0) -> Any:
    """Read one value; arrays are skipped (None) after checking that the file holds them."""
    if vtype in _SCALARS:
        fmt, n = _SCALARS[vtype]
        return r.unpack(fmt, n)
    if vtype == _STRING:
        n = r.u64()
        r.need(n)
        start, r.pos = r.pos, r.pos + n
        # A chat template is a few kB; a value of megabytes is skipped, not copied.
        return bytes(r.buf[start : r.pos]).decode("utf-8", "replace") if n <= MAX_STRING else None
    if vtype != _ARRAY:
        raise ValueError(f"unknown value type {vtype}")
    if depth > 1:
        raise ValueError("arrays nested too deep")
    itype, count = r.u32(), r.u64()
    if itype in _SCALARS:
        n = _SCALARS[itype][1] * count
        r.need(n)
        r.pos += n
    elif itype == _STRING:
        r.need(8 * count)  # each string has at least its length
        for _ in range(count):
            r.skip_string()
    elif itype == _ARRAY:
        r.need(12 * count)
        for _ in range(count):
            _value(r, _ARRAY, depth + 1)
    else:
        raise ValueError(f"unknown array item type {itype}")
    return None


def check_gguf(path: str | Path, *, spans: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate a GGUF's header without llama.cpp; raise a one-line UserError naming the file.

    Returns ``version``, ``architecture``, ``name``, ``tensor_count``,
    ``kv_count``, ``alignment``, ``file_size``, ``data_offset`` (where tensor
    data starts), ``data_bytes`` (how far the tensor data reaches from there)
    and ``metadata`` (the scalar and string values; arrays are left out).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such GGUF file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a GGUF file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file, not a GGUF file")
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read it: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise UserError(f"{path}: empty file, not a GGUF model")
        head = f.read(64)
        if not head.startswith(MAGIC):
            if MAGIC.startswith(head):
                raise UserError(f"{path}: truncated GGUF ({size} bytes)")
            raise UserError(f"{path}: not a GGUF file ({_sniff(head)})")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf, size, spans)


def header_layout(path: str | Path) -> dict[str, Any]:
    """:func:`check_gguf`'s facts plus where each part of the header lies: ``kv_spans``, one
    ``(key, start, end)`` byte range per metadata entry, and ``tensor_info_span``."""
    spans: dict[str, Any] = {}
    return check_gguf(path, spans=spans) | spans


def _parse(path: Path, buf: Any, size: int, spans: dict[str, Any] | None = None) -> dict[str, Any]:
    r = _Reader(buf, size)
    r.pos = 4
    try:
        version = r.u32()
        if version not in VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if swapped in VERSIONS:
                raise UserError(f"{path}: big-endian GGUF; llama.cpp here reads little-endian files only")
            if version == 1:
                raise UserError(f"{path}: GGUF version 1 is too old for llama.cpp; convert the model again")
            raise UserError(f"{path}: unsupported GGUF version {version} (llama.cpp reads versions 2 and 3)")
        tensor_count, kv_count = r.u64(), r.u64()
        if kv_count >= 1 << 32 or tensor_count >= 1 << 32:
            raise UserError(f"{path}: corrupt GGUF header ({tensor_count} tensors, {kv_count} metadata keys)")
        meta: dict[str, Any] = {}
        kv_spans = []
        for i in range(kv_count):
            start = r.pos
            key = r.string().decode("utf-8", "replace")
            vtype = r.u32()
            try:
                value = _value(r, vtype)
            except ValueError as e:
                raise UserError(f"{path}: corrupt GGUF metadata: key {i} ({key!r}): {e}") from None
            if value is not None:
                meta[key] = value
            kv_spans.append((key, start, r.pos))
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise UserError(f"{path}: corrupt GGUF metadata: general.alignment = {alignment!r}")
        end = 0
        tensor_info_start = r.pos
        for _ in range(tensor_count):
            name = r.string().decode("utf-8", "replace")
            n_dims = r.u32()
            if n_dims > MAX_DIMS:
                raise UserError(f"{path}: corrupt GGUF tensor info: {name!r} has {n_dims} dimensions")
            dims = [r.u64() for _ in range(n_dims)]
            ggml_type, offset = r.u32(), r.u64()
            if offset % alignment:
                raise UserError(f"{path}: corrupt GGUF tensor info: {name!r} at unaligned offset {offset}")
            n = 1
            for d in dims:
                n *= d
            block = GGML_BLOCKS.get(ggml_type)
            nbytes = (n + block[0] - 1) // block[0] * block[1] if block else 0
            end = max(end, offset + nbytes)
    except _Truncated:
        raise UserError(
            f"{path}: truncated GGUF: the file ends inside its header, after {size} bytes; copy or download it again"
        ) from None
    if spans is not None:
        spans.update(kv_spans=kv_spans, tensor_info_span=(tensor_info_start, r.pos))
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    if tensor_count and data_offset + end > size:
        raise UserError(
            f"{path}: truncated GGUF: {size} bytes, but its tensor data needs {data_offset + end}; "
            "copy or download it again"
        )
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise UserError(f"{path}: GGUF without general.architecture: not a model file llama.cpp can load")
    return {
        "path": str(path),
        "version": version,
        "architecture": arch,
        "name": meta.get("general.name"),
        "tensor_count": tensor_count,
        "kv_count": kv_count,
        "alignment": alignment,
        "file_size": size,
        "data_offset": data_offset,
        "data_bytes": end,
        "metadata": meta,
    }


def encode_kv(key: str, value: str | int | float) -> bytes:
    """One GGUF metadata entry: a string, an int64 or a float64."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"GGUF metadata {key!r}: a str, int or float, not {type(value).__name__}")
    name = key.encode("utf-8")
    head = struct.pack("<Q", len(name)) + name
    if isinstance(value, str):
        data = value.encode("utf-8")
        return head + struct.pack("<IQ", _STRING, len(data)) + data
    if isinstance(value, int):
        return head + struct.pack("<Iq", 11, value)
    return head + struct.pack("<Id", 12, value)


@contextlib.contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines while loading (``verbose=False`` hides them); restore its logger after."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _load_failure(path: Path, facts: dict[str, Any], log: list[str], error: Exception) -> str:
    """One line saying why llama.cpp refused ``path``, from its log."""
    import llama_cpp

    text = "".join(log)
    where = f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
    arch = facts.get("architecture")
    if "unknown model architecture" in text:
        return f"{path}: unsupported architecture '{arch}': {where} cannot run it"
    if "Failed to create llama_context" in str(error):
        return f"{path}: {where} loaded the model but could not create its context (too large an n_ctx? out of memory?)"
    reasons = [s.split("error loading model:", 1)[1].strip() for s in text.splitlines() if "error loading model:" in s]
    if reasons:
        reason = reasons[-1].replace(str(path), path.name)
        return f"{path}: {where} cannot load it ({arch}): {reason}"
    return f"{path}: {where} cannot load this {arch} model (the file may be damaged or of an unsupported kind)"


@contextlib.contextmanager
def load_errors(path: str | Path, facts: dict[str, Any]) -> Iterator[None]:
    """Around code that makes llama-cpp-python load ``path``: its ValueError becomes a one-line UserError."""
    path = Path(path)
    with _llama_log() as log:
        try:
            yield
        except ValueError as e:
            raise UserError(_load_failure(path, facts, log, e)) from None


def open_llama(path: str | Path, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path=path, **kwargs)`` after :func:`check_gguf`; failures are one-line UserErrors.

    When llama.cpp was built for a GPU (``setup.sh --gpu`` builds it for CUDA), the model's layers go there,
    as many as fit (:func:`gpu_layers`): evaluation, the export's parity check, chat and serve run there.
    """
    from llama_cpp import Llama

    facts = check_gguf(path)
    if not facts["tensor_count"] and not kwargs.get("vocab_only"):
        raise UserError(f"{path}: GGUF without tensors (a vocabulary-only file?): no model to run")
    kwargs.setdefault("verbose", False)
    if not kwargs.get("vocab_only"):
        kwargs.setdefault("n_gpu_layers", gpu_layers(facts))
    with load_errors(path, facts):
        return Llama(model_path=str(path), **kwargs)


# Left free on the GPU: llama.cpp's CUDA context (1.35 GiB measured for torch's on an H200), its compute buffer
# (~0.4 GiB for a 7B's 152k vocabulary), a one-sequence KV cache, and 1 GiB of margin (medcritical.plan).
GPU_RESERVE = 3 * 2**30


def gpu_layers(facts: dict[str, Any]) -> int:
    """How many layers of a GGUF (``check_gguf``'s facts) to offload: 0 on a build without GPU support; all (-1)
    when the file fits in the GPU's free memory less :data:`GPU_RESERVE`; else the share of layers that does (a
    12 GB card holds a 7B q8_0, not its f16 the parity check also runs), the rest staying on the CPU."""
    from llama_cpp import llama_supports_gpu_offload

    if not llama_supports_gpu_offload():
        return 0
    free = _free_gpu_bytes()
    need = facts["data_bytes"]
    if free is None or need + GPU_RESERVE <= free:
        return -1
    layers = int((facts["metadata"] or {}).get(f"{facts['architecture']}.block_count") or 0)
    return max(0, int(layers * (free - GPU_RESERVE) / need))


def _free_gpu_bytes() -> int | None:
    mib = nvidia_smi_mib("memory.free")
    return None if mib is None else int(mib * 2**20)


def nvidia_smi_mib(field: str) -> float | None:
    """``field`` (``memory.free``, ``memory.total``) of the first visible NVIDIA GPU in MiB, from nvidia-smi: no
    CUDA context is made (the inference install has no torch). None without a driver or a GPU."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    query = ["nvidia-smi", "-i", first, f"--query-gpu={field}", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=60, check=True).stdout
        return float(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
