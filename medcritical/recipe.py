"""The recipe: one validated YAML file describes a whole run.

Sections are named after the stages (``teach``, ``sft``, ``rounds``,
``export``, ``eval``). Keys passed through to TRL and peft keep their names
there (``learning_rate``, ``beta``, ``r``, ``lora_alpha``), so those libraries'
docs document them. Every section forbids unknown keys: a typo in a file or in
a ``key.sub=value`` override is an error, never a silently new setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(Section):
    name_or_path: str = "default"  # "default" = embedded SmolLM2-135M-Instruct
    backend: Literal["auto", "transformers", "unsloth"] = "auto"
    load_in_4bit: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_seq_length: int = Field(2048, gt=0)


class Source(Section):
    path: str  # a file or dataset directory; "demo" = the bundled demo set; "skills" = medcritical.skills
    format: Literal["auto", "cmexam", "jsonl", "medqa", "hf-disk"] = "auto"
    limit: int | None = Field(None, gt=0)
    lang: Literal["any", "zh", "en"] = "any"  # keep only questions in this language (CJK text = zh)


class DataCfg(Section):
    sources: list[Source] = Field(default_factory=lambda: [Source(path="demo")], min_length=1)
    dev: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0
    strict: bool = False


class TeachCfg(Section):
    backend: Literal["dataset", "openai", "gguf", "transformers"] = "dataset"
    model: str | None = None  # API model name, GGUF path or transformers path
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    hinted: bool = False  # tell the teacher the key (rescues hard questions)
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(4096, gt=0)
    samples: int = Field(1, gt=0)  # attempts per question until one is verified
    concurrency: int = Field(4, gt=0)
    timeout: float = Field(600, gt=0)
    retries: int = Field(4, ge=0)
    limit: int | None = Field(None, gt=0)
    cache_dir: str | None = None  # teacher-call cache shared across runs (default: <output_dir>/cache/teach)
    # keep: the SFT target starts with the teacher's chain of thought (its <think> block or the API's
    # reasoning field) in a <think> block, before the plan and reasoning sections; drop: only the sections.
    reasoning: Literal["drop", "keep"] = "drop"

    @model_validator(mode="after")
    def _needs(self) -> TeachCfg:
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ValueError("backend openai needs base_url and model")
        if self.backend in ("gguf", "transformers") and not self.model:
            raise ValueError(f"backend {self.backend} needs model (a path)")
        return self


class LoraCfg(Section):
    r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainCfg(Section):
    """Keys with TRL's ``SFTConfig``/``DPOConfig`` names."""

    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_steps: float = Field(0.05, ge=0)  # transformers 5: < 1 is a ratio of total steps
    lr_scheduler_type: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0)
    optim: str = "adamw_torch"
    # Where training metrics go besides metrics.jsonl: TensorBoard event files under the step's checkpoints
    # directory (`tensorboard --logdir RUN`), or W&B only when named. Nothing networked by default.
    report_to: Literal["none", "tensorboard", "wandb"] = "none"

    @field_validator("report_to")
    @classmethod
    def _installed(cls, v: str) -> str:
        import importlib.util

        if v != "none" and importlib.util.find_spec(v) is None:  # checked before any model loads
            raise ValueError(f"{v} needs the {v} package: pip install {v}")
        return v

    # TRL's fused path (DPO: the chunked log-probabilities, no (chosen+rejected) x length x vocab logits). On a CUDA
    # GPU only: liger-kernel runs on triton (requirements-gpu.txt installs it).
    use_liger_kernel: bool = False


