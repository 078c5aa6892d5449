import json
from pathlib import Path

import pytest
import torch

from medcritical.data import demo_path, load_questions
from medcritical.models import load_model
from medcritical.prompts import choose_lang, question_messages, render_template
from medcritical.recipe import load_recipe
from medcritical.sft import run_sft


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
