"""Merge LoRA adapters into the base model: the weights every GGUF is made from.

``merge_into: base16`` (default) loads the base in full precision, not the 4-bit
copy QLoRA trained against: the shipped model then carries only the learned
delta, not NF4's rounding of every base weight. ``dequantized4bit`` loads the
base through bitsandbytes NF4 and dequantizes it first, so the merged model is
exactly what the adapter saw in training, NF4 error included (docs/export.md
has the trade-off).

The merge runs in the dtype the base is stored in (:func:`compute_dtype`): a
float32 base (the embedded default, the test models) in float32; a 16-bit one
(Qwen2.5-7B and every other released 7B: bfloat16) in that 16-bit type, which
halves the RAM (15 GB instead of 30 for 7B) and changes nothing that matters:
the base's values are already 16-bit, and each merged weight is rounded once,
as the float32 path's save does. ``dtype`` is what is saved.

Adapters are merged in the order given. The pipeline passes only the last
stage's adapter: each DPO round continues the previous adapter, so it alone
holds the whole delta. Several adapters are summed (LoRA deltas do not depend
on the weights they are added to, so stacking equals merging one by one).

The check: logits of the unmerged model (base + active adapters) and of the
merged one on a few chat prompts, every position, reported as
``max |merged - unmerged| / max |unmerged|`` (max-abs relative error). In
float32 it is about 1e-6, in bfloat16 about 1e-2 (both sides round in 16 bits); a
large value means the merge itself went wrong.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import atomic_dir, atomic_write_json, model_fingerprint, sha256_tree
from ..default_model import resolve_model
from ..errors import UserError
from ..prompts import SYSTEM

MERGE_INTO = ("base16", "dequantized4bit")
DTYPES = ("float32", "bfloat16", "float16")

# Chat prompts for the merge check and the tokenizer round-trip (English, Chinese, digits).
PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Which serum marker rises first after an acute myocardial infarction?"}],
    [
        {"role": "system", "content": SYSTEM["zh"]},
        {"role": "user", "content": "急性心肌梗死后最早升高的血清标志物是什么？A. 肌钙蛋白I B. 肌红蛋白"},
    ],
    [
        {"role": "system", "content": SYSTEM["en"]},
        {"role": "user", "content": "A 45-year-old, BP 90/60 mmHg, HR 124/min. Give 0.5 mg IM? A. yes B. no"},
    ],
]


@dataclass
class MergeResult:
    path: Path
    rel_error: float | None  # None when there was no adapter to merge
    seconds: float
    n_params: int
    tokenizer_fixed: bool  # see normalize_tokenizer


def _check_adapters(adapters: Sequence[Path]) -> None:
    for a in adapters:
        if not (a / "adapter_config.json").is_file():
            raise UserError(f"{a}: not a LoRA adapter directory (no adapter_config.json)")


def _render(tok: Any, messages: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _probe_logits(model: Any, tok: Any) -> list[Any]:
    import torch

    out = []
    with torch.inference_mode():
        for msgs in PROBES:
            ids = tok(_render(tok, msgs), add_special_tokens=False, return_tensors="pt").input_ids
            out.append(model(input_ids=ids.to(model.device)).logits[0].float().cpu())
    return out


def rel_error(a: Any, b: Any) -> float:
    """``max |a - b| / max |b|``: the error relative to the reference ``b``'s scale."""
    return float(abs(a - b).max() / max(float(abs(b).max()), 1e-30))


