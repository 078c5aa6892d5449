"""``medcritical plan RECIPE``: peak GPU memory, RAM and disk per stage, before anything loads.

Every number comes from the model's ``config.json`` (read as JSON, never loaded)
and the recipe, through the formulas below: one term each, with the reason for it
beside it. ``docs/memory.md`` lists the terms, the shipped recipes' estimates and
what has been measured (``tests/test_plan.py`` checks SFT's terms against a real
training process on CPU).

A plan is for one device: a CUDA GPU of ``gpu_gb`` GiB, or the CPU when no GPU
size is known. "GB" in flags and tables means GiB (2^30 bytes), what
``nvidia-smi`` and torch report.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .gguf.file import GPU_RESERVE
from .recipe import Recipe

GIB = 2**30
# Bytes per weight of a bitsandbytes NF4 linear with double quantization: a 4-bit code, an 8-bit absmax per block
# of 64, and an fp32 scale per 256 of those blocks.
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)
# TRL's SFT loss (loss_type chunked_nll, its default) projects hidden states to the vocabulary 256 tokens at a time
# (trl.trainer.sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE). Alive at once: the fp32 logits, their log-softmax, its exp
# (the entropy metric) and the gradient; measured 4.0-4.2 chunks on CPU.
SFT_CHUNK, SFT_CHUNK_COPIES = 256, 4
# DPO materializes the logits of chosen + rejected, all positions: the policy's, the gradient, and a third copy
# (on CPU the gather's dense gradient; measured 3.1 copies there). On CUDA, in bf16, the H200 runs of the 12 GB
# recipe on a 7B shape (bench/measured/gpu_memory_12gb*.json) left 3.1 copies' worth above the other terms at 2048
# tokens; 2 copies under-planned DPO by 12-16%.
DPO_LOGIT_COPIES = {"cpu": 3, "cuda": 3}
PROMPT_TOKENS = 512  # an exam question with its options and the system prompt, chat-templated (an assumption)
# CUDA context, cuBLAS workspace, kernels: taken before torch allocates a tensor. Measured 1.35 GiB on an H200
# (bench/measured/gpu_memory_12gb.json, context_mb); a desktop card's is not measured, and planned the same.
CUDA_CONTEXT = 1.35 * GIB
# TRL's chunked DPO log-probabilities (use_liger_kernel): 2048 tokens x 8192 vocabulary entries at a time
# (trl.trainer.utils._CHUNKED_LOGPROB_TOKEN_CHUNK_SIZE, dpo_trainer._CHUNKED_LOGPROB_CHUNK_SIZE): the 16-bit matmul,
# its fp32 copy, exp and the exp x logit product; the backward recomputes one chunk the same way.
DPO_CHUNK, DPO_VOCAB_CHUNK, DPO_CHUNK_BYTES = 2048, 8192, 2 * (2 + 4 + 4 + 4)
# llama.cpp's compute buffer on the GPU: one micro-batch (512 tokens) of the graph's largest activations: the
# logits (vocab), the MLP's gate and up (2 x intermediate) and a few hidden-sized tensors, in fp32.
LLAMA_UBATCH = 512
ALLOCATOR_SLACK = 0.10  # torch's caching allocator keeps freed blocks: reserved exceeds allocated by about this share
CPU_LIBS = 0.65 * GIB  # RSS of python + torch, transformers, trl, peft, bitsandbytes after import (measured 0.62-0.66)
CPU_RUNTIME = 0.1 * GIB  # a CPU training process's own: tokenizer, tokenized data, trainer (measured 0.06-0.1)
# glibc keeps freed heap memory for reuse, so a CPU process's peak RSS exceeds its peak of live tensors: measured
# 21% (a 4-layer test model) and 47% (SmolLM2-135M, the demo's SFT step).
CPU_SLACK = 0.45
GPU_HOST = 3 * GIB  # host RAM of a GPU training process: the libraries, CUDA's host side, the data (not measured)
VLLM_RUNTIME = 2 * GIB  # vLLM's context, CUDA graphs, activations for its token budget, sampler (not measured)
VLLM_HOST = 4 * GIB  # RAM of the vLLM server process (not measured)
# llama.cpp bits per weight, averaged over a 7-8B model's tensors (K-quants mix types per tensor).
QUANT_BITS = {"f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.7, "q5_0": 5.5, "q5_1": 6.0,
              "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q4_1": 5.0}  # fmt: skip
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's sizes, from its config.json (llama, qwen2, mistral and kin)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: str  # the checkpoint's dtype (what vLLM serves with dtype auto)

    @classmethod
    def of(cls, cfg: dict[str, Any], where: str) -> Arch:
        cfg = cfg.get("text_config") or cfg  # multimodal wrappers keep the language model's sizes inside
        try:
            h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                h, int(cfg["num_hidden_layers"]), heads, int(cfg.get("num_key_value_heads") or heads),
                int(cfg.get("head_dim") or h // heads), int(cfg["intermediate_size"]), int(cfg["vocab_size"]),
                bool(cfg.get("tie_word_embeddings", False)), cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16",
            )  # fmt: skip
        except KeyError as e:
            raise UserError(
                f"{where}: no {e.args[0]}; plan reads decoder-only transformers (llama, qwen2, ...)"
            ) from None

    @property
    def fans(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of a decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    @property
    def linear(self) -> int:  # the weights bitsandbytes quantizes
        return self.layers * sum(a * b for a, b in self.fans.values())

    @property
    def other(self) -> int:  # embeddings, lm_head unless tied, RMSNorms: never quantized
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear + self.other

    def kv_bytes(self, dtype_bytes: int) -> int:
        """KV cache per token: a key and a value per layer per KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass
class Term:
    name: str
    where: str  # "gpu", "ram" or "disk"
    bytes: float
    why: str


@dataclass
class Stage:
    name: str
    step: str  # the pipeline stage it is part of
    terms: list[Term] = field(default_factory=list)
    limit: float | None = None  # its own GPU budget (vLLM: gpu_memory_utilization x the GPU)
    note: str = ""

    def add(self, name: str, where: str, n: float, why: str) -> None:
        if n > 0:
            self.terms.append(Term(name, where, n, why))

    def total(self, where: str) -> float:
        return sum(t.bytes for t in self.terms if t.where == where)

    def largest(self, where: str) -> Term | None:
        return max((t for t in self.terms if t.where == where), key=lambda t: t.bytes, default=None)


