"""``medcritical plan``: its SFT terms against a real training process, every shipped recipe, fit verdicts,
one-line errors, and ``run`` refusing a recipe the GPU cannot hold."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medcritical.cli import main
from medcritical.plan import CUDA_CONTEXT, GIB, make_plan
from medcritical.prompts import question_messages, render_template
from medcritical.recipe import load_recipe, recipes_dir

ROOT = Path(__file__).resolve().parent.parent

# The reference students' config.json values (architecture only), for a Hugging Face cache without their weights.
STUDENTS = {
    "Qwen/Qwen2.5-7B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "max_position_embeddings": 32768,
    },
    "meta-llama/Llama-3.1-8B-Instruct": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "max_position_embeddings": 131072,
    },
}  # fmt: skip


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face hub cache holding only the reference students' config.json."""
    root = tmp_path / "hf"
    for repo, cfg in STUDENTS.items():
        model = root / f"models--{repo.replace('/', '--')}"
        (model / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (model / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps(cfg))
        (model / "refs").mkdir()
        (model / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root


def plan_json(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# Runs the real SFT stage in a process of its own and prints how far its peak RSS rose above the RSS it had with
# the training libraries imported and nothing loaded (Linux: clear_refs resets the peak to the current RSS).
CHILD = r"""
import json, sys
import bitsandbytes, datasets, peft, torch, transformers, trl  # noqa: F401  (loaded before the baseline)
from rich.console import Console
from medcritical import sft
from medcritical.layout import RunDir
from medcritical.recipe import load_recipe

def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

recipe = load_recipe(None, sys.argv[1:])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS:")
sft.run(recipe, RunDir.of(recipe), Console(stderr=True, quiet=True))
print(json.dumps({"grown": rss("VmHWM:") - base}))
"""


def write_templates(run: Path, model: Path, max_length: int, n: int) -> None:
    """``n`` templates as teach writes them, the longest just under ``max_length`` tokens and each 40 tokens shorter
    than the one before: a batch of them is padded to ``max_length``, the plan's worst case."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def length(prompt: list[dict], k: int) -> int:
        reply = [{"role": "assistant", "content": render_template("Plan.", " the" * k, ["A"], "en")}]
        ids = tok.apply_chat_template(prompt + reply, tokenize=True)
        return len(ids["input_ids"] if isinstance(ids, dict) else ids)

    rows = []
    for i in range(n):
        q, options = f"Question {i}: which one?", {"A": "one", "B": "two"}
        prompt = question_messages(q, options, False, "en")
        k = max_length - length(prompt, 0)
        while length(prompt, k) > max_length - 1 - 40 * i:
            k -= 1
        target = render_template("Plan.", " the" * k, ["A"], "en")
        rows.append({"id": str(i), "question": q, "options": options, "answer": ["A"], "lang": "en", "target": target})
    (run / "teach").mkdir(parents=True)
    (run / "teach" / "templates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures RSS through Linux's /proc")
def test_sft_estimate_matches_a_measured_training_step(tmp_path: Path):
    """The CPU plan's SFT model and training terms against the peak memory of a real SFT stage process.

    On the CPU there is no VRAM: the terms a GPU holds live in RAM, in the CPU's dtypes (fp32 compute), and the
    CPU plan counts them so. Compared: the plan's weights, LoRA weights, gradients, optimizer, activations,
    chunked logits, dequantized weight and training runtime (tokenizer, data, trainer), i.e. every RAM term but
    the libraries and the allocator slack, against how far the process's peak RSS rose above its RSS with the
    libraries imported and nothing loaded. The child runs with glibc's mmap threshold fixed at 64 KiB, so freed
    tensors go back to the system and RSS follows the live tensors, as ``torch.cuda.max_memory_allocated`` does on
    a GPU (the heap glibc otherwise keeps is the plan's allocator slack, as torch's cache is on a GPU).
    The model is big enough in every term to be seen: 4 layers, hidden 256, SmolLM2's 49k vocabulary; one
    optimizer step on a batch of 4 padded to 512 tokens, no gradient checkpointing.
    """
    from tests.tiny_models import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    overrides = [
        f"output_dir={tmp_path / 'run'}", f"model.name_or_path={model}", "sft.max_length=512",
        "sft.train.per_device_train_batch_size=4", "sft.train.max_steps=1", "sft.train.gradient_checkpointing=false",
        "sft.train.save_steps=100",
    ]  # fmt: skip
    write_templates(tmp_path / "run", model, 512, 4)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    grown = json.loads(out.stdout.strip().splitlines()[-1])["grown"]
    plan = make_plan(load_recipe(None, overrides), detect=False)
    assert plan.device.kind == "cpu"
    sft = plan.stages[0]
    terms = [t for t in sft.terms if t.where == "ram" and t.name not in ("libraries", "allocator slack")]
    estimate = sum(t.bytes for t in terms)
    detail = ", ".join(f"{t.name} {t.bytes / 2**20:.0f}" for t in terms)
    assert abs(estimate - grown) <= 0.25 * grown, f"measured {grown / 2**20:.0f} MiB, estimated ({detail} MiB)"


def test_every_shipped_recipe_plans_without_loading_a_model(hf_cache: Path, capsys, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("plan loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    recipes = sorted(recipes_dir().glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        plan = plan_json(capsys, str(path))
        recipe = load_recipe(path)
        names = [s["stage"] for s in plan["stages"]]
        assert names[0] == "sft" and "merge" in names and "export reference" in names, names
        assert all(s["ram_gib"] is not None for s in plan["stages"])
        if recipe.model.name_or_path in STUDENTS:  # the GPU recipes: sized for a GPU in their header
            assert plan["device"] == "cuda" and plan["gpu_gib"] in (12, 24), (path, plan["gpu_gib"])
            assert plan["stages"][0]["gpu_gib"] > 4  # a 7-8B student's 4-bit weights alone are ~5 GiB
        else:
            assert plan["device"] == "cpu" and plan["ram_gib"] == 8  # demo-cpu: "< 8 GB RAM"
    params = {n: make_plan(load_recipe(None, [f"model.name_or_path={n}"]), detect=False).arch.params for n in STUDENTS}
    assert abs(params["Qwen/Qwen2.5-7B-Instruct"] / 7.62e9 - 1) < 0.01  # the published parameter counts
    assert abs(params["meta-llama/Llama-3.1-8B-Instruct"] / 8.03e9 - 1) < 0.01


def test_too_big_is_not_fit_naming_the_largest_term(hf_cache: Path, capsys):
    recipe = str(recipes_dir() / "qwen2.5-7b_24gb.yaml")
    plan = plan_json(capsys, recipe, "--gpu-gb", "8")
    assert plan["fits"] is False and plan["gpu_gib"] == 8
    assert "gpu" in plan["stages"][0]["over"] and plan["stages"][0]["gpu_gib"] > 8  # even SFT does not fit
    worst = next(s for s in plan["stages"] if plan["verdict"].startswith(f"does NOT fit 8 GiB GPU: {s['stage']} "))
    assert f"largest term: {worst['largest']['gpu']} " in plan["verdict"]
    # The table says the same, in one line at the end.
    capsys.readouterr()
    assert main(["plan", recipe, "--gpu-gb", "8"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does NOT fit 8 GiB GPU") and "largest term:" in last
    # A big enough card fits.
    assert plan_json(capsys, recipe, "--gpu-gb", "141", "--ram-gb", "64")["fits"] is True


def test_missing_config_is_one_line(tmp_path: Path, hf_cache: Path, capsys):
    assert main(["plan", str(recipes_dir() / "demo-cpu.yaml"), "model.name_or_path=nobody/not-downloaded"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config.json in the local Hugging Face cache" in err
    (tmp_path / "empty").mkdir()
    assert main(["plan", str(recipes_dir() / "demo-cpu.yaml"), f"model.name_or_path={tmp_path / 'empty'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no config.json there" in err


def test_run_refuses_a_recipe_the_gpu_cannot_hold(tmp_path: Path, hf_cache: Path, capsys, monkeypatch):
    import medcritical.plan

    recipe = str(recipes_dir() / "qwen2.5-7b_12gb.yaml")
    out = f"output_dir={tmp_path / 'run'}"
    monkeypatch.setattr(medcritical.plan, "detect_gpu", lambda: 9 * GIB)  # a 12 GB card, 3 GiB held by others
    assert main(["run", recipe, out]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GPU memory" in err and "medcritical plan" in err, err
    assert not (tmp_path / "run").exists()
    # On a GPU that holds it, the check passes and the run goes on (to the missing data, here).
    monkeypatch.setattr(medcritical.plan, "detect_gpu", lambda: 141 * GIB)
    assert main(["run", recipe, out]) == 1
    assert "GPU memory" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("result", "dtype"),
    [("gpu_memory_12gb.json", "auto"), ("gpu_memory_12gb_peft-upcast.json", "float16"),
     ("gpu_memory_12gb_1024_peft-upcast.json", "float16")],
)  # fmt: skip
def test_plan_holds_against_the_measured_gpu_runs(result: str, dtype: str, tmp_path: Path) -> None:
    """The SFT and DPO steps of the 12 GB recipe on a 7B-shaped student, measured on an H200
    (bench/gpu_memory.py, kept in bench/measured/): the plan's GPU tensors and allocator slack within 25% of
    what torch's allocator reserved. The upcast runs (peft's fp32 copies of the frozen 16-bit weights, what
    float16 training still gets) are planned as float16, whose bytes and upcast they share."""
    measured = json.loads((ROOT / "bench" / "measured" / result).read_text())
    model = tmp_path / "model"
    model.mkdir()
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "torch_dtype": "bfloat16",
        **measured["config"],
    }
    (model / "config.json").write_text(json.dumps(cfg))
    sets = [f"{k}={json.dumps(v)}" for k, v in measured["settings"].items()]
    sets.append("rounds.dpo.train.use_liger_kernel=false")  # measured before the recipe took the chunked DPO loss
    recipe = load_recipe(ROOT / measured["recipe"], [f"model.name_or_path={model}", "model.backend=transformers",
                                                     f"model.dtype={dtype}", *sets])  # fmt: skip
    plan = make_plan(recipe, gpu_gb=140, detect=False)
    for stage in ("sft", "dpo"):
        planned = next(s for s in plan.stages if s.name == stage).total("gpu") / GIB - CUDA_CONTEXT / GIB
        reserved = measured[stage]["peak_reserved_mb"] / 1024
        assert abs(planned - reserved) <= 0.25 * reserved, (stage, planned, reserved)


def hours_json(capsys, recipe: str, *argv: str) -> dict:
    return plan_json(capsys, str(recipes_dir() / recipe), *argv)


@pytest.mark.parametrize(("recipe", "card", "gb", "budget", "most"),
                         [("qwen2.5-7b_12gb.yaml", "rtx3060", 12, 11.0, 24), ("qwen2.5-7b_24gb.yaml", "rtx4090", 24, 22.5, 12)])  # fmt: skip
def test_gpu_recipes_fit_with_margin_and_finish_in_their_hours(hf_cache, capsys, recipe, card, gb, budget, most):
    """Every stage of the 12 GB recipe within 11.0 GiB of a 12 GiB card (22.5 of 24), the measured CUDA context
    and llama.cpp's compute buffer counted; the whole run within a day on an RTX 3060 (a night on an RTX 4090)."""
    from medcritical import plan as P

    plan = hours_json(capsys, recipe, "--gpu", card)
    assert plan["gpu_gib"] == gb and plan["fits"] is True
    for s in plan["stages"]:
        assert s["gpu_gib"] <= budget, (s["stage"], s["gpu_gib"])
        if s["gpu_gib"] and "vllm" not in s["stage"]:  # vLLM's context is in its runtime term
            assert any(t["name"] == "CUDA context" and t["gib"] == 1.35 for t in s["terms"]), s["stage"]
        if "llamacpp" in s["stage"]:
            assert any(t["name"] == "compute buffer" for t in s["terms"]), s["stage"]
    dpo = next(s for s in plan["stages"] if s["stage"] == "dpo")
    assert [t["gib"] for t in dpo["terms"] if t["name"].startswith("logits")] == [0.438]  # chunked: 2048 x 8192 x 28 B
    h, r = plan["hours"], load_recipe(recipes_dir() / recipe)
    assert h["total"] <= most, h
    assert h["stages"][0]["stage"] == "teach" and h["stages"][0]["hours"] is None  # the teacher stated apart
    train, dev = h["train_questions"], h["dev_questions"]
    n = r.data.sources[0].limit
    assert (train, dev) == (round(n * (1 - r.data.dev - r.data.test)), round(n * r.data.dev))
    by = {s["stage"].split(" ")[0]: s for s in h["stages"]}
    c = P.CARDS[card]
    # Each figure: tokens from the recipe, over a rate from the table.
    assert by["sft"]["tokens"] == round(train * r.sft.max_length * P.FILL * r.sft.train.num_train_epochs)
    assert by["sft"]["tokens_per_s"] == round(2938.4 * c.tflops / 989, 1)
    q, k = r.rounds.rollouts.questions, r.rounds.rollouts.k
    assert by["rollouts"]["tokens"] == round(r.rounds.num_rounds * q * k * r.rounds.rollouts.max_new_tokens * P.FILL)
    assert by["dpo"]["tokens"] == round(r.rounds.num_rounds * q * r.rounds.pairs.max_per_question * 2
                                        * r.rounds.pairs.max_length * P.FILL)  # fmt: skip
    assert by["dpo"]["tokens_per_s"] == round(by["sft"]["tokens_per_s"] * 6 / 8, 1)
    for s in h["stages"]:
        assert s["source"], s
        if s["hours"] is not None and s["stage"] != "export":
            assert abs(s["hours"] - s["tokens"] / s["tokens_per_s"] / 3600) < 0.01, s
    assert abs(sum(s["hours"] or 0 for s in h["stages"]) - h["total"]) < 0.02


def test_decode_rates_against_their_sources(hf_cache):
    """The single-stream rate reproduces the published RTX 4090 figure it is drawn from; more streams are capped
    by the batched figure; a card given as --gpu-gb/--tflops scales with its TFLOPS."""
    from medcritical import plan as P

    arch = make_plan(load_recipe(None, ["model.name_or_path=Qwen/Qwen2.5-7B-Instruct"]), detect=False).arch
    one, _ = P.decode_rate(P.CARDS["rtx4090"], arch, "llamacpp", 1, 0)
    assert abs(one * P.gguf_bytes(arch, "q8_0") / 7.16e9 - 98.13) < 0.5  # same bytes read per token as the source
    many, why = P.decode_rate(P.CARDS["rtx4090"], arch, "llamacpp", 64, 512)
    assert many == 1891.88 and "PR #15131" in why
    slow, _ = P.decode_rate(P.CARDS["rtx3060"], arch, "llamacpp", 1, 0)
    assert abs(slow / one - 360 / 1008) < 1e-6  # bandwidth-bound: a 3060 reads 360 GB/s
    assert P.decode_rate(P.CARDS["rtx4090"], arch, "vllm", 64, 0)[0] == 1190


def test_custom_card_hours_scale_with_tflops(hf_cache, capsys):
    a = hours_json(capsys, "qwen2.5-7b_24gb.yaml", "--gpu-gb", "24", "--tflops", "100")["hours"]
    b = hours_json(capsys, "qwen2.5-7b_24gb.yaml", "--gpu-gb", "24", "--tflops", "200")["hours"]
    assert a["card"] == "24 GB, 100 TFLOPS"
    sft = [next(s for s in x["stages"] if s["stage"] == "sft") for x in (a, b)]
    assert abs(sft[0]["hours"] / sft[1]["hours"] - 2) < 0.01
    assert main(["plan", str(recipes_dir() / "qwen2.5-7b_24gb.yaml"), "--tflops", "100"]) == 1
    assert "--tflops needs --gpu-gb" in capsys.readouterr().err


def test_hours_need_a_data_size(hf_cache, capsys):
    recipe = str(recipes_dir() / "qwen2.5-7b_12gb.yaml")
    assert main(["plan", recipe, "--gpu", "rtx3060", "data.sources=[{path: /nowhere/train.csv}]"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.sources[].limit" in err


def test_plan_here_uses_free_memory_and_names_who_holds_the_rest(hf_cache, tmp_path, capsys, monkeypatch):
    from medcritical import gpu_check
    from tests.test_gpu_check import fake_smi

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_check, "WSL_SMI", tmp_path / "none")
    exe = fake_smi(tmp_path / "bin", free=9216, apps="4242, /usr/bin/python3, 3072\n")
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    recipe = load_recipe(recipes_dir() / "qwen2.5-7b_12gb.yaml")
    plan = make_plan(recipe)  # no --gpu-gb, no 'Sized for' line: the GPU here
    assert plan.gpu == 9216 * 2**20
    assert any("held by pid 4242 python3 (3.0 GiB)" in a for a in plan.assumptions), plan.assumptions
    import medcritical.plan

    monkeypatch.setattr(medcritical.plan, "sized_for", lambda path: (None, None))
    monkeypatch.setattr(torch_cuda(), "is_available", lambda: True)
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert main(["run", str(recipes_dir() / "qwen2.5-7b_12gb.yaml"), f"output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "free for it here" in err and "pid 4242 python3" in err, err


def torch_cuda():
    import torch

    return torch.cuda
