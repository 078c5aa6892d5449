"""Every path of a run directory, in one place.

Stages never spell each other's paths: they ask a :class:`RunDir` (``run.sft_adapter``,
``run.round(2).pairs_file``). The layout::

    <run>/
      manifest.json  report.md  report.png  report.json     the run (pipeline)
      .lock  .stale/  .pipeline/                            one process at a time; replaced work; stage logs, recipe
      cache/teach/                                          teacher calls (a cache: safe to delete)
      teach/        templates.jsonl  rejected.jsonl         step "teach"
      sft/          adapter/  checkpoints/  metrics.jsonl   step "sft"
      rounds/       rounds.json  rounds.md  rounds.png      which round is the policy, and why
        round-0/eval/                                       the SFT policy on the dev split
        round-N/    rollouts/ corrections/ pairs/ dpo/ eval/   one step each; dpo/adapter is the round's policy
      policies/<key>/                                       GGUF builds of a policy (merged, f16, quants)
      export/       <name>-<quant>.gguf  report.md          the selected policy, stamped, with its parity
      eval/         base/  <quant>/                         the untrained base and each exported quant
      bundle/                                               what ships: GGUF, Modelfile, MODEL_CARD.md, SHA256SUMS

No step directory holds another step's directory, so moving one aside never
takes another with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RoundDir:
    root: Path

    @property
    def number(self) -> int:
        return int(self.root.name.removeprefix("round-"))

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    @property
    def rollouts_log(self) -> Path:
        return self.rollouts / "rollouts.jsonl"

    @property
    def corrections(self) -> Path:
        return self.root / "corrections"

    @property
    def corrections_log(self) -> Path:
        return self.corrections / "corrections.jsonl"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs"

    @property
    def pairs_file(self) -> Path:
        return self.pairs / "pairs.jsonl"

    @property
    def dpo(self) -> Path:
        return self.root / "dpo"

    @property
    def adapter(self) -> Path:
        return self.dpo / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.dpo / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.root / "eval"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, recipe: Any) -> RunDir:
        return cls(Path(recipe.output_dir))

    # the run as a whole
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def stale(self) -> Path:
        return self.root / ".stale"

    def stage_log(self, stage: str) -> Path:
        """What a stage's process did (its steps' outcomes and metrics), for the pipeline."""
        return self.root / ".pipeline" / f"{stage}.json"

    @property
    def pipeline_recipe(self) -> Path:
        """The recipe a ``run`` resolved once (file and overrides), which its stage processes read."""
        return self.root / ".pipeline" / "recipe.yaml"

    # teach
    @property
    def teach(self) -> Path:
        return self.root / "teach"

    @property
    def templates(self) -> Path:
        return self.teach / "templates.jsonl"

    @property
    def rejected(self) -> Path:
        return self.teach / "rejected.jsonl"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "cache" / "teach"

    # sft
    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def sft_adapter(self) -> Path:
        return self.sft / "adapter"

    @property
    def sft_checkpoints(self) -> Path:
        return self.sft / "checkpoints"

    # rounds
    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    @property
    def rounds_json(self) -> Path:
        return self.rounds / "rounds.json"

    @property
    def sft_eval(self) -> Path:
        return self.rounds / "round-0" / "eval"

    def round(self, r: int) -> RoundDir:
        return RoundDir(self.rounds / f"round-{r}")

    def round_dirs(self) -> list[RoundDir]:
        found = []
        for d in self.rounds.glob("round-*") if self.rounds.is_dir() else []:
            n = d.name.removeprefix("round-")
            if n.isdigit() and int(n) > 0:
                found.append(RoundDir(d))
        return sorted(found, key=lambda rd: rd.number)

    # GGUF builds, export, eval, bundle
    @property
    def policies(self) -> Path:
        return self.root / "policies"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def export_gguf(self, name: str, quant: str) -> Path:
        return self.export / f"{name}-{quant}.gguf"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def base_eval(self) -> Path:
        return self.eval / "base"

    def quant_eval(self, quant: str) -> Path:
        return self.eval / quant

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"
