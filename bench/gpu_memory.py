"""Peak GPU memory of a recipe's SFT and DPO steps on a 7B-shaped student.

    python bench/gpu_memory.py --recipe recipes/qwen2.5-7b_12gb.yaml --tokenizer DIR --out RESULT.json
    python bench/gpu_memory.py --shape tiny --tokenizer DIR --out /tmp/gpu_memory.json   # the same course, small, CPU

No hub: the student is Qwen2.5-7B-Instruct's architecture (its config.json
values below) with random weights, saved in bfloat16 like the real one and
loaded the way every stage loads it (NF4 through bitsandbytes). Random weights
train and use memory exactly like trained ones of the same shape; only the
losses mean nothing. ``--tokenizer``: a Qwen2 tokenizer directory with a chat
template (tests/tiny_models.py builds one offline).

Each part runs medcritical's own stage code with the recipe as written, apart
from what keeps it short: ``max_steps`` (2 optimizer steps of
``gradient_accumulation_steps`` micro-batches) and the model path. Every
example is as long as the recipe allows (``sft.max_length``,
``rounds.pairs.max_length``), so the peak is the recipe's worst case. SFT and
DPO run in their own processes, so each peak is its own:

* ``peak_allocated_mb``: torch's ``max_memory_allocated``, the tensors;
* ``peak_reserved_mb``: ``max_memory_reserved``, what torch's caching
  allocator held (what a card must have, less the CUDA context);
* ``context_mb``: device memory in use that torch did not reserve (CUDA
  context, cuBLAS workspace), read at the end;
* ``card_mb`` = reserved + context: what the card needs;
* ``load_peak_allocated_mb``: the peak while loading (quantizing) the model,
  before the trainer starts; the peaks above are reset then, so they are the
  training's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen2.5-7B-Instruct's config.json (architecture only).
SHAPES = {
    "qwen2.5-7b": {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1e6,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 4096, "rope_theta": 1e6,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
}  # fmt: skip
EXAMPLES = 32  # 2 optimizer steps at the 12/24 GB recipes' gradient_accumulation_steps=16
SENTENCE = (
    "The patient's findings point to the diagnosis: the history, the examination and the laboratory values "
    "agree, and the other options each contradict one of them. "
)


def build_model(shape: str, tokenizer: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = Qwen2Config(**SHAPES[shape], bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()


def filler(tok, n_tokens: int) -> str:
    """Text of about ``n_tokens`` tokens ending in an answer line."""
    per = len(tok(SENTENCE, add_special_tokens=False).input_ids)
    return SENTENCE * max(1, n_tokens // per) + "\nAnswer: B"


def write_inputs(recipe, run, tok) -> tuple[Path, Path]:
    """Templates at ``sft.max_length`` and pairs at ``rounds.pairs.max_length`` (the recipe's worst case)."""
    from medcritical.artifacts import atomic_write_text
    from medcritical.prompts import question_messages

    q = {"question": "A 45-year-old has crushing chest pain for 2 hours. Which serum marker rises first?",
         "options": {"A": "Troponin I", "B": "Myoglobin", "C": "CK-MB", "D": "LDH", "E": "AST"}}  # fmt: skip
    prompt = question_messages(q["question"], q["options"], False, "en")
    n_prompt = len(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"])
    sft_text = filler(tok, recipe.sft.max_length - n_prompt - 48)
    templates = [{**q, "answer": "B", "lang": "en", "target": sft_text, "id": f"q{i}"} for i in range(EXAMPLES)]
    run.templates.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.templates, "".join(json.dumps(t) + "\n" for t in templates))
    pair_text = filler(tok, recipe.rounds.pairs.max_length - n_prompt - 48)
    pairs = [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": pair_text}],
         "rejected": [{"role": "assistant", "content": pair_text.replace("Answer: B", "Answer: A")}]}
        for _ in range(EXAMPLES)
    ]  # fmt: skip
    pairs_path = run.root / "pairs.jsonl"
    atomic_write_text(pairs_path, "".join(json.dumps(p) + "\n" for p in pairs))
    return run.templates, pairs_path


