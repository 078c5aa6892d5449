import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from medcritical.data import demo_path, load_questions
from medcritical.layout import RunDir
from medcritical.models import load_model
from medcritical.prompts import choose_lang, question_messages, render_template
from medcritical.recipe import load_recipe


def run_sft(recipe, callbacks=None) -> dict:
    """The sft stage on the recipe's run directory."""
    from rich.console import Console

    from medcritical import sft

    return sft.run(recipe, RunDir.of(recipe), Console(stderr=True), callbacks=callbacks)


def write_templates(run: Path, n: int, short: bool = False) -> Path:
    """Templates as the teach stage writes them (dataset teacher layout)."""
    path = run / "teach" / "templates.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in load_questions(demo_path()).records[:n]:
            lang = choose_lang(r.question, "auto")
            steps = "Check each option." if short else r.explanation
            target = render_template("Recall the key fact.", steps, r.answer, lang)
            row = {
                "id": r.id,
                "question": r.question,
                "options": r.options,
                "answer": list(r.answer),
                "lang": lang,
                "target": target,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def test_sft_qlora_loss_falls_adapter_changes_output(tiny_llama: Path, tmp_path: Path):
    run = tmp_path / "run"
    write_templates(run, 4)
    recipe = load_recipe(
        None,
        [
            f"output_dir={run}",
            f"model.name_or_path={tiny_llama}",
            "sft.train.max_steps=12",
            "sft.train.learning_rate=0.01",
            "sft.train.warmup_steps=0",
            "sft.train.lr_scheduler_type=constant",
            "sft.train.save_steps=6",
            "sft.max_length=384",
        ],
    )
    m = run_sft(recipe)
    assert m["steps"] == 12 and m["last_loss"] < m["first_loss"] - 0.5
    adapter = run / "sft" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (run / "sft" / "manifest.json").exists()
    assert list((run / "sft" / "checkpoints").glob("checkpoint-*"))

    base = load_model(recipe.model)
    tuned = load_model(recipe.model, adapter=adapter)
    tok = base.tokenizer
    msgs = question_messages("q?", {"A": "x", "B": "y"}, False, "en")
    ids = tok(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
        return_tensors="pt",
        add_special_tokens=False,
    )
    with torch.no_grad():
        a, b = base.model(**ids).logits[0, -1], tuned.model(**ids).logits[0, -1]
    assert (a - b).abs().max() > 1e-2  # the adapter loads back and changes the model

    # A second run with the same inputs is skipped (manifest complete, hashes equal).
    assert run_sft(recipe)["steps"] == 12


def _lora_grads(model) -> dict[str, float]:
    return {
        n: p.grad.abs().sum().item() if p.grad is not None else 0.0
        for n, p in model.named_parameters()
        if "lora_A" in n
    }


@pytest.mark.parametrize("arch", ["llama"])
def test_training_after_eval_forward_keeps_gradients(arch, tiny_llama: Path):
    """bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights at the first
    eval-mode forward, after which LoRA layers silently get no gradient. The
    loader turns that off; rollouts/eval between training stages rely on it."""
    import bitsandbytes as bnb
    from peft import get_peft_model

    from medcritical.models import lora_config

    recipe = load_recipe(None, [f"model.name_or_path={tiny_llama}"])
    loaded = load_model(recipe.model, trainable=True)
    assert all(not m.support_avx512bf16_for_cpu for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    model = get_peft_model(loaded.model, lora_config(recipe.sft.lora))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # what a rollout or evaluation does between stages
    model.train()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # so gradients reach lora_A
    model(input_ids=ids, labels=ids).loss.backward()
    grads = _lora_grads(model)
    assert grads and all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]


def test_sft_batches_grouped_by_length_seeded_per_epoch(tiny_llama: Path, tmp_path: Path):
    """The sft stage's sampler: every example once per epoch, batches of similar
    length (less padding than random batches), and the same order for the same
    seed and epoch, so resuming from a checkpoint replays the same batches."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from medcritical.artifacts import read_jsonl
    from medcritical.sft import sft_examples
    from medcritical.training import kit_trainer

    rows = read_jsonl(write_templates(tmp_path, 64))
    recipe = load_recipe(None, [f"model.name_or_path={tiny_llama}", "model.load_in_4bit=false"])
    loaded = load_model(recipe.model)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_length=384,
        use_cpu=True,
        report_to="none",
        data_seed=3,
        train_sampling_strategy="group_by_length",
    )
    trainer = kit_trainer(SFTTrainer)(
        model=loaded.model,
        args=args,
        train_dataset=Dataset.from_list(sft_examples(rows)),
        processing_class=loaded.tokenizer,
    )
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]

    def padding(order: list[int]) -> int:
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    sampler = trainer._get_train_sampler()
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths))) and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first)
    sampler.set_epoch(0)
    assert list(sampler) == first  # a resumed run replays the interrupted epoch's order
    shuffles = [torch.randperm(len(lengths), generator=torch.Generator().manual_seed(s)).tolist() for s in range(8)]
    assert padding(first) < 0.7 * sum(map(padding, shuffles)) / len(shuffles)  # vs a plain SFTTrainer's batches


class Crash(TrainerCallback):
    """Kills the run at the end of step 5 (after checkpoint-4)."""

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5:
            raise RuntimeError("power cut")


def same_adapter(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.allclose(x[k], y[k], atol=1e-6) for k in x)


def test_sft_resume_after_crash_matches_uninterrupted_run(tiny_llama: Path, tmp_path: Path):
    """A run that dies mid-epoch and is started again resumes from its last
    checkpoint and ends with the same adapter as a run that never stopped (same
    batches in the same order, length-grouped sampler included, adapter dtype kept)."""

    def recipe(run: Path):
        write_templates(run, 12)  # 3 steps an epoch: checkpoint-4 is in the middle of the second epoch
        return load_recipe(
            None,
            [
                f"output_dir={run}",
                f"model.name_or_path={tiny_llama}",
                "sft.train.max_steps=6",
                "sft.train.save_steps=4",
                "sft.train.learning_rate=0.01",
                "sft.max_length=512",
            ],
        )

    whole = run_sft(recipe(tmp_path / "a"))
    with pytest.raises(RuntimeError, match="power cut"):
        run_sft(recipe(tmp_path / "b"), callbacks=[Crash()])
    resumed = run_sft(recipe(tmp_path / "b"))
    assert whole["resumed_from"] is None and resumed["resumed_from"].endswith("checkpoint-4")
    assert same_adapter(tmp_path / "a" / "sft" / "adapter", tmp_path / "b" / "sft" / "adapter")


def test_dpo_resume_after_crash_matches_uninterrupted_run(tiny_llama: Path, tmp_path: Path):
    """The same for DPO (``training.kit_trainer`` is shared): its checkpoints also
    hold the frozen ``ref`` adapter in a sub-folder, next to the trained one."""
    from rich.console import Console

    from medcritical.dpo import run_dpo

    run = tmp_path / "run"
    rows = [json.loads(x) for x in write_templates(run, 8, short=True).read_text().splitlines()]
    overrides = [
        "sft.train.max_steps=2",
        "sft.max_length=384",
        "sft.train.save_steps=100",
        "rounds.pairs.max_length=384",
    ]
    dpo = ["max_steps=6", "save_steps=4", "learning_rate=0.001", "per_device_train_batch_size=2"]
    recipe = load_recipe(
        None,
        [f"output_dir={run}", f"model.name_or_path={tiny_llama}", *overrides, *[f"rounds.dpo.train.{x}" for x in dpo]],
    )
    run_sft(recipe)
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as f:
        for r in rows:
            wrong = next(k for k in r["options"] if k not in r["answer"])
            pair = {
                "prompt": question_messages(r["question"], r["options"], len(r["answer"]) > 1, r["lang"]),
                "chosen": [{"role": "assistant", "content": r["target"]}],
                "rejected": [{"role": "assistant", "content": render_template("Guess.", "-", [wrong], r["lang"])}],
            }
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    start, console = run / "sft" / "adapter", Console(stderr=True)
    whole = run_dpo(recipe, pairs, start, tmp_path / "a", console)  # (a round's dpo step decides when to call it)
    with pytest.raises(RuntimeError, match="power cut"):
        run_dpo(recipe, pairs, start, tmp_path / "b", console, callbacks=[Crash()])
    resumed = run_dpo(recipe, pairs, start, tmp_path / "b", console)
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["last_loss"] == whole["last_loss"]
    assert same_adapter(tmp_path / "a" / "adapter", tmp_path / "b" / "adapter")


def test_changed_learning_rate_retrains_from_scratch(tiny_llama: Path, tmp_path: Path):
    """Rerunning into the same run directory after a knob changed: the old checkpoints are not
    resumed (they were made for the other rate); the adapter equals a fresh run with the new
    rate and differs from the old one. Then an unchanged rerun trains nothing."""

    def recipe(run: Path, lr: float):
        write_templates(run, 8, short=True)
        over = [
            "sft.train.max_steps=4",
            "sft.train.save_steps=2",
            "sft.max_length=384",
            f"sft.train.learning_rate={lr}",
        ]
        return load_recipe(None, [f"output_dir={run}", f"model.name_or_path={tiny_llama}", *over])

    run = tmp_path / "run"
    run_sft(recipe(run, 0.01))
    old = tmp_path / "old-adapter"
    import shutil

    shutil.copytree(run / "sft" / "adapter", old)
    again = run_sft(recipe(run, 0.001))
    assert again["resumed_from"] is None and again["steps"] == 4
    run_sft(recipe(tmp_path / "fresh", 0.001))
    assert same_adapter(run / "sft" / "adapter", tmp_path / "fresh" / "sft" / "adapter")
    assert not same_adapter(run / "sft" / "adapter", old)
    assert list((run / ".stale").rglob("checkpoint-4"))  # the old run was kept aside, not resumed
    from medcritical.steps import EVENTS

    EVENTS.clear()
    assert run_sft(recipe(run, 0.001))["steps"] == 4 and [e["outcome"] for e in EVENTS] == ["skipped"]


def test_sft_writes_tensorboard_events_when_the_recipe_asks(tiny_llama: Path, tmp_path: Path):
    """``sft.train.report_to: tensorboard``: TRL's own reporting writes event files under the run
    directory, offline, with the training loss in them (what `tensorboard --logdir RUN` shows)."""
    pytest.importorskip("tensorboard")  # requirements-dev.txt pins it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    write_templates(run, 4)
    recipe = load_recipe(
        None,
        [f"output_dir={run}", f"model.name_or_path={tiny_llama}", "sft.train.max_steps=3", "sft.max_length=384",
         "sft.train.report_to=tensorboard"],
    )  # fmt: skip
    run_sft(recipe)
    events = list(run.rglob("events.out.tfevents.*"))
    assert events and all(e.is_relative_to(run / "sft") for e in events)
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 3
