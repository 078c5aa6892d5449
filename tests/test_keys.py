"""Step keys are complete: a changed input (library, resolved backend or dtype, world size, teacher file, prompt
of any language, grader, upstream step) redoes exactly what depends on it, and a stage never reads what an
earlier stage made for other settings. Tiny models, a random adapter standing in for SFT, a few tokens."""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from medcritical import prompts, rounds, sft, teach
from medcritical.artifacts import read_json, read_jsonl, read_manifest, sha256_file, sha256_tree
from medcritical.cli import main
from medcritical.data import load_recipe_data
from medcritical.errors import UserError
from medcritical.layout import RunDir
from medcritical.models import random_lora
from medcritical.pipeline import check_upstream
from medcritical.recipe import load_recipe
from medcritical.steps import Step

QUIET = Console(stderr=True, quiet=True)
SMALL = {
    "language": "auto",
    "model": {"load_in_4bit": False},
    "data": {"sources": [{"path": "demo", "lang": "en"}]},
    "teach": {"backend": "dataset", "limit": 4},
    "rounds": {
        "num_rounds": 0,
        "rollouts": {"engine": "transformers", "k": 1, "questions": 2, "max_new_tokens": 4},
        "correction": {"attempts": 1, "max_new_tokens": 4, "per_question": 1},
    },
    "eval": {"limit": 2, "max_new_tokens": 4},
}


def write_recipe(tmp: Path, model: Path) -> Path:
    path = tmp / "r.yaml"
    data = SMALL | {"output_dir": str(tmp / "run"), "model": {**SMALL["model"], "name_or_path": str(model)}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def taught_and_tuned(recipe_file: Path) -> RunDir:
    """The teach stage (dataset teacher), and a complete SFT step for the recipe whose adapter is random (the
    step's key is the real one; training is not what these tests are about)."""
    recipe = load_recipe(recipe_file)
    run = RunDir.of(recipe)
    teach.run(recipe, run, QUIET)
    st = sft.step(recipe, run, sft.sft_examples(read_jsonl(run.templates)), train=True)
    st.begin()
    random_lora(recipe.model.name_or_path, run.sft_adapter, recipe.sft.lora)
    st.done(outputs=["adapter"])
    return run


def test_training_keys_hold_libraries_resolved_stack_and_world_size(tiny_llama: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama))
    run = RunDir.of(recipe)
    st = sft.step(recipe, run, [], train=True)
    libs = {n: metadata.version(n) for n in ("torch", "transformers", "peft", "trl", "accelerate")}
    # "auto" resolved as this machine runs it; bitsandbytes only decides a 4-bit model
    assert st.material["stack"] == {"backend": "transformers", "dtype": "float32", "libraries": libs}
    four_bit = load_recipe(None, [f"model.name_or_path={tiny_llama}", "model.load_in_4bit=true"])
    four_bit_libs = sft.step(four_bit, run, []).material["stack"]["libraries"]
    assert four_bit_libs["bitsandbytes"] == metadata.version("bitsandbytes")

    # An SFT adapter trained by an older trl is trained again, and only trl is named as the change.
    old = st.material | {"stack": st.material["stack"] | {"libraries": libs | {"trl": "1.0.0"}}}
    made = Step("sft", run.sft, old)
    made.begin()
    (run.sft / "adapter").mkdir()
    made.done(outputs=["adapter"])
    again = sft.step(recipe, run, [], train=True)
    assert again.state() == "other" and again.changes() == ["stack.libraries.trl"]

    # Trained under `accelerate launch` on 2 processes: commands on one process read and skip it, a launch on
    # 2 skips it, a launch on 4 trains again (world_size is the only change), and reading it there is fine.
    shutil.rmtree(run.sft)
    base = {k: v for k, v in again.material.items() if k != "world_size"}
    launched = Step("sft", run.sft, base | {"world_size": 2})
    launched.begin()
    (run.sft / "adapter").mkdir()
    launched.done(outputs=["adapter"])
    assert sft.step(recipe, run, [], train=True).complete and sft.step(recipe, run, []).complete
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sft.step(recipe, run, [], train=True).complete
    monkeypatch.setenv("WORLD_SIZE", "4")
    four = sft.step(recipe, run, [], train=True)
    assert four.state() == "other" and four.changes() == ["world_size"]
    assert sft.step(recipe, run, []).complete