def compute_dtype(name: str) -> str:
    """The dtype the merge runs in: the base's stored dtype when it is 16-bit, else float32."""
    try:
        cfg = json.loads((Path(name) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    stored = cfg.get("dtype") or cfg.get("torch_dtype")
    return stored if stored in ("bfloat16", "float16") else "float32"


def _load_base(name: str, merge_into: str, dtype: str) -> Any:
    import torch

    from ..models import load_causal_lm

    nf4 = merge_into == "dequantized4bit"
    model = load_causal_lm(name, getattr(torch, dtype), four_bit=nf4, on_gpu=nf4, what="base model")
    if nf4:
        # transformers replaces each Linear4bit by a float Linear holding the NF4 values.
        model = model.dequantize().to("cpu", getattr(torch, dtype))
    return model.eval()


def normalize_tokenizer(tok: Any) -> bool:
    """Switch off byte fallback in a byte-level BPE tokenizer (in place) so that llama.cpp's converter reads it right.

    The embedded default is materialized without it since format 2, but a
    tokenizer that transformers built from a GGUF's GPT-2 style vocabulary
    still has it: an adapter trained on an older materialized default saved
    one, and so does any base the user made with ``gguf_file=``. See
    :func:`medcritical.default_model.untangle_byte_level_bpe`; it checks the
    probe chats here and its own texts encode and decode unchanged.
    """
    from ..default_model import untangle_byte_level_bpe

    return untangle_byte_level_bpe(tok, [_render(tok, m) for m in PROBES])


def merge_adapters(
    base: str | Path,
    adapters: Sequence[str | Path],
    out_dir: str | Path,
    *,
    merge_into: str = "base16",
    dtype: str = "float32",
) -> MergeResult:
    """Merge ``adapters`` (in order; may be empty) into ``base``; write a transformers dir.

    ``base`` may be ``default`` (the embedded SmolLM2). The directory gets
    safetensors weights, the tokenizer with its chat template (the last
    adapter's tokenizer if it saved one, as in training, else the base's) and
    ``merge.json`` (what was merged, the check's error). Whether a merge on
    disk can be reused is the caller's call (:mod:`.build` keys it).
    """
    import torch

    from ..models import load_tokenizer

    if merge_into not in MERGE_INTO:
        raise UserError(f"export.merge_into: {merge_into!r} is not one of {', '.join(MERGE_INTO)}")
    if dtype not in DTYPES:
        raise UserError(f"merged dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    adapter_paths = [Path(a) for a in adapters]
    _check_adapters(adapter_paths)
    name = resolve_model(str(base))
    t0 = time.perf_counter()
    tok_src = adapter_paths[-1] if adapter_paths and (adapter_paths[-1] / "tokenizer_config.json").exists() else name
    tok = load_tokenizer(str(tok_src))
    fixed = normalize_tokenizer(tok)
    compute = compute_dtype(name)
    model = _load_base(name, merge_into, compute)
    err = None
    if adapter_paths:
        from peft import PeftModel

        names = [f"adapter{i}" for i in range(len(adapter_paths))]
        try:
            model = PeftModel.from_pretrained(model, str(adapter_paths[0]), adapter_name=names[0])
            for n, a in zip(names[1:], adapter_paths[1:]):
                model.load_adapter(str(a), adapter_name=n)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"adapter does not fit base {name}: {str(e).splitlines()[0]}") from None
        model.base_model.set_adapter(names)  # all active at once: their deltas add up
        model.eval()
        before = _probe_logits(model, tok)
        model = model.merge_and_unload(safe_merge=True, adapter_names=names)
        after = _probe_logits(model, tok)
        err = max(rel_error(a, b) for a, b in zip(after, before))
    model = model.to(getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        seconds = round(time.perf_counter() - t0, 2)
        metrics = {"rel_error": err, "seconds": seconds, "n_params": n_params, "tokenizer_fixed": fixed,
                   "compute_dtype": compute}  # fmt: skip
        atomic_write_json(
            tmp / "merge.json",
            {
                "base": name,
                "base_fingerprint": model_fingerprint(name),
                "adapters": {str(a): sha256_tree(a) for a in adapter_paths},
                "merge_into": merge_into,
                "dtype": dtype,
                "metrics": metrics,
            },
        )
    return MergeResult(out_dir, err, seconds, n_params, fixed)
