"""The stages of a run, in order, and the refusal to start one whose inputs are not complete.

    teach -> sft -> rounds -> export -> eval -> bundle

Each stage has a ``run(recipe, run_dir, console) -> metrics`` and, when a
later stage reads what it made, a ``check(recipe, run_dir, console)`` that
raises :class:`UserError` unless that is complete for the recipe (it runs and
writes nothing). This module only knows the names and the order: it imports
no stage, so the pipeline (which runs them all) and a stage that checks its
own inputs (``export.stage``) both read it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console

from .errors import UserError
from .layout import RunDir

STAGES = ("teach", "sft", "rounds", "export", "eval", "bundle")

Check = Callable[[Any, RunDir, Console], None]


def upstream(stage: str) -> tuple[str, ...]:
    """The stages before ``stage``."""
    return STAGES[: STAGES.index(stage)]


def require_upstream(stage: str, checks: Mapping[str, Check], recipe: Any, run_dir: RunDir, console: Console) -> None:
    """Refuse (UserError, one line) unless every stage before ``stage`` is complete for ``recipe``;
    ``checks``: stage -> its check, for every stage before ``stage``."""
    for up in upstream(stage):
        try:
            checks[up](recipe, run_dir, console)
        except UserError as e:
            raise UserError(f"{e}; run the {up} stage first") from None


def select_stages(start: str | None = None, only: str | None = None) -> list[str]:
    """The stages ``medcritical run`` runs: all, those from ``start`` on, or ``only`` one."""
    names = list(STAGES)
    if start and only:
        raise UserError("run: --from and --only exclude each other")
    for name in (start, only):
        if name is not None and name not in STAGES:
            raise UserError(f"run: unknown stage {name!r}; stages: {', '.join(names)}")
    if only:
        return [only]
    return names[names.index(start) :] if start else names
