"""SFT speed and memory: medcritical's sft stage vs a plain TRL SFTTrainer script.

    .venv/bin/python bench/sft_step.py --steps 20

Same model (the embedded SmolLM2-135M-Instruct in 4-bit NF4), same data (the
demo set's dataset-teacher templates), same LoRA and trainer settings. Each side
runs in its own subprocess (so peak RSS is its own), the plain script first,
then the kit; tokens/s counts the tokens TRL reports as trained.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = ["sft.train.gradient_checkpointing=false", "sft.train.per_device_train_batch_size=4", "sft.max_length=768"]


def templates(run: Path) -> Path:
    """The demo templates from the dataset teacher (no model needed)."""
    from medcritical.recipe import load_recipe
    from medcritical.teach import run_teach

    run_teach(load_recipe(None, [f"output_dir={run}", "teach.backend=dataset"]))
    return run / "teach" / "templates.jsonl"


def plain(run: Path, steps: int) -> dict:
    """What a user would write with TRL alone (the baseline)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from medcritical.artifacts import read_jsonl
    from medcritical.default_model import materialize
    from medcritical.sft import sft_examples

    path = materialize()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")  # fmt: skip
    args = SFTConfig(output_dir=str(run / "plain"), max_steps=steps, per_device_train_batch_size=4, learning_rate=2e-4,
                     max_length=768, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)  # fmt: skip
    data = Dataset.from_list(sft_examples(read_jsonl(run / "teach" / "templates.jsonl")))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    return {"seconds": seconds, "tokens": tokens}


def kit(run: Path, steps: int) -> dict:
    from medcritical.recipe import load_recipe
    from medcritical.sft import run_sft

    m = run_sft(
        load_recipe(
            None, [f"output_dir={run}", f"sft.train.max_steps={steps}", "sft.train.save_steps=100000", *OVERRIDES]
        )
    )
    return {"seconds": m["seconds"], "tokens": m["tokens"]}


def child(which: str, run: Path, steps: int) -> None:
    from medcritical.cli import offline_quiet

    offline_quiet()
    r = (plain if which == "plain" else kit)(run, steps)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["tokens_per_second"] = r["tokens"] / r["seconds"]
    print("RESULT " + json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="bench/results/sft_step.json")
    ap.add_argument("--child", choices=["plain", "kit"], help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, Path(a.run), a.steps)
    from medcritical.cli import offline_quiet

    offline_quiet()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        templates(Path(tmp))
        for which in ("plain", "kit"):
            out = subprocess.run([sys.executable, __file__, "--child", which, "--run", tmp, "--steps", str(a.steps)], capture_output=True, text=True, check=True)  # fmt: skip
            results[which] = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])
    ratio = results["kit"]["tokens_per_second"] / results["plain"]["tokens_per_second"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps({"steps": a.steps, "results": results, "speed_ratio_kit_over_plain": ratio}, indent=2) + "\n"
    )
    print("| run | tokens | seconds | tokens/s | peak RSS MB |\n|---|---|---|---|---|")
    for k, r in results.items():
        print(
            f"| {k} | {r['tokens']:.0f} | {r['seconds']:.1f} | {r['tokens_per_second']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    print(f"speed ratio kit/plain: {ratio:.3f}")


if __name__ == "__main__":
    main()
