"""Stage ``sft``: QLoRA fine-tuning of the student on the teacher's templates.

A thin straight line over TRL's ``SFTTrainer``: the examples are
conversational prompt/completion pairs (question -> template), so TRL applies
the chat template and computes the loss on the assistant part only. The base
is loaded in 4-bit NF4 (bitsandbytes) and LoRA comes from peft, or unsloth's
``FastLanguageModel`` does both on a CUDA machine.

Reads ``<run>/teach/templates.jsonl``; writes ``<run>/sft/`` (one step: ``adapter/``
(safetensors LoRA + tokenizer), ``checkpoints/``, ``metrics.jsonl``, ``manifest.json``).
The step's key covers the base model's files, the ``sft`` section, the seed, the examples
themselves, the resolved backend and dtype, the training libraries' versions and the
world size, so a changed knob retrains from scratch (the old directory moves to
``.stale``) and only a run killed with the same key resumes from its checkpoints.

An example whose prompt and template together exceed ``sft.max_length`` tokens
would be cut before its answer line; it is dropped and counted instead.

Batches are grouped by length (``train_sampling_strategy="group_by_length"``,
reseeded per epoch by ``training.kit_trainer``): the same examples, epochs
and completion-only loss as a plain ``SFTTrainer`` script, with less
padding to compute (``bench/sft_step.py`` measures it).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from .artifacts import model_fingerprint, read_jsonl, sha256_json
from .errors import UserError
from .layout import RunDir
from .prompts import question_messages
from .recipe import Recipe
from .steps import Step

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


def step(recipe: Recipe, run_dir: RunDir, examples: list[dict], train: bool = False) -> Step:
    """The SFT step (``train``: this process trains it, see :func:`medcritical.training.training_step`)."""
    from .default_model import resolve_model
    from .training import stack, training_step

    material = {
        "model": recipe.model.model_dump(include={"load_in_4bit", "max_seq_length"}),
        "base": model_fingerprint(resolve_model(recipe.model.name_or_path)),
        "stack": stack(recipe.model, "trl", "accelerate"),
        "sft": recipe.sft.model_dump(),
        "seed": recipe.seed,
        "examples": sha256_json(examples),
    }
    return training_step("sft", run_dir.sft, material, train=train, stale_root=run_dir.stale, label="sft")


def check(recipe: Recipe, run_dir: RunDir, console: Console) -> None:
    """Refuse unless the SFT adapter is complete for this recipe and the templates there."""
    rows = read_jsonl(run_dir.templates) if run_dir.templates.is_file() else []
    step(recipe, run_dir, sft_examples(rows)).require()


def fits(tokenizer: Any, examples: list[dict], max_length: int) -> tuple[list[dict], int]:
    """The examples whose prompt + completion fit in ``max_length`` tokens, and how many did not."""
    kept = []
    for ex in examples:
        ids = tokenizer.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True)
        n = len(ids["input_ids"] if isinstance(ids, dict) else ids)
        if n <= max_length:
            kept.append(ex)
    return kept, len(examples) - len(kept)


def run(recipe: Recipe, run_dir: RunDir, console: Console, callbacks: list | None = None) -> dict[str, Any]:
    """Train the SFT adapter; skipped when a complete one exists for this key.

    ``callbacks``: extra ``TrainerCallback``s (the bench times steps with one).
    """
    from .models import import_unsloth_first

    import_unsloth_first(recipe.model)  # before anything imports transformers or trl
    if not run_dir.templates.exists():
        raise UserError(f"{run_dir.templates}: no templates; run `medcritical teach` first")
    rows = read_jsonl(run_dir.templates)
    if not rows:
        raise UserError(f"{run_dir.templates}: no templates were kept; nothing to train on")
    examples = sft_examples(rows)
    st = step(recipe, run_dir, examples, train=True)

    from .training import main_process_begin

    if main_process_begin(st, console) == "complete":
        console.print(f"[green]sft: up to date[/] ({run_dir.sft_adapter})")
        return st.metrics()

    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from .models import add_unsloth_lora, load_model, lora_config, torch_dtype
    from .training import kit_trainer, progress_callback, train_and_save, trainer_args

    loaded = load_model(recipe.model, trainable=True)
    examples, too_long = fits(loaded.tokenizer, examples, recipe.sft.max_length)
    if too_long:
        console.print(
            f"[yellow]sft: dropped {too_long} of {len(rows)} templates longer than sft.max_length="
            f"{recipe.sft.max_length} tokens (they would be cut before their answer line)[/]"
        )
    if not examples:
        raise UserError(f"sft: every template is longer than sft.max_length={recipe.sft.max_length}; raise it")
    peft_config = lora_config(recipe.sft.lora)
    if loaded.backend == "unsloth":
        loaded.model, peft_config = add_unsloth_lora(loaded, recipe.sft.lora, recipe.seed), None
    args = SFTConfig(
        **trainer_args(recipe.sft.train, run_dir.sft_checkpoints, recipe.seed, torch_dtype(recipe.model.dtype)),
        max_length=recipe.sft.max_length,
        completion_only_loss=True,
        packing=False,
        train_sampling_strategy="group_by_length",  # similar lengths per batch: less padding, same examples
    )
    set_seed(recipe.seed)  # TRL creates the LoRA weights before the Trainer seeds anything
    trainer = kit_trainer(SFTTrainer)(
        model=loaded.model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=loaded.tokenizer,
        peft_config=peft_config,
        callbacks=[progress_callback(console, "sft"), *(callbacks or [])],
    )
    metrics = train_and_save(trainer, run_dir.sft, run_dir.sft_adapter, loaded.tokenizer)
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    metrics |= {"examples": len(examples), "too_long": too_long, "tokens": tokens, "backend": loaded.backend}
    if tokens and metrics["seconds"]:
        metrics["tokens_per_second"] = round(tokens / metrics["seconds"], 1)
    if trainer.is_world_process_zero():
        st.done(metrics, outputs=["adapter"])
    console.print(
        f"sft: {metrics['steps']} steps, loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f}, "
        f"{metrics['seconds']:.0f}s, peak {metrics['peak_memory_mb']:.0f} MB -> {run_dir.sft_adapter}"
    )
    return metrics
