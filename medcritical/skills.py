"""A generated set of medical skill questions with an exact key: the demo's learnable task.

At 135M parameters the real-exam questions are at chance (the student cannot know the medicine), so a
newcomer could not see whether SFT or the self-correction rounds move anything. These three skills are
exact, checkable and learnable by a small model from a few hundred worked examples, and each wrong option
is a typical error:

* ``lab``: classify a lab value against the reference range given in the stem (options in the usual
  order: low, normal, high, and a term for another analyte);
* ``dose``: a weight-based dose, dose per kg x weight (added, divided, or a tenfold slip);
* ``units``: a mass or volume conversion by 1000 (multiplied when it should divide, or by 10 or 100).

Each question carries a worked explanation written by rule (a plan line, then the working), which the
``dataset`` teacher turns into a short template (:func:`template`); the key never appears in the stem or
the options. ``path: skills`` in a recipe's data
sources loads them (:func:`medcritical.data.skill_questions`) (deterministic: the same ``n`` and ``seed`` give the same questions);
``path: skills:lab`` (or ``skills:dose,units``) only those skills.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

SKILLS = ("lab", "dose", "units")
SOURCE = "medcritical-skills"
SHUFFLED = ("dose", "units")  # options in random order; a lab question keeps the usual low/normal/high order

# analyte, unit, (low, high) reference range, (low term, normal term, high term), decimals
_LABS = (
    ("potassium", "mmol/L", (3.5, 5.0), ("Hypokalaemia", "Normal potassium", "Hyperkalaemia"), 1),
    ("sodium", "mmol/L", (135, 145), ("Hyponatraemia", "Normal sodium", "Hypernatraemia"), 0),
    ("calcium", "mmol/L", (2.2, 2.6), ("Hypocalcaemia", "Normal calcium", "Hypercalcaemia"), 2),
    ("fasting glucose", "mmol/L", (3.9, 5.5), ("Hypoglycaemia", "Normal glucose", "Hyperglycaemia"), 1),
    ("magnesium", "mmol/L", (0.7, 1.0), ("Hypomagnesaemia", "Normal magnesium", "Hypermagnesaemia"), 2),
    ("platelet count", "x10^9/L", (150, 400), ("Thrombocytopenia", "Normal platelet count", "Thrombocytosis"), 0),
    ("white cell count", "x10^9/L", (4.0, 11.0), ("Leukopenia", "Normal white cell count", "Leukocytosis"), 1),
)
_DRUGS = (
    ("paracetamol", (10, 15)),
    ("amoxicillin", (20, 25, 30)),
    ("ibuprofen", (5, 10)),
    ("gentamicin", (5, 7)),
    ("cefuroxime", (10, 15, 20)),
    ("azithromycin", (10, 12)),
)
# from, to, factor (value_to = value_from * factor)
_UNITS = (("g", "mg", 1000), ("mg", "micrograms", 1000), ("L", "mL", 1000), ("mg", "g", 0.001), ("mL", "L", 0.001))


def _num(x: float, decimals: int = 3) -> str:
    """A number as a clinician writes it: no trailing zeros, no float noise."""
    text = f"{x:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _lab(rng: random.Random) -> tuple[str, dict[str, bool], str]:
    name, unit, (lo, hi), terms, dec = rng.choice(_LABS)
    kind = rng.randrange(3)  # 0 low, 1 normal, 2 high
    span = hi - lo
    step = 10.0**-dec
    if kind == 0:
        value = rng.uniform(lo - 0.5 * span, lo - step)
    elif kind == 2:
        value = rng.uniform(hi + step, hi + 0.8 * span)
    else:
        value = rng.uniform(lo, hi)
    value = max(round(value, dec), step)
    other = rng.choice([t for t in _LABS if t[0] != name])
    shown = _num(value, dec)
    who = f"A {rng.randint(18, 90)}-year-old {rng.choice(('man', 'woman'))}'s"
    stem = (
        f"{who} {name} is {shown} {unit} (reference range {_num(lo, dec)}-{_num(hi, dec)} {unit}). "
        "How is this result best described?"
    )
    where = (
        f"below the lower limit of {_num(lo, dec)}"
        if kind == 0
        else f"above the upper limit of {_num(hi, dec)}"
        if kind == 2
        else f"between {_num(lo, dec)} and {_num(hi, dec)}"
    )
    level = ("low", "normal", "high")[kind]
    distractor = other[3][rng.choice((0, 2))]
    why = (
        f"Compare the {name} value with its reference range, {_num(lo, dec)}-{_num(hi, dec)} {unit}.\n"
        f"{shown} {unit} is {where}: {level} ({terms[kind].lower()})."
    )
    # In the usual order of a lab-interpretation question: low, normal, high, then a term for another analyte.
    options = {t: i == kind for i, t in enumerate(terms)} | {distractor: False}
    return stem, options, why


def _dose(rng: random.Random) -> tuple[str, dict[str, bool], str]:
    drug, per_kg_choices = rng.choice(_DRUGS)
    per_kg = rng.choice(per_kg_choices)
    weight = rng.randint(5, 50)
    dose = per_kg * weight
    wrong = {
        _num(per_kg + weight): "adding the two numbers",
        _num(weight / per_kg, 2): "dividing the weight by the dose per kg",
        _num(dose * 10): "a tenfold slip",
    }
    stem = f"A child weighing {weight} kg is prescribed {drug} {per_kg} mg/kg. What single dose should be given?"
    why = f"A weight-based dose is the dose per kg times the weight.\n{per_kg} mg/kg x {weight} kg = {dose} mg."
    options = {f"{_num(dose)} mg": True} | {f"{k} mg": False for k in wrong}
    return stem, options, why


def _units(rng: random.Random) -> tuple[str, dict[str, bool], str]:
    src, dst, factor = rng.choice(_UNITS)
    base = rng.randint(1, 99) * 10.0 ** rng.randint(-2, 0)
    value = base if factor > 1 else base * 1000
    right = value * factor
    slips = {right * 10, right / 10, value / factor if factor > 1 else value * 1000}
    slips.discard(right)
    wrong = sorted(slips)[:3]
    verb = f"multiply by {_num(factor)}" if factor > 1 else "divide by 1000"
    per = f"1 {src} = 1000 {dst}" if factor > 1 else f"1 {dst} = 1000 {src}"
    stem = f"Convert {_num(value)} {src} to {dst}."
    why = f"{per}, so {verb}.\n{_num(value)} {src} = {_num(right, 4)} {dst}."
    options = {f"{_num(right, 4)} {dst}": True} | {f"{_num(w, 4)} {dst}": False for w in wrong}
    return stem, options, why


_MAKERS: dict[str, Callable[[random.Random], tuple[str, dict[str, bool], str]]] = {
    "lab": _lab,
    "dose": _dose,
    "units": _units,
}


def rows(n: int = 1200, seed: int = 0, skills: tuple[str, ...] = SKILLS) -> list[dict[str, Any]]:
    """``n`` questions cycling through ``skills`` as records (``medcritical.data.skill_questions`` makes them
    MCQs), ids ``skill-<kind>-<number>``; dose and unit options shuffled, lab options in the usual order.

    A question whose options would repeat (two options with the same text) or whose stem was drawn before is
    drawn again, so every question has four distinct options, one key and a stem of its own.
    """
    rng = random.Random(f"medcritical-skills:{seed}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        kind = skills[len(out) % len(skills)]
        stem, options, why = _MAKERS[kind](rng)
        if len(options) != 4 or stem in seen:
            misses += 1
            if misses > 20 * n:
                raise ValueError(f"skills: cannot draw {n} distinct questions")
            continue
        seen.add(stem)
        texts = list(options)
        if kind in SHUFFLED:
            rng.shuffle(texts)
        letters = "ABCD"
        out.append(
            {
                "id": f"skill-{kind}-{len(out) + 1:04d}",
                "question": stem,
                "options": {letters[i]: t for i, t in enumerate(texts)},
                "answer": [letters[texts.index(next(t for t, ok in options.items() if ok))]],
                "explanation": why,
                "source": f"{SOURCE}:{kind}",
            }
        )
    return out


def template(mcq: Any) -> tuple[str, str]:
    """(plan, working) of a generated question: its explanation's first line, then the rest."""
    plan, _, steps = mcq.explanation.partition("\n")
    return plan.strip(), steps.strip()