def test_teacher_keys_hash_teacher_files_and_each_language_prompt(tiny_llama: Path, tmp_path: Path, monkeypatch):
    both = load_recipe_data(load_recipe(None, []).data, split="train")  # the demo set: Chinese and English
    english = [r for r in both if prompts.detect_lang(r.question) == "en"]
    gguf = tmp_path / "a" / "teacher.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    moved = tmp_path / "b" / "renamed.gguf"
    moved.parent.mkdir()
    shutil.copy(gguf, moved)

    def material(model: Path, backend: str = "gguf", records=both) -> dict:
        recipe = load_recipe(None, [f"teach.backend={backend}", f"teach.model={model}"])
        return teach.step_material(recipe, records)

    first = material(gguf)
    assert first["teacher"]["libraries"] == {"llama_cpp_python": metadata.version("llama_cpp_python")}
    assert material(moved) == first  # the same file elsewhere: the templates are kept
    moved.write_bytes(b"GGUF" + b"\1" * 100)
    assert material(moved)["teacher"]["model"] != first["teacher"]["model"]  # other weights: taught again
    hf = material(tiny_llama, "transformers")
    assert material(Path(shutil.copytree(tiny_llama, tmp_path / "copy")), "transformers") == hf
    assert hf["teacher"]["dtype"] == "float32" and hf["teacher"]["backend"] == "transformers"

    # Rewording the Chinese prompt re-teaches a run with Chinese questions (its Chinese parts only), not an
    # English-only one.
    en_only = material(gguf, records=english)
    monkeypatch.setitem(prompts.SYSTEM, "zh", prompts.SYSTEM["zh"] + "请用中文回答。")
    after = material(gguf)
    assert after["teacher_prompt"]["zh"] != first["teacher_prompt"]["zh"]
    assert after["teacher_prompt"]["en"] == first["teacher_prompt"]["en"]
    assert after["layout"] == first["layout"]  # the layout templates are rendered in did not change
    assert material(gguf, records=english) == en_only and set(en_only["teacher_prompt"]) == {"en"}


def test_eval_keys_name_what_generates_and_grades(tiny_llama: Path, tmp_path: Path, monkeypatch):
    from medcritical import evaluate
    from medcritical.data import eval_records
    from medcritical.grading import GRADER_VERSION

    recipe = load_recipe(write_recipe(tmp_path, tiny_llama))
    records = eval_records(recipe)
    hf = evaluate.policy_material(recipe, records, adapter_hash="a")
    assert (hf["engine"], hf["backend"], hf["dtype"], hf["grader"]) == ("transformers", "transformers", "float32",
                                                                        GRADER_VERSION)  # fmt: skip
    assert hf["libraries"]["transformers"] == metadata.version("transformers")
    on_gguf = evaluate.policy_material(recipe, records, gguf_hash="g")
    assert on_gguf["libraries"] == {"llama_cpp_python": metadata.version("llama_cpp_python")}
    llamacpp = recipe.model_copy(deep=True)
    llamacpp.rounds.rollouts.engine = "llamacpp"
    built = evaluate.policy_material(llamacpp, records, adapter_hash="a")["libraries"]
    assert built["llama_cpp_python"] == on_gguf["libraries"]["llama_cpp_python"] and built["converter"]

    monkeypatch.setitem(prompts.SYSTEM, "zh", "另一个系统提示。")
    assert evaluate.policy_material(recipe, records, adapter_hash="a") == hf  # English questions: kept
    monkeypatch.setitem(prompts.SYSTEM, "en", "Another system prompt.")
    assert evaluate.policy_material(recipe, records, adapter_hash="a")["prompts"] != hf["prompts"]
    monkeypatch.setattr(evaluate, "GRADER_VERSION", GRADER_VERSION + 1)
    assert evaluate.policy_material(recipe, records, gguf_hash="g")["grader"] != on_gguf["grader"]


def test_rollouts_are_redone_for_their_prompts_and_grader_only(tiny_llama: Path, tmp_path: Path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama))
    run = RunDir.of(recipe)
    start = random_lora(tiny_llama, tmp_path / "start", recipe.sft.lora)
    start_hash = sha256_tree(start)

    def rollouts(check: bool) -> dict:
        return rounds.run_round(recipe, run, 1, start, start_hash, QUIET, only="rollouts", check=check)

    rollouts(check=False)
    log = sha256_file(run.round(1).rollouts_log)
    assert read_manifest(run.round(1).rollouts)["material"]["engine"]["dtype"] == "float32"
    assert rollouts(check=True)  # complete for these inputs: skipped
    monkeypatch.setitem(prompts.SYSTEM, "zh", "另一个系统提示。")
    assert rollouts(check=True)  # the questions are English: still skipped
    monkeypatch.setitem(prompts.SYSTEM, "en", "Another system prompt.")
    with pytest.raises(UserError, match=r"round 1 rollouts: made for other inputs \(prompts\.en changed\)"):
        rollouts(check=True)
    monkeypatch.undo()
    monkeypatch.setattr(rounds, "GRADER_VERSION", rounds.GRADER_VERSION + 1)
    with pytest.raises(UserError, match=r"round 1 rollouts: made for other inputs \(grader changed\)"):
        rollouts(check=True)
    assert sha256_file(run.round(1).rollouts_log) == log  # checking wrote nothing


