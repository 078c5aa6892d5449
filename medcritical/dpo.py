"""Stage ``dpo``: one round of preference training on self-correction pairs.

A thin line over TRL's ``DPOTrainer``. The policy is the 4-bit base plus the
previous stage's LoRA adapter, loaded trainable; handed a PeftModel with a
trained adapter, TRL adds a frozen copy of it named ``ref`` and computes the
reference log-probs through that copy. So the reference is exactly the round's
starting policy, with no second base model in memory. With
``precompute_ref_log_probs`` the reference pass runs once before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from .artifacts import read_jsonl
from .errors import UserError
from .recipe import Recipe


def run_dpo(
    recipe: Recipe,
    pairs_path: Path,
    start_adapter: Path,
    out_dir: Path,
    console: Console,
    callbacks: list | None = None,
    label: str = "dpo",
) -> dict[str, Any]:
    """Train ``out_dir/adapter`` from ``start_adapter`` on the pairs (checkpoints in
    ``out_dir/checkpoints``, logs in ``out_dir/metrics.jsonl``); returns metrics.

    ``callbacks``: extra ``TrainerCallback``s. Whether to run at all is the
    caller's step's call (:mod:`medcritical.rounds`).
    """
    pairs = read_jsonl(pairs_path)
    if not pairs:
        raise UserError(f"{pairs_path}: no preference pairs this round; nothing to train on")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from .models import load_model, torch_dtype
    from .training import kit_trainer, progress_callback, train_and_save, trainer_args

    cfg = recipe.rounds.dpo
    loaded = load_model(recipe.model, adapter=start_adapter, trainable=True)
    args = DPOConfig(
        **trainer_args(cfg.train, out_dir / "checkpoints", recipe.seed, torch_dtype(recipe.model.dtype)),
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        max_length=recipe.rounds.pairs.max_length,
    )
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = kit_trainer(DPOTrainer)(
        model=loaded.model,
        args=args,
        train_dataset=data,
        processing_class=loaded.tokenizer,
        callbacks=[progress_callback(console, label), *(callbacks or [])],
    )
    metrics = train_and_save(trainer, out_dir, out_dir / "adapter", loaded.tokenizer)
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    if logs:
        metrics["loss_first"] = logs[0].get("loss")
        metrics["loss_last"] = logs[-1].get("loss")
        metrics["reward_margin_first"] = logs[0]["rewards/margins"]
        metrics["reward_margin_last"] = logs[-1]["rewards/margins"]
        metrics["reward_accuracy_last"] = logs[-1].get("rewards/accuracies")
    metrics["pairs"] = len(pairs)
    return metrics
