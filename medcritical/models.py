"""One loader for every stage: the student in 4-bit or not, unsloth or not.

SFT, self-correction DPO, rollouts and evaluation all get their model here, so
the quirks are handled once:

* ``backend: auto`` picks unsloth's ``FastLanguageModel`` when CUDA and unsloth
  are present, else transformers + bitsandbytes + peft (the path that also runs
  on CPU).
* bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights for
  inference the first time a layer runs an eval-mode forward; training after
  that breaks (Qwen2 raises, Llama silently loses gradients in early LoRA
  layers). Rollouts and evaluation run between training stages, so every
  ``Linear4bit`` gets ``support_avx512bf16_for_cpu = False`` after loading.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_text
from .default_model import resolve_model
from .errors import UserError
from .recipe import LoraCfg, ModelCfg


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    backend: str  # "transformers" or "unsloth"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def pick_backend(cfg: ModelCfg) -> str:
    if cfg.backend == "unsloth":
        if not cuda_available():
            raise UserError("model.backend: unsloth needs a CUDA GPU; use auto or transformers")
        if not unsloth_available():
            raise UserError("model.backend: unsloth is not installed (pip install -r requirements-gpu.txt)")
        return "unsloth"
    if cfg.backend == "auto" and cuda_available() and unsloth_available():
        return "unsloth"
    return "transformers"


def import_unsloth_first(cfg: ModelCfg) -> str:
    """Resolve the backend and, for unsloth, import it now, before trl and transformers are.

    unsloth patches transformers' and TRL's classes when it is imported; a trainer
    class imported before that stays unpatched (slower, more memory). Stage entry
    points call this first. Returns the backend.
    """
    backend = pick_backend(cfg)
    if backend == "unsloth":
        import unsloth  # noqa: F401  (import for its patches)
    return backend


def torch_dtype(name: str) -> Any:
    """``auto``: bfloat16 on a GPU that computes it natively, float16 on an older GPU, float32 on CPU.

    ``is_bf16_supported()`` alone also says yes on Turing cards (T4, RTX 20xx),
    which only emulate bfloat16, slowly: those get float16.
    """
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


def dtype_name(name: str) -> str:
    """The dtype ``name`` resolves to on this machine (``auto`` -> ``bfloat16``, ...), for step keys."""
    return str(torch_dtype(name)).removeprefix("torch.")


def disable_bnb_cpu_repack(model: Any) -> int:
    """Keep bitsandbytes from repacking 4-bit weights on CPU (see module doc)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def bnb_config(dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        # Models without a pad token: pad with EOS; attention masks keep it out of the loss.
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise UserError(f"{path}: the tokenizer has no chat template; use an instruct/chat model")
    return tok


def load_causal_lm(
    name: str | Path, dtype: Any, *, four_bit: bool = False, on_gpu: bool = True, what: str = "model"
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` as every stage loads a model.

    safetensors only, no remote code; ``four_bit`` loads NF4 through
    bitsandbytes (compute in ``dtype``) with the CPU repack disabled (see the
    module doc); ``on_gpu`` puts it on GPU 0 when CUDA is there. A model that
    cannot be read is a UserError naming ``what`` and ``name``.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    if four_bit:
        kwargs["quantization_config"] = bnb_config(dtype)
    if on_gpu and cuda_available():
        # One GPU per process under `accelerate launch` (LOCAL_RANK), GPU 0 otherwise.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        raise UserError(f"{what} {name}: {str(e).splitlines()[0]}") from None
    if four_bit:
        disable_bnb_cpu_repack(model)
    return model


def load_model(
    cfg: ModelCfg,
    path: str | Path | None = None,
    adapter: str | Path | None = None,
    trainable: bool = False,
    load_in_4bit: bool | None = None,
) -> Loaded:
    """Load the student (``path`` overrides ``cfg.name_or_path``), optionally with an adapter.

    ``trainable`` prepares a 4-bit model for k-bit training and, with an
    adapter, leaves that adapter trainable (DPO continues the previous stage's
    adapter; TRL keeps a frozen copy of it as the reference).
    """
    name = resolve_model(str(path or cfg.name_or_path))
    four_bit = cfg.load_in_4bit if load_in_4bit is None else load_in_4bit
    backend = pick_backend(cfg)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            model_name=str(adapter or name),
            max_seq_length=cfg.max_seq_length,
            load_in_4bit=four_bit,
            dtype=torch_dtype(cfg.dtype),  # ours, not unsloth's guess (which takes emulated bfloat16)
            # The weights named, not unsloth's pre-quantized mirror of them: training, vLLM and export
            # must all read the same base.
            use_exact_model_name=True,
        )
        if not trainable:
            FastLanguageModel.for_inference(model)
        return Loaded(model, tok, backend)

    dtype = torch_dtype(cfg.dtype)
    model = load_causal_lm(name, dtype, four_bit=four_bit)
    tok = load_tokenizer(str(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").exists() else name)
    if trainable and four_bit:
        freeze_for_kbit_training(model, dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    if not trainable:
        model.eval()
    return Loaded(model, tok, backend)


def freeze_for_kbit_training(model: Any, dtype: Any) -> None:
    """Freeze a 4-bit model for LoRA training.

    peft's ``prepare_model_for_kbit_training`` also upcasts every 16-bit weight
    to float32, for float16's range; in bfloat16 that only costs memory: the
    frozen embeddings and LM head of Qwen2.5-7B (2 x 545M parameters) double,
    and the residual stream runs in float32. Measured on a 7B shape
    (bench/gpu_memory.py): SFT's peak 9.9 -> 6.5 GiB, DPO's 14.6 -> 10.8 GiB.
    So bfloat16 only freezes; float32 (CPU) and float16 keep peft's path.
    """
    import torch

    if dtype != torch.bfloat16:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # gradient checkpointing needs an input that requires grad


def lora_config(cfg: LoraCfg) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def random_lora(base: str | Path, out: Path, cfg: LoraCfg, seed: int = 0, scale: float = 0.01) -> Path:
    """Save a LoRA adapter of ``cfg``'s shape on ``base`` with random non-zero B, and the tokenizer.

    peft starts B at zero, so a fresh adapter is a no-op; this one changes the
    logits by about ``scale``. It stands in for a trained adapter where only its
    shape and effect matter: export tests and benchmarks.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, lora_config(cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out)
    canonical_adapter_config(Path(out) / "adapter_config.json")
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def canonical_adapter_config(path: Path) -> None:
    """Rewrite peft's ``adapter_config.json`` with its lists in a fixed order.

    peft keeps ``target_modules`` as a set, so the file lists them in an order
    that changes from process to process (string hashing is salted): the same
    adapter would hash differently, and every step keyed by it would be redone.
    """
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def add_unsloth_lora(loaded: Loaded, cfg: LoraCfg, seed: int) -> Any:
    """unsloth attaches LoRA itself (its gradient checkpointing needs it)."""
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        loaded.model,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_gradient_checkpointing="unsloth",
        random_state=seed,
    )
