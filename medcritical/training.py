"""What SFT and DPO share around their TRL trainer.

Both stages build a TRL config from the same recipe keys, show the same rich
progress, resume from the last checkpoint, save the adapter atomically and
record loss curves and peak memory. Keeping that here means ``sft.py`` and
``dpo.py`` each stay a short straight line over their trainer.

``kit_trainer`` subclasses a TRL trainer so that resuming is exact; it also
makes SFT's length-grouped batches (``train_sampling_strategy="group_by_length"``:
examples of similar length share a batch, so little compute goes to padding)
reproducible per epoch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .artifacts import atomic_dir, atomic_write_text
from .models import canonical_adapter_config
from .recipe import ModelCfg, TrainCfg
from .runtime import Ticker
from .steps import Step


def main_process_begin(step: Any, console: Console) -> str:
    """:meth:`Step.begin` on the main process only, the others waiting for it.

    Under ``accelerate launch`` every rank runs the stage: one of them moves a
    stale directory aside and writes the manifest, then all of them look for a
    checkpoint to resume from. Returns the step's state (``complete``, ``resume``, ``new``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return step.begin(console)
    import torch
    from accelerate import PartialState

    # cpu=True without CUDA, as the Trainer will (``trainer_args``' use_cpu): otherwise accelerate finds no
    # distributed setup on a CPU-only machine and every process takes itself for the main one.
    state = PartialState(cpu=not torch.cuda.is_available())
    outcome = step.begin(console) if state.is_main_process else None
    state.wait_for_everyone()
    return outcome or ("complete" if step.complete else "resume")


def stack(cfg: ModelCfg, *extra: str) -> dict[str, Any]:
    """The student's backend and dtype as resolved on this machine (never ``auto``) and the versions of the
    libraries that run it (``extra``: more, e.g. trl), for the keys of the steps they decide."""
    from .models import dtype_name, pick_backend
    from .steps import library_versions

    backend = pick_backend(cfg)
    names = ["torch", "transformers", "peft", *extra]
    if cfg.load_in_4bit:
        names.append("bitsandbytes")
    if backend == "unsloth":
        names.append("unsloth")
    return {"backend": backend, "dtype": dtype_name(cfg.dtype), "libraries": library_versions(*names)}


def training_step(kind: str, d: Path, material: dict[str, Any], *, train: bool, **kw: Any) -> Step:
    """The step of a training run (sft, dpo), keyed also by its world size (processes under ``accelerate launch``).

    ``train``: this process is about to train it. Under a launcher that process keys it by ``WORLD_SIZE``.
    Anyone else (a single-process command, or a launched one that only reads it) takes a complete step made for
    the same other inputs with whatever world size trained it: the commands of docs/multi-gpu.md read and skip
    launched work instead of training it again on one process.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    step = Step(kind, d, material | {"world_size": launched if train else 1}, **kw)
    if train and launched > 1:
        return step
    made = ((step.manifest() or {}).get("material") or {}).get("world_size")
    if isinstance(made, int) and made != step.material["world_size"]:
        adopted = Step(kind, d, material | {"world_size": made}, **kw)
        if adopted.complete:
            return adopted
    return step


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
        "use_liger_kernel": on_gpu and train.use_liger_kernel,
        "use_cpu": not on_gpu,
        "report_to": train.report_to,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def kit_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` (a TRL trainer) with two fixes for exact resuming.

    * With ``train_sampling_strategy="group_by_length"``, transformers'
      ``LengthGroupedSampler`` (random mega-batches sorted by length inside,
      longest batch first) draws from the global RNG, so a run resumed in the
      middle of a later epoch would replay another order than the interrupted
      one (some examples twice, some never). accelerate seeds the default
      random sampler with ``seed + epoch``; the sampler here does the same.
      Its groups are cut for the global batch (all processes), so data-parallel
      runs train on the same examples per step as one process would
      (``tests/test_accelerate.py``).
    * On resume the Trainer reloads the adapter with peft's ``load_adapter``,
      which upcasts it to float32 where TRL keeps QLoRA adapters in bfloat16
      (the dtypes from before loading are put back), and which, when a
      checkpoint also holds DPO's frozen ``ref`` adapter in a sub-folder,
      loads only that one (the trained adapter is loaded too).

    With both, a run that dies and starts again ends with the adapter of a run
    that never stopped.
    """
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        def __init__(self, batch_size: int, lengths: list[int], seed: int):
            super().__init__(batch_size, lengths=lengths)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:  # accelerate's DataLoaderShard calls it before each epoch
            self.epoch = epoch

        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))

    class KitTrainer(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            ds = self.train_dataset if train_dataset is None else train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or "input_ids" not in (
                getattr(ds, "column_names", None) or []
            ):
                return super()._get_train_sampler(train_dataset)
            seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
            # Groups the size of one optimizer step's whole batch, over every process: under `accelerate
            # launch` each process then takes its micro-batches from the same sequence in turn, so a step
            # trains on the examples it would on one process with the same effective batch.
            size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return SeededLengthGroupedSampler(size, [len(x) for x in ds["input_ids"]], seed)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            dtypes = {n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            ckpt, active = Path(resume_from_checkpoint), getattr(self.model, "active_adapter", None)
            subdirs = [d.name for d in ckpt.iterdir() if (d / "adapter_model.safetensors").is_file()]
            if subdirs and isinstance(active, str) and active not in subdirs:
                # With adapters in sub-folders (DPO's frozen "ref"), transformers loads only those and leaves
                # the trained adapter, saved at the checkpoint's root, at its starting values.
                self.model.load_adapter(str(ckpt), active, is_trainable=True)
                self.model.set_adapter(active)
            for n, p in self.model.named_parameters():
                if n in dtypes and p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])

    KitTrainer.__name__ = KitTrainer.__qualname__ = f"Kit{trainer_cls.__name__}"
    return KitTrainer


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest *complete* ``checkpoint-N`` under ``out_dir``.

    The Trainer writes a checkpoint's files in place and ``trainer_state.json``
    last, so a process killed while saving leaves a directory without a
    readable state: it is skipped (and the previous checkpoint used).
    """
    import re

    found = []
    for d in out_dir.glob("checkpoint-*") if out_dir.is_dir() else []:
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        try:
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if m:
            found.append((int(m.group(1)), d))
    return str(max(found)[1]) if found else None


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
            self.tick = Ticker(console, label)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.prog.update(self.task, loss=f"loss {logs['loss']:.4f}")
                self.tick(state.global_step, state.max_steps, f"loss {logs['loss']:.4f}")

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
    import resource  # POSIX only: imported here so that importing this module never fails

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
    resume = last_checkpoint(Path(trainer.args.output_dir))  # where the trainer saves checkpoint-N
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    history = trainer.state.log_history
    if trainer.is_world_process_zero():  # under `accelerate launch`, one process writes
        with atomic_dir(adapter_dir) as tmp:
            # DPO adds a frozen "ref" copy of the adapter; only the trained one is the policy.
            names = [n for n in getattr(trainer.model, "peft_config", {}) if n != "ref"] or None
            trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=names)
            canonical_adapter_config(tmp / "adapter_config.json")
            tokenizer.save_pretrained(tmp)
        atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    trainer.accelerator.wait_for_everyone()
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
