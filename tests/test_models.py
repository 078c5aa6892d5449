"""The loader's choices on a CUDA machine (no GPU here: the CUDA queries are answered as a card would).

CUDA and unsloth cannot run on this machine, so these tests stand in for them at the one call each
choice depends on; everything else is the real code.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from medcritical.models import dtype_name, load_model, pick_backend, torch_dtype
from medcritical.recipe import ModelCfg


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_takes_bfloat16_only_where_the_card_computes_it(monkeypatch, native: bool, expected) -> None:
    """Turing cards (T4, RTX 20xx) report bfloat16 "supported" through emulation: they get float16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert torch_dtype("auto") is expected
    assert dtype_name("auto") == str(expected).removeprefix("torch.")
    assert torch_dtype("float32") is torch.float32


def test_unsloth_loads_the_named_weights_in_our_dtype(monkeypatch, tmp_path: Path) -> None:
    """unsloth would swap Qwen/... for its own pre-quantized mirror and guess the dtype; we name both."""
    seen: dict = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kw):
            seen.update(kw)
            return object(), object()

        @staticmethod
        def for_inference(model):
            pass

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr("medcritical.models.unsloth_available", lambda: True)
    cfg = ModelCfg(name_or_path=str(tmp_path), backend="auto")
    assert pick_backend(cfg) == "unsloth"
    assert load_model(cfg).backend == "unsloth"
    assert seen["use_exact_model_name"] is True and seen["dtype"] is torch.bfloat16
    assert seen["model_name"] == str(tmp_path)


def _cache_snapshot(cache: Path, repo: str, model_dir: Path, rev: str) -> Path:
    """Lay ``model_dir`` out as the Hugging Face cache holds a download of ``repo`` at ``rev``."""
    import hashlib
    import os

    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / rev
    for f in model_dir.iterdir():
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(f.read_bytes())
        (snap / f.name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snap


def test_hub_names_resolve_to_the_cached_snapshot_and_key_by_its_files(tiny_llama: Path, tmp_path, monkeypatch) -> None:
    """Every stage (training, vLLM, export) reads the same cached files, never a download, and a step keyed
    by the base sees new weights under the same name."""
    from medcritical.artifacts import model_fingerprint
    from medcritical.default_model import resolve_model
    from medcritical.errors import UserError

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local directory named like the repo
    snap = _cache_snapshot(cache, "acme/tiny-llama", tiny_llama, "a" * 40)
    assert Path(resolve_model("acme/tiny-llama")) == snap
    first = model_fingerprint(resolve_model("acme/tiny-llama"))
    assert first == model_fingerprint(resolve_model("acme/tiny-llama"))
    assert load_model(ModelCfg(name_or_path="acme/tiny-llama")).model is not None  # transformers reads it

    changed = tmp_path / "changed"
    changed.mkdir()
    for f in tiny_llama.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    (changed / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    _cache_snapshot(cache, "acme/tiny-llama", changed, "b" * 40)  # a newer download moved refs/main
    assert model_fingerprint(resolve_model("acme/tiny-llama")) != first

    with pytest.raises(UserError, match=r"acme/absent: not a local directory and not in the Hugging Face cache"):
        resolve_model("acme/absent")


def test_bfloat16_4bit_training_freezes_without_upcasting(tiny_llama: Path) -> None:
    """In bfloat16 the frozen weights stay bfloat16 (peft's preparation would make them float32: the measured
    3.4 GiB of a 7B's SFT peak), and the LoRA still gets its gradient."""
    from peft import get_peft_model

    from medcritical.models import lora_config
    from medcritical.recipe import LoraCfg

    loaded = load_model(ModelCfg(name_or_path=str(tiny_llama), dtype="bfloat16"), trainable=True)
    floats = {p.dtype for p in loaded.model.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16} and not any(p.requires_grad for p in loaded.model.parameters())
    model = get_peft_model(loaded.model, lora_config(LoraCfg(r=4, lora_alpha=8, lora_dropout=0.0)))
    ids = loaded.tokenizer("Which serum marker rises first?", return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
