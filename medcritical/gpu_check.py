"""What the GPU here can run, from ``nvidia-smi``; and ``run``'s refusal of a stack that would fall back to the CPU.

The card is found through ``nvidia-smi`` (on PATH, or WSL2's ``/usr/lib/wsl/lib``), never through
``/dev/nvidiactl``, which WSL2 does not have, and without making a CUDA context. When ``nvidia-smi`` sees a card,
:func:`preflight` refuses in one line a run whose stages would silently run on the CPU: torch that cannot use the
card (a CUDA 13 build on a 12.x driver, a CPU build), llama-cpp-python built without CUDA, the CPU build of vLLM.
``--allow-cpu`` (``medcritical run``) lets such a run go on, on the CPU.

``python -m medcritical.gpu_check torch-index`` prints the PyTorch wheel index for the driver here (``setup.sh
--gpu`` uses it); it imports nothing but the standard library.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

WINDOWS = (
    "medcritical needs Linux: native Windows lacks fork, flock and wait4, which the pipeline uses; "
    "run it inside WSL2 (`wsl --install`), where the GPU is found through nvidia-smi"
)
ALLOW = "or pass --allow-cpu to run on the CPU"
WSL_SMI = Path("/usr/lib/wsl/lib/nvidia-smi")
# PyTorch's CUDA wheel indexes, newest first, with the CUDA version each needs the driver to run: a driver runs
# builds up to the CUDA version nvidia-smi prints, and any 12.x build from driver 525.60.13 on (CUDA's minor version
# compatibility). PyPI's torch is the cu130 build (driver >= 580, CUDA 13.0).
TORCH_INDEXES = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 6), "cu126"))
TORCH_INDEX_URL = "https://download.pytorch.org/whl/"
MIN_DRIVER = {13: "580", 12: "525.60.13"}  # NVIDIA's CUDA release notes: the minimum driver of each major version


@dataclass(frozen=True)
class Card:
    index: str
    name: str
    total_mib: float
    free_mib: float
    driver: str
    compute_cap: str  # "8.6"

    def __str__(self) -> str:
        return f"{self.name} (driver {self.driver})"


def smi_path() -> str | None:
    return shutil.which("nvidia-smi") or (str(WSL_SMI) if WSL_SMI.is_file() else None)


def smi(*args: str) -> str | None:
    """nvidia-smi's output, or None without a driver (no nvidia-smi, or it fails: no card, driver mismatch)."""
    exe = smi_path()
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def card() -> Card | None:
    """The first GPU the stages will see (``CUDA_VISIBLE_DEVICES``' first entry), or None."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    if first == "-1" or not re.fullmatch(r"\d+|GPU-[0-9a-fA-F-]+", first):
        return None  # CUDA_VISIBLE_DEVICES hides every card (or names a MIG slice, which this does not read)
    fields = "index,name,memory.total,memory.free,driver_version,compute_cap"
    out = smi("-i", first, f"--query-gpu={fields}", "--format=csv,noheader,nounits")
    rows = [[c.strip() for c in line.split(",")] for line in (out or "").splitlines() if line.strip()]
    if not rows or len(rows[0]) != 6:
        return None
    index, name, total, free, driver, cap = rows[0]
    try:
        return Card(index, name, float(total), float(free), driver, cap)
    except ValueError:
        return None


def driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA version the driver runs, from nvidia-smi's banner (``CUDA Version: 12.4``)."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi() or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def others(card: Card) -> list[tuple[str, str, float]]:
    """(pid, process name, MiB) of every other process holding memory on the card."""
    out = smi("-i", card.index, "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits")
    rows = []
    for line in (out or "").splitlines():
        parts = [c.strip() for c in line.split(",")]
        if len(parts) == 3 and parts[0] != str(os.getpid()):
            try:
                rows.append((parts[0], Path(parts[1]).name, float(parts[2])))
            except ValueError:
                pass  # "[N/A]" used memory (WSL2 reports none per process)
    return rows


def torch_index(cuda: tuple[int, int] | None) -> str | None:
    """The newest PyTorch CUDA wheel index a driver that runs CUDA ``cuda`` can run, or None (driver too old)."""
    if cuda is None:
        return None
    for need, name in TORCH_INDEXES:
        if cuda >= need or (cuda[0] == need[0] == 12 and name == TORCH_INDEXES[-1][1]):
            return name
    return None


def _fmt(v: tuple[int, int] | None) -> str:
    return "unknown" if v is None else f"{v[0]}.{v[1]}"


def _version(s: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", s or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def torch_problem(here: Card) -> str | None:
    """Why torch cannot use the card nvidia-smi sees (which torch or driver fixes it), or None when it can."""
    try:
        import torch
    except ImportError:
        return None  # an inference-only install: the stages that need torch say so
    if torch.cuda.is_available():
        return None
    drv = driver_cuda()
    built = _version(torch.version.cuda)
    if built is None:
        return f"torch {torch.__version__} is a CPU build; run `bash setup.sh --gpu` to install a CUDA build"
    if drv is not None and built > drv:
        index = torch_index(drv)
        fix = (
            f"update the NVIDIA driver to {MIN_DRIVER.get(built[0], 'a newer one')} or newer, or run "
            f"`bash setup.sh --gpu`, which installs torch for CUDA {index[2:4]}.{index[4:]} ({TORCH_INDEX_URL}{index})"
            if index
            else f"install NVIDIA driver {MIN_DRIVER.get(built[0], '580')} or newer"
        )
        return (
            f"torch {torch.__version__} is built for CUDA {_fmt(built)}, but driver {here.driver} runs CUDA up to "
            f"{_fmt(drv)}: {fix}"
        )
    return (
        f"torch {torch.__version__} (CUDA {_fmt(built)}) finds no GPU though nvidia-smi shows {here.name}: check "
        "CUDA_VISIBLE_DEVICES and `python -c 'import torch; torch.cuda.init()'`"
    )


def llama_problem() -> str | None:
    """Why llama.cpp would run on the CPU (a build without CUDA), or None."""
    try:
        import llama_cpp
    except ImportError:
        return None  # not installed: the stage that needs it says so
    if llama_cpp.llama_supports_gpu_offload():
        return None
    return (
        f"llama-cpp-python {getattr(llama_cpp, '__version__', '')} was built without CUDA (cannot offload layers); "
        "run `bash setup.sh --gpu` to rebuild it with CUDA (it finds nvcc under /usr/local/cuda*)"
    )


def vllm_problem() -> str | None:
    from .serving.vllm import vllm_available, vllm_cpu_build, vllm_venv

    if vllm_available() and vllm_cpu_build():
        return (
            f"the vLLM in {vllm_venv()} is the CPU build (vllm-cpu); rerun `bash setup.sh --vllm` on this machine to "
            "install the CUDA build, or set rounds.rollouts.engine=llamacpp"
        )
    return None


def needs(recipe: Any, stages: list[str]) -> dict[str, bool]:
    """Which libraries the selected stages run on the GPU."""
    engine = recipe.rounds.rollouts.engine
    rounds = "rounds" in stages and recipe.rounds.num_rounds > 0
    return {
        "torch": bool({"sft", "rounds", "export"} & set(stages)) or (
            "teach" in stages and recipe.teach.backend == "transformers"
        ),
        "llama_cpp": bool({"export", "eval"} & set(stages))
        or (rounds and engine in ("llamacpp", "llamacpp-server"))
        or ("teach" in stages and recipe.teach.backend == "gguf"),
        "vllm": rounds and engine in ("vllm", "auto"),
    }  # fmt: skip


def preflight(recipe: Any, recipe_path: str | Path, stages: list[str], *, allow_cpu: bool = False) -> Card | None:
    """The card the run will use, or None without one (or with ``allow_cpu``). Raises a one-line UserError when
    nvidia-smi sees a card that torch, llama.cpp or vLLM, as installed, would not use."""
    here = card()
    if here is None or allow_cpu:
        return None
    need = needs(recipe, stages)
    checks = [("torch", torch_problem, (here,)), ("llama_cpp", llama_problem, ()), ("vllm", vllm_problem, ())]
    for lib, check, args in checks:
        if need[lib]:
            problem = check(*args)
            if problem:
                raise UserError(f"{recipe_path}: nvidia-smi sees {here} but {problem}; {ALLOW}")
    return here


def refuse_windows() -> None:
    if os.name == "nt":
        raise UserError(WINDOWS)


if __name__ == "__main__":  # python -m medcritical.gpu_check torch-index
    if sys.argv[1:] == ["torch-index"]:
        index = torch_index(driver_cuda())
        print(index or "")
        sys.exit(0 if index else 1)
    sys.exit("usage: python -m medcritical.gpu_check torch-index")
