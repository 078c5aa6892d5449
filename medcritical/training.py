"""What SFT and DPO share around their TRL trainer.

Both stages build a TRL config from the same recipe keys, show the same rich
progress, resume from the last checkpoint, save the adapter atomically and
record loss curves and peak memory. Keeping that here means ``sft.py`` and
``dpo.py`` each stay a short straight line over their trainer.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .artifacts import atomic_dir
from .recipe import TrainCfg


def trainer_args(train: TrainCfg, out_dir: Path, seed: int, dtype: Any) -> dict[str, Any]:
    """Keyword arguments shared by ``SFTConfig`` and ``DPOConfig``."""
    import torch

    on_gpu = torch.cuda.is_available()
    return {
        "output_dir": str(out_dir),
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.num_train_epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "warmup_steps": train.warmup_steps,
        "lr_scheduler_type": train.lr_scheduler_type,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "optim": train.optim,
        "gradient_checkpointing": train.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": train.logging_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "seed": seed,
        "data_seed": seed,
        "bf16": on_gpu and dtype == torch.bfloat16,
        "fp16": on_gpu and dtype == torch.float16,
        "use_cpu": not on_gpu,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def last_checkpoint(out_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None


def progress_callback(console: Console, label: str) -> Any:
    """A TrainerCallback drawing a rich bar with the latest loss."""
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.prog = Progress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self.prog.start()
            self.task = self.prog.add_task(label, total=state.max_steps, completed=state.global_step, loss="")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.prog.update(self.task, loss=f"loss {logs['loss']:.4f}")

        def on_step_end(self, args, state, control, **kw):
            self.prog.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kw):
            self.prog.stop()

    return RichProgress()


def peak_memory_mb() -> float:
    """Peak GPU memory if on a GPU, else the process's peak resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def train_and_save(trainer: Any, out_dir: Path, adapter_dir: Path, tokenizer: Any) -> dict[str, Any]:
    """Train (resuming from the last checkpoint), save the adapter, return metrics.

    The adapter directory appears only when complete (atomic rename), so a
    crash after training but before saving just retrains from the last
    checkpoint rather than leaving a half-written adapter.
    """
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the rich bar shows progress; metrics.jsonl keeps the logs
    resume = last_checkpoint(out_dir)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    with atomic_dir(adapter_dir) as tmp:
        # DPO adds a frozen "ref" copy of the adapter; only the trained one is the policy.
        names = [n for n in getattr(trainer.model, "peft_config", {}) if n != "ref"] or None
        trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=names)
        tokenizer.save_pretrained(tmp)
    history = trainer.state.log_history
    with open(out_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 2),
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }
