"""The generated skill questions: exact keys, distinct options, stable across calls, rule-written templates."""

import re

import pytest

from medcritical.data import load_recipe_data, records_hash, skill_questions
from medcritical.errors import UserError
from medcritical.grading import committed_answer
from medcritical.prompts import render_template
from medcritical.recipe import load_recipe
from medcritical.teachers import dataset_template


def _value(text: str) -> float:
    return float(re.search(r"is ([0-9.]+) ", text).group(1))


def test_same_questions_every_time_each_with_one_key_and_four_options():
    a, b = skill_questions(300), skill_questions(300)
    assert records_hash(a) == records_hash(b)
    assert len({q.question for q in a}) == 300 and len({q.id for q in a}) == 300
    for q in a:
        assert len(q.options) == 4 and len(set(q.options.values())) == 4 and len(q.answer) == 1
        assert q.options[q.answer[0]] not in q.question  # the key's text is not in the stem
    assert records_hash(skill_questions(30, seed=1)) != records_hash(skill_questions(30))


def test_lab_keys_follow_the_reference_range_in_the_stem():
    for q in skill_questions(200, skills=("lab",)):
        lo, hi = (float(x) for x in re.search(r"range ([0-9.]+)-([0-9.]+)", q.question).groups())
        v = _value(q.question)
        want = "A" if v < lo else "C" if v > hi else "B"  # options in the usual order: low, normal, high
        assert q.answer == (want,), q.question


def test_dose_and_unit_keys_are_the_arithmetic():
    for q in skill_questions(60, skills=("dose",)):
        per_kg = int(re.search(r"(\d+) mg/kg", q.question).group(1))
        kg = int(re.search(r"weighing (\d+) kg", q.question).group(1))
        assert q.options[q.answer[0]] == f"{per_kg * kg} mg"
    for q in skill_questions(60, skills=("units",)):
        value, src, dst = re.fullmatch(r"Convert ([0-9.]+) (\w+) to (\w+)\.", q.question).groups()
        factor = 1000 if (src, dst) in (("g", "mg"), ("mg", "micrograms"), ("L", "mL")) else 0.001
        got = float(q.options[q.answer[0]].split()[0])
        assert got == pytest.approx(float(value) * factor)


def test_dataset_teacher_writes_the_rule_template_and_the_recipe_source_loads():
    q = skill_questions(1, skills=("lab",))[0]
    plan, steps = dataset_template(q, "en")
    assert plan.startswith("Compare the") and steps.endswith(").")
    assert committed_answer(render_template(plan, steps, q.answer, "en"), q.options) == set(q.answer)
    recipe = load_recipe(None, ["data.sources=[{path: 'skills:lab', limit: 50}]", "data.dev=0.2"])
    assert len(load_recipe_data(recipe.data)) == 50
    bad = load_recipe(None, ["data.sources=[{path: 'skills:surgery'}]"])
    with pytest.raises(UserError, match="skills:surgery: unknown skill"):
        load_recipe_data(bad.data)
