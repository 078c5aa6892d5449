"""The policy (base + LoRA adapter) as something that generates: the engine rollouts,
corrections and dev evaluations sample it on.

``rounds.rollouts.engine`` names it (:func:`engine_kind` resolves ``auto``):

* ``llamacpp``: a q8_0 GGUF of base + adapter (:func:`policy_gguf`, built once per
  adapter into ``<run>/policies`` by :func:`medcritical.gguf.build.build_gguf`), sampled
  in-process by llama.cpp; the default on CPU, several times faster there than
  transformers on the 4-bit model (``bench/rollouts.py``);
* ``transformers``: the 4-bit base with the adapter, as in training.

Each generated row, evaluation and round names the engine that produced it, and
the engine's settings are part of the keys of the steps it feeds.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import UserError

QTYPE = "q8_0"


@dataclass
class PolicyGGUF:
    path: Path  # the q8_0 GGUF
    adapter_hash: str | None  # None: the base model without adapter
    exported: bool  # False: found in the cache


def policy_gguf(
    base: str,
    adapter: str | Path | None,
    cache_dir: str | Path,
    *,
    console: Console | None = None,
    adapter_hash: str | None = None,
    keep_intermediate: bool = False,
) -> PolicyGGUF:
    """The q8_0 GGUF of ``base`` + ``adapter`` (None: the base), built once per adapter into ``cache_dir``.

    Without ``keep_intermediate`` the merged weights and the f16 GGUF are
    deleted once q8_0 is written. The rounds keep them (and prune all but the
    selected policy's, :func:`medcritical.gguf.build.prune`), so the export of the policy
    it ships merges and converts nothing again.
    """
    from .gguf.build import build_gguf

    b = build_gguf(
        base, Path(adapter) if adapter is not None else None, Path(cache_dir), [QTYPE],
        adapter_hash=adapter_hash, keep_intermediate=keep_intermediate, console=console,
    )  # fmt: skip
    return PolicyGGUF(b.files[QTYPE], adapter_hash, bool(b.built))


def engine_kind(recipe: Any) -> str:
    """The engine that samples the policy: ``rounds.rollouts.engine``, with ``auto`` resolved.

    ``auto``: vLLM when it is installed (``bash setup.sh --vllm``) and CUDA is
    present; else llama.cpp on a q8_0 GGUF of the policy when the GGUF converter
    is installed; else transformers.
    """
    want = recipe.rounds.rollouts.engine
    if want != "auto":
        return want
    import importlib.util

    from .models import cuda_available

    if cuda_available():
        from .serving.vllm import vllm_available

        return "vllm" if vllm_available() else "transformers"
    if importlib.util.find_spec("llama_cpp") is None:
        return "transformers"
    from .gguf.convert import find_converter

    try:
        find_converter()
    except UserError:
        return "transformers"
    return "llamacpp"


def engine_settings(recipe: Any) -> dict[str, Any]:
    """What the engine contributes to the key of a step it generates for."""
    kind = engine_kind(recipe)
    settings: dict[str, Any] = {"engine": kind}
    srv = recipe.rounds.rollouts.server
    if kind == "transformers":
        settings |= {"load_in_4bit": recipe.model.load_in_4bit, "dtype": recipe.model.dtype}
    elif kind in ("llamacpp", "llamacpp-server"):
        settings |= {"qtype": QTYPE, "n_ctx": recipe.eval.n_ctx}
    elif kind == "vllm":
        settings |= {"lora": srv.lora, "dtype": srv.dtype, "max_model_len": srv.max_model_len}
        settings["extra_args"] = srv.extra_args
    else:
        settings |= {"base_url": srv.base_url, "model": srv.model}
    return settings


def open_policy(
    recipe: Any,
    adapter: Path | None,
    console: Console | None = None,
    *,
    gguf: Path | None = None,
    adapter_hash: str | None = None,
    keep_intermediate: bool = True,
) -> Any:
    """The base + ``adapter`` (None: the base alone) on the recipe's engine, or ``gguf`` on llama.cpp.

    A served engine starts its server here (on 127.0.0.1, dying with this
    process); closing the engine stops it, so the memory is free again before
    training starts.
    """
    from .layout import RunDir

    console = console or Console(stderr=True)
    kind = "llamacpp" if gguf is not None else engine_kind(recipe)
    cache = RunDir.of(recipe).policies
    srv = recipe.rounds.rollouts.server
    if kind in ("llamacpp", "llamacpp-server"):
        from .engines import LlamaCppEngine

        if gguf is None:
            gguf = policy_gguf(
                recipe.model.name_or_path, adapter, cache, console=console, adapter_hash=adapter_hash,
                # the rounds prune all but the selected policy's; a corrector needs only its q8_0
                keep_intermediate=keep_intermediate and adapter is not None,
            ).path  # fmt: skip
        if kind == "llamacpp":
            return LlamaCppEngine(gguf, n_ctx=recipe.eval.n_ctx, seed=recipe.seed)
        from .serving.llamacpp import LlamaCppServer

        with console.status(f"starting llama.cpp server on {gguf} ({srv.parallel} process(es))..."):
            server = LlamaCppServer(
                gguf, n_ctx=recipe.eval.n_ctx, n_parallel=srv.parallel, log_file=gguf.parent / "server.log",
                logits_all=recipe.rounds.force_answer,
            ).start()  # fmt: skip
        return server.engine()  # two requests in flight per process: one decoding, the next queued
    if kind == "vllm":
        return _vllm(recipe, adapter, adapter_hash, cache, console)
    if kind == "openai":
        import os

        from .serving.client import OpenAIEngine
        from .serving.vllm import VLLM_SAMPLING, load_lora_adapter

        key = os.environ.get(srv.api_key_env)
        if adapter is not None:
            name = load_lora_adapter(srv.base_url, adapter, api_key=key, adapter_hash=adapter_hash)
        elif srv.model:
            name = srv.model
        else:
            raise UserError("rounds.rollouts.server.model: name the base model served at server.base_url")
        return OpenAIEngine(
            srv.base_url, name, key, concurrency=srv.concurrency, extra_body=VLLM_SAMPLING,
            tokenizer_or_template=str(adapter) if adapter is not None else None,
        )  # fmt: skip
    from .engines import HFEngine
    from .models import load_model

    with console.status(f"loading {recipe.model.name_or_path}" + (f" + {adapter}" if adapter else "") + "..."):
        loaded = load_model(recipe.model, adapter=adapter)
    return HFEngine(loaded.model, loaded.tokenizer)


def _vllm(recipe: Any, adapter: Path | None, adapter_hash: str | None, cache: Path, console: Console) -> Any:
    """vLLM on the base with the adapter as a LoRA (``server.lora``), or on the merged policy."""
    from .default_model import resolve_model
    from .serving.vllm import VllmServer, vllm_available

    if not vllm_available():
        raise UserError(
            "rounds.rollouts.engine: vllm is not installed; run `bash setup.sh --vllm` (docs/serving-engines.md)"
        )
    srv = recipe.rounds.rollouts.server
    kw = {
        "max_model_len": srv.max_model_len or recipe.eval.n_ctx,
        "tensor_parallel_size": srv.tensor_parallel_size,
        "dtype": srv.dtype,
        "extra_args": tuple(srv.extra_args),
        "seed": recipe.seed,
    }
    if srv.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = srv.gpu_memory_utilization
    if adapter is not None and not srv.lora:
        from .gguf.build import build_gguf

        build = build_gguf(recipe.model.name_or_path, adapter, cache, [QTYPE], adapter_hash=adapter_hash,
                           keep_intermediate=True, console=console)  # fmt: skip
        model_dir, lora = build.merged, None
    else:
        model_dir, lora = Path(resolve_model(recipe.model.name_or_path)), adapter
    log = cache / f"vllm-{(adapter_hash or 'base')[:16]}.log"
    with console.status(f"starting vLLM on {model_dir}" + (f" + LoRA {lora}" if lora else "") + "..."):
        server = VllmServer(model_dir, lora_dir=lora, log_file=log, **kw).start()
    return server.engine(concurrency=srv.concurrency)


class LazyPolicy:
    """A policy engine built on first use: a resumed step whose generations are all on disk loads nothing."""

    def __init__(
        self,
        recipe: Any,
        adapter: Path | None,
        console: Console,
        adapter_hash: str | None = None,
        keep_intermediate: bool = True,
    ) -> None:
        self.args = (recipe, adapter, console)
        self.adapter_hash = adapter_hash
        self.keep = keep_intermediate  # False: the merged weights and f16 GGUF need not stay (a corrector's)
        self.engine: Any = None

    def __getattr__(self, name: str) -> Any:
        if name in ("args", "adapter_hash", "engine", "keep"):
            raise AttributeError(name)
        if self.engine is None:
            self.engine = open_policy(*self.args, adapter_hash=self.adapter_hash, keep_intermediate=self.keep)
        return getattr(self.engine, name)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            gc.collect()

    def info(self) -> dict[str, str] | None:
        """Which engine ran (and on which GGUF); None when it was never needed."""
        if self.engine is None:
            return None
        gguf = getattr(self.engine, "gguf", None)
        return {"engine": self.engine.name} | ({"gguf": str(gguf)} if gguf else {})


def selected_policy(run_dir: Any) -> tuple[Path, dict[str, Any]]:
    """The adapter the rounds selected (rounds.json), checked against its recorded hash; else SFT's.

    Raises UserError when there is no trained adapter or the files no longer
    match what the rounds recorded (they changed after the rounds ran).
    """
    from .artifacts import read_json, sha256_tree

    if run_dir.rounds_json.is_file():
        table = read_json(run_dir.rounds_json)
        sel = table["selected"]
        sft = run_dir.sft_adapter
        if not (sft / "adapter_config.json").is_file() or sha256_tree(sft) != table["chain"][0]["hash"]:
            raise UserError(f"{run_dir.rounds_json}: the rounds ran on another SFT adapter; run the rounds again")
        link = next(c for c in table["chain"] if c["round"] == sel)
        path = run_dir.root / link["adapter"]
        if not (path / "adapter_config.json").is_file() or sha256_tree(path) != link["hash"]:
            raise UserError(
                f"{path}: the adapter the rounds selected (round {sel}) is missing or changed since; run the rounds again"
            )
        return path, {"round": sel, "hash": link["hash"], "chain": table["chain"]}
    if (run_dir.sft_adapter / "adapter_config.json").is_file():
        return run_dir.sft_adapter, {"round": 0, "hash": sha256_tree(run_dir.sft_adapter), "chain": []}
    raise UserError(f"no trained adapter under {run_dir.root} (sft/adapter); run sft (and the rounds) first")