def card_memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        from medcritical.training import peak_memory_mb

        return {"peak_rss_mb": round(peak_memory_mb(), 1)}
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    out = {
        "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        "context_mb": (total - free - reserved) / 2**20,
    }
    out["card_mb"] = out["peak_reserved_mb"] + out["context_mb"]
    return {k: round(v, 1) for k, v in out.items()}


def load_peak_callback(seen: dict) -> object:
    """Record the loading peak when training begins, then reset the peak counters."""
    import torch
    from transformers import TrainerCallback

    class LoadPeak(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                seen["load_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                torch.cuda.reset_peak_memory_stats()

    return LoadPeak()


def part(name: str, args: argparse.Namespace) -> dict:
    """One part in this process: ``sft`` or ``dpo`` (after ``sft``)."""
    from rich.console import Console

    from medcritical.dpo import run_dpo
    from medcritical.layout import RunDir
    from medcritical.models import import_unsloth_first, pick_backend
    from medcritical.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides(args))
    import_unsloth_first(recipe.model)
    run = RunDir.of(recipe)
    console = Console(stderr=True, width=160)
    t0 = time.perf_counter()
    seen: dict = {}
    if name == "sft":
        from medcritical import sft

        metrics = sft.run(recipe, run, console, callbacks=[load_peak_callback(seen)])
    else:
        metrics = run_dpo(recipe, run.root / "pairs.jsonl", run.sft_adapter, run.root / "dpo", console,
                          callbacks=[load_peak_callback(seen)])  # fmt: skip
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, type(None)))}
    return {"part": name, "backend": pick_backend(recipe.model), "wall_seconds": round(time.perf_counter() - t0, 1),
            **card_memory(), **seen, "metrics": metrics}  # fmt: skip


SETTINGS = ("sft.max_length", "rounds.pairs.max_length", "sft.lora.r", "sft.train.per_device_train_batch_size",
            "sft.train.gradient_accumulation_steps", "sft.train.gradient_checkpointing", "sft.train.optim",
            "rounds.dpo.train.per_device_train_batch_size", "rounds.dpo.train.gradient_accumulation_steps",
            "rounds.dpo.train.gradient_checkpointing", "rounds.dpo.train.optim",
            "rounds.dpo.precompute_ref_log_probs")  # fmt: skip


def settings(recipe) -> dict:
    """The recipe values the memory depends on, as measured (``medcritical plan`` is checked against them)."""
    out = {}
    for dotted in SETTINGS:
        value = recipe
        for part in dotted.split("."):
            value = getattr(value, part)
        out[dotted] = value
    return out


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model.name_or_path={args.work / 'model'}",
        f"output_dir={args.work / 'run'}",
        "sft.train.max_steps=2",
        "sft.train.save_steps=100000",
        "sft.train.logging_steps=1",
        "rounds.dpo.train.max_steps=2",
        "rounds.dpo.train.save_steps=100000",
        "rounds.dpo.train.logging_steps=1",
        *args.set,
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "qwen2.5-7b_12gb.yaml"))
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-7b")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-memory"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="key=value", help="another recipe override")
    ap.add_argument("--part", choices=["sft", "dpo"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print("RESULT " + json.dumps(part(args.part, args)), flush=True)
        return 0

    import torch
    from transformers import AutoTokenizer

    from medcritical.layout import RunDir
    from medcritical.recipe import load_recipe

    result: dict = {
        "recipe": args.recipe,
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "overrides": overrides(args),
    }
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
    result["versions"] = {
        m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft", "bitsandbytes")
    }
    t0 = time.perf_counter()
    build_model(args.shape, args.tokenizer, args.work / "model")
    result["build_seconds"] = round(time.perf_counter() - t0, 1)
    recipe = load_recipe(args.recipe, overrides(args))
    result["settings"] = settings(recipe)
    write_inputs(recipe, RunDir.of(recipe), AutoTokenizer.from_pretrained(args.tokenizer))
    for name in ("sft", "dpo"):
        cmd = [sys.executable, __file__, "--part", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        result[name] = (
            json.loads(lines[-1][7:]) if lines else {"failed": proc.returncode, "stdout": proc.stdout[-2000:]}
        )
        print(name, json.dumps(result[name]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all("failed" not in result[n] for n in ("sft", "dpo")) else 1


if __name__ == "__main__":
    sys.exit(main())