def test_round_parts_one_by_one_then_the_next_round_in_a_fresh_command(tiny_llama: Path, tmp_path: Path, capfd):
    """docs/multi-gpu.md's loop: each part of round 1 as its own command writes round.json after its last part;
    round 2 then starts from a new command, and refuses once round 1 no longer fits the recipe."""
    recipe_file = write_recipe(tmp_path, tiny_llama)
    run = taught_and_tuned(recipe_file)
    rd = run.round(1)
    for part in rounds.PARTS:
        assert main(["rounds", str(recipe_file), "--round", "1", "--only", part]) == 0, part
        assert (rd.root / "round.json").exists() == (part == "eval"), part
    assert main(["rounds", str(recipe_file), "--round", "2", "--only", "rollouts"]) == 0
    policy = read_json(rd.root / "round.json")["adapter_hash"]  # round 1 made no pair: SFT's, carried over
    assert read_manifest(run.round(2).rollouts)["material"]["policy"] == policy == sha256_tree(run.sft_adapter)
    capfd.readouterr()
    assert main(["rounds", str(recipe_file), "--round", "2", "--only", "corrections", "rounds.rollouts.top_p=0.5"]) == 1
    err = " ".join(capfd.readouterr().err.split())
    assert "round 2 starts from round 1's policy: round 1 rollouts: made for other inputs" in err
    assert "(rollouts.top_p changed); run round 1 first" in err
    assert main(["rounds", str(recipe_file), "--round", "1", "--only", "eval", "sft.lora.r=4"]) == 1
    assert "sft: made for other inputs (sft.lora.r changed); run the sft stage first" in capfd.readouterr().err


def test_stages_refuse_upstream_made_for_other_settings(tiny_llama: Path, tmp_path: Path):
    """What `run --from/--only` and the export check: every earlier stage complete for this recipe."""
    from export import stage

    recipe_file = write_recipe(tmp_path, tiny_llama)
    run = taught_and_tuned(recipe_file)
    recipe = load_recipe(recipe_file)
    rounds.run(recipe, run, QUIET)  # no round: the SFT policy, evaluated
    check_upstream("export", recipe, run, QUIET)  # teach, sft and rounds fit: nothing refused
    for change, upstream, what in [
        ("teach.limit=3", "teach", "teach: made for other inputs (questions changed)"),
        ("sft.lora.r=4", "sft", "sft: made for other inputs (sft.lora.r changed)"),
        ("eval.max_new_tokens=5", "rounds", "eval sft: made for other inputs (eval.max_new_tokens changed)"),
        ("rounds.num_rounds=1", "rounds", "round 1 rollouts: not done"),
    ]:
        changed = load_recipe(recipe_file, [change])
        with pytest.raises(UserError) as e:
            check_upstream("export", changed, run, QUIET)
        assert str(e.value) == f"{what}; run the {upstream} stage first", change
        # the export refuses to stamp a recipe other than the one its policy was trained with
        with pytest.raises(UserError, match="run the .* stage first"):
            stage.run(changed, run, QUIET)
    assert not run.policies.exists()  # nothing was built
    with pytest.raises(UserError, match="export: not done"):
        stage.check(recipe, run, QUIET)


def test_run_reads_its_recipe_once_and_refuses_a_stale_upstream_in_one_line(tmp_path: Path, capfd, monkeypatch):
    from medcritical import pipeline

    recipe_file = write_recipe(tmp_path, Path("default"))
    run = tmp_path / "run"
    start_child = pipeline._run_child

    def edit_then_start(argv: list[str]) -> tuple[int, float]:  # the recipe file is edited while the run goes on
        recipe_file.write_text(recipe_file.read_text().replace("limit: 4", "limit: 2"))
        return start_child(argv)

    monkeypatch.setattr(pipeline, "_run_child", edit_then_start)
    assert main(["run", str(recipe_file), "--only", "teach", "seed=7"]) == 0
    monkeypatch.undo()
    assert yaml.safe_load((run / ".pipeline" / "recipe.yaml").read_text())["teach"]["limit"] == 4
    teach_made = read_manifest(run / "teach")
    assert teach_made["metrics"]["questions"] == 4 and teach_made["material"]["seed"] == 7  # as the run began
    capfd.readouterr()
    assert main(["run", str(recipe_file), "--only", "sft", "seed=7"]) == 1  # the edited recipe: teach is stale
    errors = [line for line in capfd.readouterr().err.splitlines() if "error" in line]
    assert errors == ["error: teach: made for other inputs (questions changed); run the teach stage first"]
    assert "sft" not in read_manifest(run)["stages"]  # refused before anything started


def test_bundle_ships_only_the_files_the_export_recorded_and_the_eval_measured(tmp_path: Path):
    from export.bundle import _shipped_hashes

    run = RunDir(tmp_path / "run")
    run.export.mkdir(parents=True)
    gguf = run.export / "tiny-q8_0.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    h = sha256_file(gguf)
    ex = {"ggufs": {"q8_0": {"file": gguf.name, "sha256": h}}}
    measured = Step("eval", run.quant_eval("q8_0"), {"gguf": h})
    measured.begin()
    measured.done()
    assert _shipped_hashes(run, ex, ["q8_0"]) == {"q8_0": h}
    gguf.write_bytes(b"GGUF" + b"\1" * 64)  # replaced after the export
    with pytest.raises(UserError, match="differs from what the export recorded"):
        _shipped_hashes(run, ex, ["q8_0"])
    ex["ggufs"]["q8_0"]["sha256"] = sha256_file(gguf)  # a new export, not yet evaluated
    with pytest.raises(UserError, match="not an evaluation of"):
        _shipped_hashes(run, ex, ["q8_0"])
