"""What the setup files install (pip's resolver, asked on PyPI, nothing installed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pins(req: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file and the files it includes (``-r``)."""
    out: dict[str, str] = {}
    for line in req.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out |= pins(req.parent / line[3:].strip())
        elif m := re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", line):
            out[canonicalize_name(m[1])] = m[2]
    return out


def test_gpu_requirements_resolve_to_every_pin_torch_included(tmp_path: Path) -> None:
    """One resolver call over requirements-gpu.txt keeps torch (and every other pin) as pinned.

    unsloth's own dependencies name torchvision and xformers without versions; resolved after torch was
    installed, pip took torchvision 0.29.1 and with it torch 2.14.1 (measured). requirements-gpu.txt pins
    the builds made for torch 2.13.0 and includes requirements.txt, so setup.sh --gpu resolves them together.
    """
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--report", str(report), "-r", str(ROOT / "requirements-gpu.txt")]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=900, cwd=tmp_path)
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}  # fmt: skip
    wanted = pins(ROOT / "requirements-gpu.txt")
    assert {"torch", "unsloth", "trl", "transformers", "torchvision"} <= set(wanted)
    # A local build of the same release (2.13.0+cpu from a wheel on disk) is the same pin.
    wrong = {n: (v, resolved.get(n)) for n, v in wanted.items() if Version(resolved.get(n, "0")).public != v}
    assert not wrong, f"resolved other versions than pinned: {wrong}"


def _setup_fails(env_extra: dict[str, str], tmp_path: Path, path: str | None = None) -> str:
    """Run the real setup.sh until its first check fails; its stderr, which must be one line."""
    import os

    env = {**os.environ, "MEDCRITICAL_VENV": str(tmp_path / "venv"), **env_extra}
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run(["bash", str(ROOT / "setup.sh"), "--infer"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_setup_refuses_an_old_python_in_one_line(tmp_path: Path) -> None:
    old = Path("/root/.pyenv/versions/2.7.18/bin/python")
    if not old.exists():
        import pytest

        pytest.skip("no Python older than 3.10 on this machine")
    line = _setup_fails({"PYTHON": str(old)}, tmp_path)
    assert line.startswith("setup: Python 3.10 or newer is needed") and "2.7.18" in line and "PYTHON=python3.11" in line


def test_setup_without_a_compiler_says_what_to_install(tmp_path: Path) -> None:
    """A PATH with the shell tools and Python but no C/C++ compiler, as on a bare server."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "df", "awk", "grep", "head", "mkdir", "cut", "nproc"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "python3").symlink_to(Path(sys.executable).resolve())  # the interpreter itself, not a shim
    line = _setup_fails({"PYTHON": "python3"}, tmp_path, path=str(bin_dir))
    assert line.startswith("setup: no C/C++ compiler") and "apt-get install build-essential cmake" in line