class SftCfg(Section):
    lora: LoraCfg = Field(default_factory=LoraCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    max_length: int = Field(2048, gt=0)


class ServerCfg(Section):
    """Settings of the served engines (``rounds.rollouts.engine``: vllm, llamacpp-server, openai)."""

    concurrency: int = Field(16, gt=0)  # requests in flight
    # vllm: serve the base with the round's adapter through vLLM's LoRA support (the usual GPU path), or the
    # merged policy (false; the fast path on CPU, at the cost of a merge per policy).
    lora: bool = True
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0)
    tensor_parallel_size: int = Field(1, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    extra_args: list[str] = Field(default_factory=list)  # passed to `vllm serve` as they are
    parallel: int = Field(1, gt=0)  # llamacpp-server: server processes (it decodes one request at a time)
    # openai: a server you run (vLLM, SGLang, llama.cpp; one machine or a cluster). The round's adapter is
    # loaded into it through vLLM's runtime LoRA endpoint; a server that cannot is refused, never sampled stale.
    base_url: str | None = None
    model: str | None = None  # the base model's name on that server (for the untrained base)
    api_key_env: str = "OPENAI_API_KEY"


class RolloutCfg(Section):
    k: int = Field(4, gt=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(1024, gt=0)
    # auto: vllm when it is installed (bash setup.sh --vllm) and CUDA is present, else llamacpp (in-process,
    # on a q8_0 GGUF of the policy) when the GGUF converter is installed, else transformers.
    engine: Literal["auto", "transformers", "llamacpp", "llamacpp-server", "vllm", "openai"] = "auto"
    server: ServerCfg = Field(default_factory=ServerCfg)
    # Sequences generated together: batch_size // k questions with their k samples per generate call (llama.cpp
    # decodes them in one batch per step; transformers pads them into one batch; served engines get them at once).
    batch_size: int = Field(8, gt=0)
    questions: int | None = Field(None, gt=0)  # train questions per round (None = all)
    # Start every reply with the layout's first heading ("### Plan"), as the SFT templates do: a small student
    # then writes the layout the pairs need far more often. Evaluation never does this.
    lead: bool = True

    @model_validator(mode="after")
    def _served(self) -> RolloutCfg:
        if self.engine == "openai" and not self.server.base_url:
            raise ValueError("engine openai needs server.base_url (and server.model for the base)")
        return self


class CorrectionCfg(Section):
    by: Literal["sft", "policy"] = "sft"
    hint: Literal["none", "wrong"] = "wrong"  # "wrong": say only that the answer is wrong
    attempts: int = Field(2, gt=0)
    # Wrong trajectories corrected per question (None = all); those with a parsed wrong answer go first.
    per_question: int | None = Field(None, gt=0)
    temperature: float = Field(0.7, ge=0)
    max_new_tokens: int = Field(1024, gt=0)


class PairsCfg(Section):
    strategy: Literal["correction", "self-consistency", "mixed"] = "correction"
    max_per_question: int = Field(2, gt=0)
    max_length: int = Field(2048, gt=0)
    # Whether a right sample must be in the student layout to be chosen (a correction always must: its last
    # template is what is trained). Unset: required unless rounds.force_answer is on.
    require_layout: bool | None = None


class DpoCfg(Section):
    """Keys with TRL's ``DPOConfig`` names."""

    beta: float = Field(0.1, gt=0)
    loss_type: list[str] | str = "sigmoid"
    precompute_ref_log_probs: bool = False
    train: TrainCfg = Field(default_factory=lambda: TrainCfg(learning_rate=5e-6))


class RoundsCfg(Section):
    num_rounds: int = Field(3, ge=0)
    rollouts: RolloutCfg = Field(default_factory=RolloutCfg)
    correction: CorrectionCfg = Field(default_factory=CorrectionCfg)
    pairs: PairsCfg = Field(default_factory=PairsCfg)
    dpo: DpoCfg = Field(default_factory=DpoCfg)
    early_stop: bool = True
    # A rollout or correction without its own answer line gets the answer cue and the model picks among the
    # option letters by its next-token scores (medcritical.selfplay); false: the lenient reading of old.
    force_answer: bool = True


QUANTS = ("f16", "bf16", "q8_0", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1")


class ShipCfg(Section):
    """Which exported quant goes into the bundle: the smallest candidate whose dev accuracy is at most
    ``tolerance`` below the merged model's and whose answers agree with it on at least 1 - ``tolerance``
    of the questions both answered (measured on the parity questions)."""

    candidates: list[str] | None = None  # default: every quant in export.quants
    tolerance: float = Field(0.02, ge=0, le=1)


class ExportCfg(Section):
    merge_into: Literal["base16", "dequantized4bit"] = "base16"
    outtype: Literal["f16", "bf16"] = "f16"
    quants: list[str] = Field(default_factory=lambda: ["q8_0", "q4_k_m"])
    parity_questions: int = Field(20, gt=0)
    f16_max_rel_error: float = Field(1e-2, gt=0)
    ship: ShipCfg = Field(default_factory=ShipCfg)

    @model_validator(mode="after")
    def _known(self) -> ExportCfg:
        bad = [q for q in self.quants if q not in QUANTS]
        if bad:
            raise ValueError(f"unknown quant types {bad}; known: {', '.join(QUANTS)}")
        if not self.quants:
            raise ValueError("export.quants: name at least one quant type to ship")
        extra = [q for q in self.ship.candidates or [] if q not in self.quants]
        if extra:
            raise ValueError(f"export.ship.candidates {extra} are not in export.quants")
        return self


class EvalCfg(Section):
    split: Literal["train", "dev", "test", "all"] = "dev"
    limit: int | None = Field(None, gt=0)
    mode: Literal["generate", "loglik"] = "generate"
    max_new_tokens: int = Field(1024, gt=0)
    batch_size: int = Field(8, gt=0)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n_ctx: int = Field(4096, gt=0)


class Recipe(Section):
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    language: Literal["auto", "zh", "en"] = "auto"
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    teach: TeachCfg = Field(default_factory=TeachCfg)
    sft: SftCfg = Field(default_factory=SftCfg)
    rounds: RoundsCfg = Field(default_factory=RoundsCfg)
    export: ExportCfg = Field(default_factory=ExportCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _one_line(where: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "<top>"
    if e["type"] == "extra_forbidden":
        return f"{where}: {loc}: unknown key"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] not in ("value_error",) and "input" in e and not isinstance(e["input"], dict):
        msg += f", got {e['input']!r}"
    more = len(err.errors()) - 1
    return f"{where}: {loc}: {msg}" + (f" (and {more} more)" if more else "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value); split on the first ``=``."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; errors are one line naming the key."""
    data: dict = {}
    where = "recipe"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise UserError(f"{path}: no such recipe file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f"line {mark.line + 1}: " if mark else ""
            raise UserError(f"{path}: {line}not valid YAML") from None
        if loaded is None:
            raise UserError(f"{path}: the recipe is empty (write `{{}}` to mean every default)")
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping at the top level")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        where += " (with overrides)"
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(_one_line(where, e)) from None


def recipes_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"