# ---- finding config.json ------------------------------------------------------------------------


def model_config(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The model's config (and where it was read): a local directory's config.json, a hub name's in the local
    Hugging Face cache, or for ``default`` the materialized directory's, else the embedded GGUF's metadata.
    No weights are read and nothing is downloaded."""
    from .default_model import DEFAULT_NAME, default_gguf, default_model_dir

    if name_or_path == DEFAULT_NAME:
        path = default_model_dir() / "config.json"
        if not path.is_file():  # not materialized yet: the GGUF's header says the same
            from transformers import AutoConfig

            gguf = default_gguf()
            return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict(), str(gguf)
    elif Path(name_or_path).expanduser().is_dir() or name_or_path.count("/") != 1 or name_or_path[:1] in "./~":
        path = Path(name_or_path).expanduser() / "config.json"
        if not path.is_file():
            raise UserError(f"model.name_or_path {name_or_path}: no config.json there")
    else:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = os.environ.get("HF_HUB_CACHE") or HF_HUB_CACHE
        found = try_to_load_from_cache(name_or_path, "config.json", cache_dir=cache)
        if not isinstance(found, str):
            raise UserError(
                f"model.name_or_path {name_or_path}: no config.json in the local Hugging Face cache ({cache}); "
                "download the model or point model.name_or_path at a local directory"
            )
        path = Path(found)
    return json.loads(path.read_text(encoding="utf-8")), str(path)


# ---- the formulas -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    backend: str  # "transformers" or "unsloth"
    compute: int  # bytes of the compute dtype: bf16/fp16 2, fp32 4
    # Whether the frozen 16-bit weights are upcast to fp32 (peft's prepare_model_for_kbit_training, which
    # medcritical.models.freeze_for_kbit_training keeps for float16 and the CPU; bfloat16 only freezes).
    upcast: bool = False

    @property
    def mem(self) -> str:  # where training tensors live
        return "gpu" if self.kind == "cuda" else "ram"

    @property
    def resid(self) -> int:
        # The residual stream's dtype: fp32 when the embeddings (and norms) were upcast, so every elementwise
        # activation is fp32 and autocast does only matmuls and attention in 16 bits; else the compute dtype.
        return 4 if self.kind == "cpu" or self.upcast else self.compute

    @property
    def attn(self) -> int:  # attention runs in the compute dtype (autocast on CUDA, fp32 on CPU)
        return 4 if self.kind == "cpu" else self.compute


LORA_BYTES = 2  # TRL casts a quantized model's trainable (LoRA) weights to bf16, on every device
MLP = ("gate_proj", "up_proj", "down_proj")


def targeted(arch: Arch, target_modules: list[str] | str) -> list[str]:
    """The projections LoRA wraps (peft: a list of names, ``all-linear``, or a regex on the module path)."""
    if target_modules == "all-linear":
        return list(arch.fans)
    if isinstance(target_modules, str):
        return [
            m
            for m in arch.fans
            if re.fullmatch(target_modules, f"model.layers.0.{'mlp' if m in MLP else 'self_attn'}.{m}")
        ]
    return [m for m in arch.fans if m in target_modules]


def lora_params(arch: Arch, modules: list[str], r: int) -> int:
    return arch.layers * sum(r * sum(arch.fans[m]) for m in modules)


def layer_activations(arch: Arch, dev: Device, modules: list[str], r: int, padded: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer (counted with saved-tensor hooks on CPU).

    ``padded``: a batch of several sequences has padding, so transformers passes SDPA a mask, and with a mask
    SDPA cannot share KV heads: k and v are repeated to every query head first."""
    h, q, kv, i = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate
    n = 2 * h * 4  # the two RMSNorms keep their input upcast to fp32
    n += (4 * q if padded else 2 * q + 2 * kv) * dev.attn  # rotated q and k, v, the output (no seq x seq matrix)
    n += 3 * i * dev.resid  # SwiGLU: gate, up and silu(gate)
    # Each LoRA module keeps its input for A's gradient. peft casts that input to the adapter's dtype: where it
    # differs, one copy per module; else the tensor the base reads (the attention output is counted above).
    source = {"q_proj": ("attn_in", h, dev.resid), "k_proj": ("attn_in", h, dev.resid),
              "v_proj": ("attn_in", h, dev.resid), "o_proj": ("attn_out", q, dev.attn),
              "gate_proj": ("mlp_in", h, dev.resid), "up_proj": ("mlp_in", h, dev.resid),
              "down_proj": ("mlp_act", i, dev.resid)}  # fmt: skip
    shared = {}
    for m in modules:
        tensor, size, dtype = source[m]
        if dtype != LORA_BYTES:
            n += size * LORA_BYTES
        elif tensor != "attn_out":
            shared[tensor] = size * dtype
    return n + sum(shared.values()) + len(modules) * r * LORA_BYTES  # + A's output, the input of B


def optimizer_bytes(optim: str, n: int) -> int:
    # Adam keeps two moments per trainable weight: 1 byte each in bitsandbytes' 8-bit optimizers, else the weights'
    # dtype (torch's AdamW makes them like the parameter: bf16 here).
    return 2 * n if "8bit" in optim else 2 * n * LORA_BYTES


def training(stage: Stage, arch: Arch, dev: Device, recipe: Recipe, train, batch: int, length: int, ref: bool) -> None:
    """The terms of one QLoRA training step: SFT (``ref=False``) or DPO (a frozen reference copy of the adapter)."""
    mem, lora = dev.mem, recipe.sft.lora
    modules = targeted(arch, lora.target_modules)
    n_lora = lora_params(arch, modules, lora.r)
    other = 4 if dev.resid == 4 else dev.compute  # upcast by prepare_model_for_kbit_training (float16, CPU)
    stage.add("NF4 linear weights", mem, arch.linear * NF4, "4-bit NF4 with double quantization")
    stage.add(f"embeddings, lm_head, norms ({'fp32' if other == 4 else '16-bit'})", mem, arch.other * other,
              "never quantized" + ("; fp32 after prepare_model_for_kbit_training" if other == 4 else ""))  # fmt: skip
    stage.add(
        "LoRA weights",
        mem,
        n_lora * LORA_BYTES * (2 if ref else 1),
        f"r={lora.r} on {len(modules)} projections, bf16" + (" (+ TRL's frozen 'ref' copy)" if ref else ""),
    )
    stage.add("LoRA gradients", mem, n_lora * LORA_BYTES, "one per trainable weight")
    stage.add(f"optimizer ({train.optim})", mem, optimizer_bytes(train.optim, n_lora), "Adam's two moments")
    tokens = batch * length
    # Per layer: what each token keeps, and the padding mask SDPA keeps (one seq x seq matrix per sequence).
    per_layer = tokens * layer_activations(arch, dev, modules, lora.r, batch > 1)
    per_layer += batch * length**2 * dev.attn if batch > 1 else 0
    if train.gradient_checkpointing or (dev.backend == "unsloth" and not ref):  # unsloth's SFT always checkpoints
        # Each layer keeps only its input; backward recomputes one layer at a time. unsloth moves the kept inputs
        # to host RAM.
        kept = tokens * arch.layers * arch.hidden * dev.resid
        stage.add("checkpointed layer inputs", "ram" if dev.backend == "unsloth" else mem, kept,
                  "unsloth offloads them to RAM" if dev.backend == "unsloth" else "one per layer")  # fmt: skip
        stage.add("activations (one layer recomputed)", mem, per_layer, f"{batch} x {length} tokens")
    else:
        stage.add("activations", mem, arch.layers * per_layer, f"{batch} x {length} tokens, all layers")
    if ref and dev.kind == "cuda" and train.use_liger_kernel:
        stage.add("logits (chunked log-probabilities)", mem,
                  min(tokens, DPO_CHUNK) * min(arch.vocab, DPO_VOCAB_CHUNK) * DPO_CHUNK_BYTES,
                  f"use_liger_kernel: {DPO_CHUNK} tokens x {DPO_VOCAB_CHUNK} vocabulary entries at a time")  # fmt: skip
    elif ref:
        logit_bytes = 4 if dev.kind == "cpu" else dev.compute
        stage.add("logits", mem, DPO_LOGIT_COPIES[dev.kind] * tokens * arch.vocab * logit_bytes,
                  f"{DPO_LOGIT_COPIES[dev.kind]} copies of (chosen+rejected) x length x vocab")  # fmt: skip
    else:
        stage.add("logits (chunked loss)", mem, SFT_CHUNK_COPIES * min(tokens, SFT_CHUNK) * arch.vocab * 4,
                  f"{SFT_CHUNK_COPIES} fp32 copies of {SFT_CHUNK} tokens x vocab")  # fmt: skip
    stage.add("dequantized weight", mem, max(a * b for a, b in arch.fans.values()) * dev.compute,
              "bitsandbytes dequantizes one 4-bit weight per matmul")  # fmt: skip
    overheads(stage, dev)
    # A checkpoint holds the adapter as trained (bf16; DPO's frozen 'ref' copy too) and the optimizer state; then
    # the final adapter.
    ckpt = n_lora * LORA_BYTES * (2 if ref else 1) + optimizer_bytes(train.optim, n_lora)
    rounds = recipe.rounds.num_rounds if ref else 1
    stage.add("checkpoints + adapter", "disk", rounds * (train.save_total_limit * ckpt + n_lora * LORA_BYTES),
              f"save_total_limit={train.save_total_limit}" + (f", {rounds} rounds" if ref else ""))  # fmt: skip


def overheads(stage: Stage, dev: Device) -> None:
    if dev.kind == "cuda":
        stage.add(
            "allocator slack", "gpu", ALLOCATOR_SLACK * stage.total("gpu"), f"{ALLOCATOR_SLACK:.0%} of the tensors"
        )
        stage.add("CUDA context", "gpu", CUDA_CONTEXT, "context, cuBLAS workspace, kernels")
        stage.add("process", "ram", GPU_HOST, "libraries, CUDA host side, data (rough)")
    else:
        stage.add("allocator slack", "ram", CPU_SLACK * stage.total("ram"), f"glibc's heap, {CPU_SLACK:.0%} (measured)")
        stage.add("training runtime", "ram", CPU_RUNTIME, "tokenizer, tokenized data, trainer (measured)")
        stage.add("libraries", "ram", CPU_LIBS, "python, torch, transformers, trl, peft (measured)")


def engine_of(recipe: Recipe, dev: Device) -> str:
    engine = recipe.rounds.rollouts.engine
    if engine == "auto":  # what medcritical.policy.engine_kind picks on that device: vLLM only where it is set up
        from .serving.vllm import vllm_available

        return ("vllm" if vllm_available() else "transformers") if dev.kind == "cuda" else "llamacpp"
    return engine


def generation(stage: Stage, arch: Arch, dev: Device, recipe: Recipe, engine: str, seqs: int, seq_len: int,
               gpu: float | None, quant: str = "q8_0") -> None:  # fmt: skip
    """Sampling ``seqs`` sequences of up to ``seq_len`` tokens together on ``engine`` (llama.cpp: a ``quant`` GGUF)."""
    lora = recipe.sft.lora
    n_lora = lora_params(arch, targeted(arch, lora.target_modules), lora.r)
    srv = recipe.rounds.rollouts.server
    if engine == "vllm":
        where = "gpu" if dev.kind == "cuda" else "ram"
        dtype = arch.dtype if srv.dtype == "auto" else srv.dtype
        served = DTYPE_BYTES.get(dtype, 2)
        vq = _flag(srv.extra_args, "--quantization")
        max_len = srv.max_model_len or recipe.eval.n_ctx
        stage.add(f"vLLM weights ({vq or dtype})", where,
                  arch.linear * {"bitsandbytes": NF4, "fp8": 1}.get(vq or "", served) + arch.other * served,
                  "the base as served" + (f" (--quantization {vq})" if vq else ", as on disk"))  # fmt: skip
        if srv.lora:
            stage.add("vLLM LoRA slot", where, n_lora * served, "the round's adapter")
        stage.add("KV cache, one sequence", where, max_len * arch.kv_bytes(served),
                  f"vLLM starts only with room for one sequence of max_model_len={max_len}")  # fmt: skip
        stage.add("vLLM runtime", where, VLLM_RUNTIME, "context, CUDA graphs, activations (rough)")
        stage.add("vLLM server process", "ram", VLLM_HOST, "(rough)")
        if gpu is not None and where == "gpu":
            util = srv.gpu_memory_utilization or 0.9  # vLLM's default
            stage.limit = util * gpu
            kv = stage.limit - stage.total("gpu") + max_len * arch.kv_bytes(served)
            stage.note = (f"vLLM takes {util:.0%} of the GPU: KV cache for {max(0, kv) / arch.kv_bytes(served):,.0f} "
                          f"tokens ({seqs} sequences of {seq_len} want {seqs * seq_len:,})")  # fmt: skip
    elif engine in ("llamacpp", "llamacpp-server"):
        # A GGUF of the policy on llama.cpp: an f16 KV stream per sequence decoded together (rounded up to 256
        # tokens), the one-sequence context at eval.n_ctx, and the logits buffer. On a CUDA machine llama.cpp is
        # built for CUDA (setup.sh --gpu) and takes as many layers as fit with room to spare
        # (medcritical.gguf.file.gpu_layers); the rest, or all of it without a GPU, stays in RAM.
        procs = srv.parallel if engine == "llamacpp-server" else 1
        per_seq = -(-min(seq_len, recipe.eval.n_ctx) // 256) * 256
        file = procs * gguf_bytes(arch, quant)
        kv = procs * (seqs * per_seq + recipe.eval.n_ctx) * arch.kv_bytes(2)
        kv_why = f"{seqs} sequences x {per_seq} tokens + one of n_ctx={recipe.eval.n_ctx}"
        if dev.kind != "cuda":
            stage.add(f"{quant} GGUF", "ram", file, "memory-mapped")
            stage.add("KV cache (f16)", "ram", kv, kv_why)
        else:
            room = file if gpu is None else min(file, max(0.0, gpu - GPU_RESERVE))
            stage.add(
                f"{quant} GGUF",
                "gpu",
                room,
                "offloaded" if room == file else f"{room / file:.0%} of its layers offloaded",
            )
            if room < file:
                stage.add(f"{quant} GGUF, layers left on the CPU", "ram", file - room, "memory-mapped")
            stage.add("KV cache (f16)", "gpu" if room == file else "ram", kv, kv_why)
            stage.add("compute buffer", "gpu", procs * LLAMA_UBATCH * (arch.vocab + 2 * arch.intermediate
                      + 4 * arch.hidden) * 4, f"llama.cpp's: a {LLAMA_UBATCH}-token micro-batch, fp32")  # fmt: skip
            stage.add("CUDA context", "gpu", procs * CUDA_CONTEXT, "llama.cpp's (planned as torch's, measured)")
        stage.add("logits buffer", "ram", procs * max(512, seqs) * arch.vocab * 4, "llama.cpp's output buffer")
        stage.add("libraries", "ram", CPU_LIBS, "python, llama.cpp")
    elif engine == "transformers":
        four = recipe.model.load_in_4bit
        stage.add("weights", dev.mem, arch.linear * (NF4 if four else dev.compute) + arch.other * dev.compute,
                  "NF4 linears + 16-bit rest" if four else "model.load_in_4bit: false")  # fmt: skip
        stage.add("LoRA weights (fp32)", dev.mem, n_lora * 4, "peft loads an adapter in fp32")
        stage.add("KV cache", dev.mem, seqs * seq_len * arch.kv_bytes(dev.compute), f"{seqs} sequences x {seq_len}")
        stage.add("dequantized weight", dev.mem, max(a * b for a, b in arch.fans.values()) * dev.compute, "per matmul")
        overheads(stage, dev)
    # engine openai: a server you run elsewhere; nothing here.


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def gguf_bytes(arch: Arch, quant: str) -> float:
    return arch.params * QUANT_BITS[quant] / 8


def stages(recipe: Recipe, arch: Arch, dev: Device, gpu: float | None) -> list[Stage]:
    """Every stage's peak, in the order the pipeline runs them."""
    rounds, exp, ev = recipe.rounds, recipe.export, recipe.eval
    engine = engine_of(recipe, dev)
    p = arch.params
    n_lora = lora_params(arch, targeted(arch, recipe.sft.lora.target_modules), recipe.sft.lora.r)
    sft = Stage("sft", "sft")
    training(sft, arch, dev, recipe, recipe.sft.train, recipe.sft.train.per_device_train_batch_size,
             recipe.sft.max_length, ref=False)  # fmt: skip
    out = [sft]
    if rounds.num_rounds:
        # DPO concatenates chosen and rejected: twice the batch, each up to pairs.max_length.
        dpo = Stage("dpo", "rounds")
        training(dpo, arch, dev, recipe, rounds.dpo.train, 2 * rounds.dpo.train.per_device_train_batch_size,
                 rounds.pairs.max_length, ref=True)  # fmt: skip
        # Rollouts and corrections: a correction's prompt holds the question and the wrong answer.
        roll = Stage(f"rollouts ({engine})", "rounds")
        seq = PROMPT_TOKENS + rounds.rollouts.max_new_tokens + rounds.correction.max_new_tokens
        generation(roll, arch, dev, recipe, engine, rounds.rollouts.batch_size, seq, gpu)
        if engine in ("llamacpp", "llamacpp-server") or (engine == "vllm" and not rounds.rollouts.server.lora):
            policies = rounds.num_rounds + 2  # the base, SFT and each round: merged and converted once each
            roll.add("policy GGUFs (q8_0)", "disk", policies * gguf_bytes(arch, "q8_0"), f"{policies} policies")
            roll.add("selected policy's merged + f16", "disk", 4 * p, "kept for the export")
            roll.note = roll.note or "each policy is merged first (see merge)"
        out += [dpo, roll]
    merge = Stage("merge", "export")
    # medcritical.gguf.merge.compute_dtype: the merge runs in the base's stored dtype when it is 16-bit, else in fp32.
    # dequantized4bit loads NF4 on the GPU and dequantizes it there first. The merged weights are saved 16-bit.
    stored = 2 if arch.dtype in ("bfloat16", "float16") else 4
    name = "16-bit" if stored == 2 else "fp32"
    merge.add(f"base ({name})", "ram", stored * p, f"export.merge_into={exp.merge_into}, in the dtype stored")
    merge.add("adapter (fp32)", "ram", 4 * n_lora, "merged into the weights")
    if exp.merge_into == "dequantized4bit" and dev.kind == "cuda":
        merge.add(f"dequantized base ({name})", "gpu", stored * p, "NF4 dequantized on the GPU")
        merge.add("CUDA context", "gpu", CUDA_CONTEXT, "")
    merge.add("merged weights (16-bit)", "disk", 2 * p, "safetensors, kept for the export")
    merge.add("libraries", "ram", CPU_LIBS, "python, torch, transformers, peft")
    # The export's parity check: first the reference (export.parity.reference_placement: the merged model on a GPU
    # with room for 1.2 times it, else on the CPU, in fp32 up to 2B parameters and 16-bit above), then each GGUF on
    # llama.cpp, the 16-bit one the largest. The converter and llama-quantize stream tensor by tensor.
    reference = Stage("export reference", "export")
    if gpu is not None and 1.2 * 2 * p < gpu:
        reference.add("merged model (16-bit)", "gpu", 2 * p, "the reference the GGUFs are checked against")
        reference.add("CUDA context", "gpu", CUDA_CONTEXT, "")
    else:
        ref = 4 if p <= 2e9 else 2
        reference.add(f"merged model ({'fp32' if ref == 4 else '16-bit'})", "ram", ref * p,
                      "the reference the GGUFs are checked against")  # fmt: skip
    reference.add("libraries", "ram", CPU_LIBS, "python, torch, transformers")
    ggufs = Stage("export ggufs (llamacpp)", "export")
    generation(ggufs, arch, dev, recipe, "llamacpp", 1, PROMPT_TOKENS + ev.max_new_tokens, gpu, exp.outtype)
    for q in list(dict.fromkeys([exp.outtype, *exp.quants])):
        # Each GGUF twice: in the build cache (<run>/policies) and stamped in <run>/export (the bundle links one).
        ggufs.add(f"{q} GGUF x2", "disk", 2 * gguf_bytes(arch, q), "build cache + stamped copy")
    base = Stage(f"eval base ({engine})", "eval")
    generation(base, arch, dev, recipe, engine, ev.batch_size, PROMPT_TOKENS + ev.max_new_tokens, gpu)
    quants = Stage("eval quants (llamacpp)", "eval")  # one at a time: the largest decides
    biggest = max(exp.quants, key=lambda q: QUANT_BITS[q])
    generation(quants, arch, dev, recipe, "llamacpp", ev.batch_size, PROMPT_TOKENS + ev.max_new_tokens, gpu, biggest)
    return [*out, merge, reference, ggufs, base, quants]


# ---- the plan -----------------------------------------------------------------------------------


def sized_for(recipe_path: str | Path | None) -> tuple[float | None, float | None]:
    """(GPU GiB, RAM GiB) from a recipe's header line ``# Sized for: one 12 GB CUDA GPU ...``."""
    if recipe_path is None or not Path(recipe_path).is_file():
        return None, None
    head = "".join(line for line in Path(recipe_path).read_text(encoding="utf-8").splitlines(True)[:5])
    m = re.search(r"Sized for:([^\n]*)", head)
    text = m.group(1) if m else ""
    gpu = re.search(r"(\d+(?:\.\d+)?)\s*GB[^,.]*GPU", text)
    ram = re.search(r"(\d+(?:\.\d+)?)\s*GB RAM", text)
    return (float(gpu.group(1)) if gpu else None), (float(ram.group(1)) if ram else None)


def holders() -> str:
    """Other processes holding memory on the GPU here, for a person to read ("" when none)."""
    from .gpu_check import card, others

    here = card()
    rows = others(here) if here else []
    return ("held by " + ", ".join(f"pid {p} {n} ({m / 1024:.1f} GiB)" for p, n, m in rows)) if rows else ""


def detect_gpu() -> float | None:
    """Free memory in bytes of the first GPU the stages will see, from nvidia-smi (WSL2 too), or None. No CUDA
    context is made: this process (the pipeline's parent) holds none while the stages run."""
    from .gpu_check import card

    here = card()
    return None if here is None else here.free_mib * 2**20


@dataclass
class Plan:
    model: str
    config: str  # where the config was read
    arch: Arch
    device: Device
    gpu: float | None  # bytes; None: no GPU, training on the CPU
    ram: float | None
    disk: float | None
    stages: list[Stage]
    assumptions: list[str]

    def over(self, stage: Stage) -> list[str]:
        """What of the budgets the stage exceeds: ["gpu", "ram"]."""
        out = []
        if self.gpu is not None and stage.total("gpu") > (stage.limit or self.gpu):
            out.append("gpu")
        if self.ram is not None and stage.total("ram") > self.ram:
            out.append("ram")
        return out

    @property
    def disk_total(self) -> float:
        return sum(s.total("disk") for s in self.stages)

    def fits(self) -> bool | None:
        if self.gpu is None and self.ram is None and self.disk is None:
            return None
        return not any(self.over(s) for s in self.stages) and not (self.disk and self.disk_total > self.disk)

    def verdict(self) -> str:
        budgets = [f"{v / GIB:g} GiB {k}" for k, v in (("GPU", self.gpu), ("RAM", self.ram), ("disk", self.disk)) if v]
        if not budgets:
            return "estimates only: no GPU size (--gpu-gb, the recipe's 'Sized for' line, a GPU here) and no --ram-gb"
        bad = [(s, w) for s in self.stages for w in self.over(s)]
        if self.disk and self.disk_total > self.disk:
            return f"does NOT fit {', '.join(budgets)}: the run writes {self.disk_total / GIB:.1f} GiB to disk"
        if not bad:
            return f"fits {', '.join(budgets)}"
        s, w = max(bad, key=lambda b: b[0].total(b[1]) / ((b[0].limit or self.gpu) if b[1] == "gpu" else self.ram))
        have = (s.limit or self.gpu) if w == "gpu" else self.ram
        big = s.largest(w)
        return (f"does NOT fit {', '.join(budgets)}: {s.name} needs {s.total(w) / GIB:.1f} GiB of {w.upper()} "
                f"(has {have / GIB:.1f}); largest term: {big.name} {big.bytes / GIB:.1f} GiB")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        gib = lambda v: None if v is None else round(v / GIB, 3)  # noqa: E731
        return {
            "model": self.model,
            "config": str(self.config),
            "device": self.device.kind,
            "backend": self.device.backend,
            "gpu_gib": gib(self.gpu),
            "ram_gib": gib(self.ram),
            "disk_gib": gib(self.disk),
            "fits": self.fits(),
            "verdict": self.verdict(),
            "assumptions": self.assumptions,
            "stages": [
                {
                    "stage": s.name,
                    "part_of": s.step,
                    **{f"{w}_gib": gib(s.total(w)) for w in ("gpu", "ram", "disk")},
                    "gpu_limit_gib": gib(s.limit),
                    "over": self.over(s),
                    "note": s.note,
                    "largest": {w: s.largest(w).name for w in ("gpu", "ram", "disk") if s.largest(w)},
                    "terms": [{"name": t.name, "where": t.where, "gib": gib(t.bytes), "why": t.why} for t in s.terms],
                }
                for s in self.stages
            ],  # fmt: skip
            "disk_total_gib": gib(self.disk_total),
        }


def make_plan(recipe: Recipe, recipe_path: str | Path | None = None, *, gpu_gb: float | None = None,
              ram_gb: float | None = None, disk_gb: float | None = None, detect: bool = True) -> Plan:  # fmt: skip
    """The plan for a GPU of ``gpu_gb`` GiB (default: the recipe's header, else the GPU here), else the CPU."""
    import importlib.util

    cfg, config = model_config(recipe.model.name_or_path)
    arch = Arch.of(cfg, config)
    head_gpu, head_ram = sized_for(recipe_path)
    here = detect_gpu() if detect else None
    held = holders() if here else ""
    gpu, source = next(((g * GIB, why) for g, why in ((gpu_gb, "--gpu-gb"), (head_gpu, "the recipe's 'Sized for' line"))
                        if g), (here, "the GPU here"))  # fmt: skip
    ram = ram_gb * GIB if ram_gb else (head_ram * GIB if head_ram else None)
    cuda = gpu is not None
    m = recipe.model
    # auto, as medcritical.models.pick_backend: unsloth when it is installed beside a CUDA GPU. Planning for a GPU
    # that is not here, the GPU setup is assumed (requirements-gpu.txt installs unsloth).
    if not cuda:
        backend, why = "transformers", "the CPU"
    elif m.backend != "auto":
        backend, why = m.backend, "model.backend"
    elif importlib.util.find_spec("unsloth") is not None:
        backend, why = "unsloth", "auto: installed"
    elif here:
        backend, why = "transformers", "auto: unsloth is not installed"
    else:
        backend, why = "unsloth", "auto: what requirements-gpu.txt installs"
    # auto on a GPU: bfloat16 (every card since Ampere; medcritical.models.torch_dtype gives Turing float16).
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if cuda else "float32")
    upcast = not cuda or (backend == "transformers" and dtype != "bfloat16")
    dev = Device("cuda" if cuda else "cpu", backend, DTYPE_BYTES[dtype], upcast)
    compute = dev.compute
    a = arch
    assumptions = [
        f"model {m.name_or_path}: {a.params / 1e9:.2f}B parameters ({a.layers} layers, hidden {a.hidden}, "
        f"{a.heads}/{a.kv_heads} heads, intermediate {a.intermediate}, vocab {a.vocab}"
        f"{', tied embeddings' if a.tied else ''}) from {config}",
        f"device: {f'a CUDA GPU of {gpu / GIB:g} GiB ({source})' if cuda else 'the CPU'}; backend {backend} ({why}"
        f"{'; plan another with model.backend=...' if cuda else ''}); compute {'fp32' if compute == 4 else '16-bit'}",
        f"rollouts on {engine_of(recipe, dev)}; prompts of {PROMPT_TOKENS} tokens assumed",
    ]
    if held and source == "the GPU here":
        assumptions.append(f"the GPU here: its free memory; {held}")
    return Plan(m.name_or_path, config, arch, dev, gpu, ram, disk_gb * GIB if disk_gb else None,
                stages(recipe, arch, dev, gpu), assumptions)  # fmt: skip


def _cell(s: Stage, where: str) -> str:
    v = f"{s.total(where) / GIB:.2f}" if s.total(where) else "-"
    return v + (f" (of {s.limit / GIB:.1f})" if where == "gpu" and s.limit else "")


def render(plan: Plan, console: Any) -> None:
    """One table: a row per stage, the GiB it needs where, its largest term, and whether it fits."""
    from rich.table import Table

    t = Table(title=f"medcritical plan: {plan.model}", title_justify="left")
    for col in ("stage", "GPU GiB", "RAM GiB", "disk GiB", "fits"):  # whole; the terms take the width left
        t.add_column(col, justify="right" if "GiB" in col else "left", no_wrap=True)
    t.add_column("largest term (GiB)", ratio=1, overflow="fold")
    t.add_column("other terms (GiB)", ratio=2, overflow="fold")
    main = "gpu" if plan.gpu is not None else "ram"
    for s in plan.stages:
        over = plan.over(s)
        fit = "-" if plan.fits() is None else ("[red]NO: " + "+".join(over).upper() if over else "[green]yes")
        big = s.largest(main) or s.largest("ram") or s.largest("disk")
        rest = sorted((x for x in s.terms if x.where == big.where and x is not big), key=lambda x: -x.bytes)
        others = ", ".join(f"{x.name} {x.bytes / GIB:.2f}" for x in rest) + (f"; {s.note}" if s.note else "")
        t.add_row(s.name, _cell(s, "gpu"), _cell(s, "ram"), _cell(s, "disk"), fit, f"{big.name} {big.bytes / GIB:.2f}",
                  others)  # fmt: skip
    console.print(t)
    for line in plan.assumptions:
        console.print(f"[dim]{line}", highlight=False, soft_wrap=True)
    console.print(f"disk written by the run: {plan.disk_total / GIB:.1f} GiB (the base model itself not counted)")
    ok = plan.fits()
    color = "yellow" if ok is None else "green" if ok else "red"
    console.print(f"[{color}]{plan.verdict()}", highlight=False, soft_wrap=True)


# What `medcritical run` checks before it starts: the stages it will run, against the GPU here.


def refuse_if_too_big(recipe: Recipe, recipe_path: str | Path, steps: list[str]) -> None:
    """Raise a one-line UserError when a CUDA GPU is here and a stage to run needs more of it than it has."""
    total = detect_gpu()
    if total is None:
        return
    try:
        plan = make_plan(recipe, None, gpu_gb=total / GIB)
    except UserError:
        return  # no config.json: the stage that loads the model says so
    held = holders()
    for s in plan.stages:
        if s.step in steps and "gpu" in plan.over(s):
            big = s.largest("gpu")
            raise UserError(
                f"{recipe_path}: {s.name} needs about {s.total('gpu') / GIB:.1f} GiB of GPU memory, more than the "
                f"{(s.limit or total) / GIB:.1f} free for it here (largest term: {big.name} {big.bytes / GIB:.1f} "
                f"GiB); see `medcritical plan {recipe_path}`" + (f"; the GPU is also {held}" if held else "")
            )


# ---- hours ---------------------------------------------------------------------------------------
# Hours per stage on a named card: the tokens each stage trains on or generates, from the recipe, over a throughput
# for that card. Each throughput is a figure measured here or a published benchmark, scaled to the card by its peak
# 16-bit tensor TFLOPS (training, batched decoding) or its memory bandwidth (decoding).


@dataclass(frozen=True)
class Card:
    name: str
    gb: float  # GiB of memory
    tflops: float  # dense FP16/BF16 tensor TFLOPS with FP32 accumulate
    bandwidth: float  # GB/s
    source: str


CARDS = {
    "rtx3060": Card("RTX 3060 12GB", 12, 25.4, 360, "NVIDIA RTX 3060 specifications (GeForce Ampere: FP16 tensor with "
                    "FP32 accumulate at 2x its 12.7 FP32 TFLOPS)"),
    "rtx4090": Card("RTX 4090", 24, 165.2, 1008, "NVIDIA Ada Lovelace architecture whitepaper"),
    "a100": Card("A100 80GB SXM", 80, 312, 2039, "NVIDIA A100 datasheet"),
    "h100": Card("H100 SXM", 80, 989, 3350, "NVIDIA H100 datasheet"),
}  # fmt: skip
H200_TFLOPS = 989  # NVIDIA H200 datasheet (dense BF16), the card of the measurement below
# QLoRA SFT of a 7.6B student, 2048 tokens, gradient checkpointing, transformers backend: 2938 tokens/s on an H200.
SFT_TOKENS_PER_S = (2938.4, "measured here: bench/measured/gpu_memory_12gb.json (H200, transformers backend)")
# DPO per token: the policy's forward, the recomputed forward and the backward (6 FLOPs per parameter, as SFT),
# plus the reference forward (2): SFT's rate x 6/8.
DPO_SHARE = 6 / 8
# llama.cpp decoding reads every weight once per step: llama 7B Q8_0 (7.16 GB) at 98.1 tokens/s on an RTX 4090
# (1008 GB/s) is 70% of its bandwidth used.
LLAMA_BW_SHARE = (98.13 * 7.16 / 1008, "llama.cpp PR #4766 (RTX 4090, llama 7B Q8_0, tg128 98.1 t/s)")
# Many sequences at once are compute-bound past some batch: 1892 tokens/s for 16 tokens a batch on an RTX 4090.
LLAMA_BATCH_CAP = (1891.88, "llama.cpp PR #15131 (RTX 4090, llama 8B Q4_0, 16-token batches, 1892 t/s)")
# vLLM, a 7B in bf16 on an RTX 4090: 1190 output tokens/s at 48 concurrent requests (256 in, 128 out).
VLLM_TOKENS_PER_S = (1190, "published benchmark: Mistral-7B on vLLM, RTX 4090, concurrency 48 (mushfiqrahman.dev)")
# Assumptions, not measured: a generation stops at its answer, on average at half of max_new_tokens, and an SFT or
# DPO example fills half of max_length; the student is wrong on 40% of its rollouts (each gets corrections).
FILL, WRONG = 0.5, 0.4
EXPORT_HOURS = 0.3  # merge, convert, quantize: streamed from disk (assumed, not measured)


def custom_card(gb: float, tflops: float) -> Card:
    # Bandwidth unknown: a card of the RTX 4090's balance (GB/s per TFLOPS).
    return Card(f"{gb:g} GB, {tflops:g} TFLOPS", gb, tflops, tflops * 1008 / 165.2, "--gpu-gb/--tflops (bandwidth "
                "scaled from the RTX 4090's ratio)")  # fmt: skip


@dataclass
class Hours:
    stage: str
    tokens: float  # trained on or generated
    what: str  # "trained" or "generated"
    rate: float  # tokens/s
    hours: float | None  # None: not planned here (the teacher's server)
    note: str


def decode_rate(card: Card, arch: Arch, engine: str, streams: int, context: int) -> tuple[float, str]:
    """Tokens/s of ``streams`` sequences decoded together, at ``context`` tokens of KV cache each."""
    if engine == "vllm":
        return VLLM_TOKENS_PER_S[0] * card.bandwidth / 1008, VLLM_TOKENS_PER_S[1] + ", scaled by bandwidth"
    # llama.cpp on a q8_0 GGUF: a step reads the weights and each stream's KV cache.
    step = (gguf_bytes(arch, "q8_0") + streams * context * arch.kv_bytes(2)) / (
        card.bandwidth * 1e9 * LLAMA_BW_SHARE[0]
    )
    cap = LLAMA_BATCH_CAP[0] * card.tflops / 165.2
    rate = min(streams / step, cap)
    why = f"{LLAMA_BW_SHARE[1]}, {streams} streams" + (f"; capped by {LLAMA_BATCH_CAP[1]}" if rate == cap else "")
    return rate, why


def data_size(recipe: Recipe) -> tuple[int, int] | None:
    """(train, dev) questions: counted in the data when it is here, else from every source's ``limit``."""
    from .data import load_recipe_data

    try:
        return len(load_recipe_data(recipe.data, split="train")), len(load_recipe_data(recipe.data, split="dev"))
    except (UserError, OSError):
        pass
    if not all(s.limit for s in recipe.data.sources):
        return None
    n = sum(s.limit for s in recipe.data.sources)
    return round(n * (1 - recipe.data.dev - recipe.data.test)), round(n * recipe.data.dev)


def hours(recipe: Recipe, arch: Arch, card: Card, engine: str, size: tuple[int, int]) -> list[Hours]:
    train_n, dev_n = size
    train_rate = SFT_TOKENS_PER_S[0] * card.tflops / H200_TFLOPS
    train_why = f"{SFT_TOKENS_PER_S[1]}, scaled by TFLOPS ({card.source})"
    t, r, ev = recipe.teach, recipe.rounds, recipe.eval
    out = []
    if t.backend != "dataset":
        gen = train_n * t.samples * t.max_tokens * FILL
        out.append(Hours("teach", gen, "generated", 0, None, f"by the teacher ({t.model}), on its own server: not "
                         f"planned here; up to {t.samples} attempts per question"))  # fmt: skip
    sft = train_n * recipe.sft.max_length * FILL * recipe.sft.train.num_train_epochs
    out.append(Hours("sft", sft, "trained", train_rate, sft / train_rate / 3600, train_why))
    q = min(r.rollouts.questions or train_n, train_n)
    if r.num_rounds:
        prompt = PROMPT_TOKENS
        roll = q * r.rollouts.k * r.rollouts.max_new_tokens * FILL
        streams = r.rollouts.batch_size if engine != "vllm" else r.rollouts.server.concurrency
        rate, why = decode_rate(card, arch, engine, streams, int(prompt + r.rollouts.max_new_tokens * FILL))
        out.append(Hours(f"rollouts x{r.num_rounds} ({engine})", r.num_rounds * roll, "generated", rate,
                         r.num_rounds * roll / rate / 3600, why))  # fmt: skip
        corr = q * r.rollouts.k * WRONG * r.correction.attempts * r.correction.max_new_tokens * FILL
        ctx = int(prompt + (r.rollouts.max_new_tokens + r.correction.max_new_tokens) * FILL)
        rate, why = decode_rate(card, arch, engine, streams, ctx)
        out.append(Hours(f"corrections x{r.num_rounds}", r.num_rounds * corr, "generated", rate,
                         r.num_rounds * corr / rate / 3600, f"{WRONG:.0%} of rollouts wrong (assumed); {why}"))  # fmt: skip
        dpo = q * r.pairs.max_per_question * 2 * r.pairs.max_length * FILL * r.dpo.train.num_train_epochs
        rate = train_rate * DPO_SHARE
        out.append(Hours(f"dpo x{r.num_rounds}", r.num_rounds * dpo, "trained", rate, r.num_rounds * dpo / rate / 3600,
                         f"up to {r.pairs.max_per_question} pairs per question; SFT's rate x 6/8 (+ reference pass)"))  # fmt: skip
        gen = r.num_rounds * dev_n * ev.max_new_tokens * FILL
        rate, why = decode_rate(card, arch, "llamacpp", ev.batch_size, int(prompt + ev.max_new_tokens * FILL))
        out.append(Hours(f"round evals x{r.num_rounds}", gen, "generated", rate, gen / rate / 3600, why))
    exp = recipe.export
    gen = exp.parity_questions * ev.max_new_tokens * FILL * (1 + len(exp.quants))
    rate, why = decode_rate(card, arch, "llamacpp", 1, int(PROMPT_TOKENS + ev.max_new_tokens * FILL))
    out.append(Hours("export", gen, "generated", rate, EXPORT_HOURS + gen / rate / 3600,
                     f"parity answers; merge, convert, quantize {EXPORT_HOURS} h (assumed)"))  # fmt: skip
    gen = dev_n * ev.max_new_tokens * FILL * (1 + len(exp.quants))
    rate, why = decode_rate(card, arch, "llamacpp", ev.batch_size, int(PROMPT_TOKENS + ev.max_new_tokens * FILL))
    out.append(Hours("eval", gen, "generated", rate, gen / rate / 3600, f"the base and each quant on dev; {why}"))
    return out


def total_hours(rows: list[Hours]) -> float:
    return sum(h.hours for h in rows if h.hours is not None)


def render_hours(rows: list[Hours], card: Card, size: tuple[int, int], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"hours on one {card.name} ({size[0]:,} train / {size[1]:,} dev questions)", title_justify="left")
    for col in ("stage", "tokens", "tokens/s", "hours"):
        t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    t.add_column("source", ratio=1, overflow="fold")
    for h in rows:
        t.add_row(h.stage, f"{h.tokens / 1e6:.1f}M {h.what}", f"{h.rate:,.0f}" if h.rate else "-",
                  f"{h.hours:.1f}" if h.hours is not None else "apart", h.note)  # fmt: skip
    console.print(t)
    apart = " (the teacher apart)" if any(h.hours is None for h in rows) else ""
    console.print(f"total: {total_hours(rows):.1f} h{apart}; assumed: generations stop at {FILL:.0%} of "
                  f"max_new_tokens, examples fill {FILL:.0%} of max_length", highlight=False)  # fmt: skip
