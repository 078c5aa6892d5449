from pathlib import Path

import pytest

from medcritical.cli import main
from medcritical.errors import UserError
from medcritical.recipe import load_recipe, recipes_dir


@pytest.mark.parametrize("path", sorted(recipes_dir().glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path):
    recipe = load_recipe(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# medcritical "), "each recipe opens with the command that runs it"
    assert recipe.output_dir


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sft.lora.r=eight"], "sft.lora.r: Input should be a valid integer"),
        (["sft.lora.rank=8"], "sft.lora.rank: unknown key"),
        (["teach.backend=openai"], "teach: backend openai needs base_url and model"),
        (["export.quants=[q9_9]"], "unknown quant types ['q9_9']"),
        (["rounds.dpo.beta=-1"], "rounds.dpo.beta: Input should be greater than 0"),
        (["seed"], "expected key.sub=value"),
    ],
)
def test_bad_overrides_fail_in_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        load_recipe(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_file_names_file_and_key(tmp_path: Path):
    p = tmp_path / "r.yaml"
    p.write_text("sft:\n  lora:\n    r: eight\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"r\.yaml: sft\.lora\.r: .*got 'eight'"):
        load_recipe(p)
    p.write_text("sft: [unclosed\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"r\.yaml: line \d+: not valid YAML"):
        load_recipe(p)
    for empty in ("", "# only a comment\n"):
        p.write_text(empty, encoding="utf-8")
        with pytest.raises(UserError, match=r"r\.yaml: the recipe is empty"):
            load_recipe(p)
    p.write_text("{}\n", encoding="utf-8")
    assert load_recipe(p).name == "run"  # every default, said on purpose
    p.write_text("export: {quants: [q8_0], ship: {candidates: [q4_k_m]}}\n", encoding="utf-8")
    with pytest.raises(UserError, match="ship.candidates"):
        load_recipe(p)


def test_overrides_parse_yaml_values(tmp_path: Path):
    r = load_recipe(None, ["rounds.num_rounds=2", "sft.lora.target_modules=[q_proj, v_proj]", "name=a=b"])
    assert r.rounds.num_rounds == 2
    assert r.sft.lora.target_modules == ["q_proj", "v_proj"]
    assert r.name == "a=b"  # split on the first '='


def test_cli_config_show_and_errors(capsys):
    assert main(["config", "show", str(recipes_dir() / "demo-cpu.yaml"), "seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out
    assert main(["config", "show", "no-such.yaml"]) == 1
    err = capsys.readouterr().err
    assert "no-such.yaml: no such recipe file" in err and "Traceback" not in err
