"""Stage ``sft``: QLoRA fine-tuning of the student on the teacher's templates.

A thin straight line over TRL's ``SFTTrainer``: the examples are
conversational prompt/completion pairs (question -> template), so TRL applies
the chat template and computes the loss on the assistant part only. The base
is loaded in 4-bit NF4 (bitsandbytes) and LoRA comes from peft, or unsloth's
``FastLanguageModel`` does both on a CUDA machine.

Reads ``<run>/teach/templates.jsonl``; writes ``<run>/sft/adapter/`` (safetensors
LoRA + tokenizer), ``checkpoints/``, ``metrics.jsonl`` and ``manifest.json``.

Batches are grouped by length (``train_sampling_strategy="group_by_length"``,
reseeded per epoch by ``training.kit_trainer``): the same examples, epochs
and completion-only loss as a plain ``SFTTrainer`` script, with less
padding to compute (``bench/sft_step.py`` measures it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from .artifacts import is_complete, read_jsonl, read_manifest, sha256_file, write_manifest
from .errors import UserError
from .prompts import question_messages
from .recipe import Recipe

STAGE = "sft"


def sft_examples(rows: list[dict]) -> list[dict]:
    """Templates -> TRL conversational prompt/completion examples."""
    return [
        {
            "prompt": question_messages(r["question"], r["options"], len(r["answer"]) > 1, r["lang"]),
            "completion": [{"role": "assistant", "content": r["target"]}],
        }
        for r in rows
    ]


def stage_inputs(recipe: Recipe, templates: Path) -> dict[str, str]:
    return {"model": recipe.model.name_or_path, "templates": sha256_file(templates)}


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return {"model": recipe.model.model_dump(), "sft": recipe.sft.model_dump(), "seed": recipe.seed}


def run_sft(
    recipe: Recipe, console: Console | None = None, templates: Path | None = None, callbacks: list | None = None
) -> dict[str, Any]:
    """Train the SFT adapter; skipped when a complete one exists for these inputs.

    ``callbacks``: extra ``TrainerCallback``s (the bench times steps with one).
    """
    console = console or Console(stderr=True)
    run = Path(recipe.output_dir)
    stage_dir = run / STAGE
    templates = templates or run / "teach" / "templates.jsonl"
    if not templates.exists():
        raise UserError(f"{templates}: no templates; run `medcritical teach` first")
    config, inputs = stage_config(recipe), stage_inputs(recipe, templates)
    if is_complete(stage_dir, config, inputs):
        console.print(f"[green]sft: up to date[/] ({stage_dir / 'adapter'})")
        return read_manifest(stage_dir)["metrics"]
    rows = read_jsonl(templates)
    if not rows:
        raise UserError(f"{templates}: no templates were kept; nothing to train on")

    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from .models import add_unsloth_lora, load_model, lora_config, torch_dtype
    from .training import kit_trainer, progress_callback, train_and_save, trainer_args

    loaded = load_model(recipe.model, trainable=True)
    peft_config = lora_config(recipe.sft.lora)
    if loaded.backend == "unsloth":
        loaded.model, peft_config = add_unsloth_lora(loaded, recipe.sft.lora, recipe.seed), None
    args = SFTConfig(
        **trainer_args(recipe.sft.train, stage_dir / "checkpoints", recipe.seed, torch_dtype(recipe.model.dtype)),
        max_length=recipe.sft.max_length,
        completion_only_loss=True,
        packing=False,
        train_sampling_strategy="group_by_length",  # similar lengths per batch: less padding, same examples
    )
    set_seed(recipe.seed)  # TRL creates the LoRA weights before the Trainer seeds anything
    trainer = kit_trainer(SFTTrainer)(
        model=loaded.model,
        args=args,
        train_dataset=Dataset.from_list(sft_examples(rows)),
        processing_class=loaded.tokenizer,
        peft_config=peft_config,
        callbacks=[progress_callback(console, "sft"), *(callbacks or [])],
    )
    metrics = train_and_save(trainer, stage_dir, stage_dir / "adapter", loaded.tokenizer)
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    metrics |= {"examples": len(rows), "tokens": tokens, "backend": loaded.backend}
    if tokens and metrics["seconds"]:
        metrics["tokens_per_second"] = round(tokens / metrics["seconds"], 1)
    write_manifest(stage_dir, STAGE, config, inputs, metrics)
    console.print(
        f"sft: {metrics['steps']} steps, loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f}, "
        f"{metrics['seconds']:.0f}s, peak {metrics['peak_memory_mb']:.0f} MB -> {stage_dir / 'adapter'}"
    )
    return metrics
