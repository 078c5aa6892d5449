#!/usr/bin/env bash
# `bash setup.sh --gpu` runs this first: a CUDA stack that works, or one line saying why not.
#   1. the driver's CUDA version (nvidia-smi): torch from PyPI is a CUDA 13 build (driver >= 580); an older
#      driver gets torch from the matching PyTorch index, or the driver to install
#   2. nvcc from PATH or the usual CUDA homes, and the card's compute capability: llama-cpp-python is built for
#      that card, with build progress shown, and rebuilt when the installed one cannot offload
#   3. setup.sh's GPU install, then a check that torch and llama.cpp both see the card
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "setup.sh --gpu: $*" >&2; exit 1; }
smi=$(command -v nvidia-smi || true)
[ -n "$smi" ] || { [ -x /usr/lib/wsl/lib/nvidia-smi ] && smi=/usr/lib/wsl/lib/nvidia-smi; }  # WSL2
[ -n "$smi" ] || die "no nvidia-smi: install the NVIDIA driver (580 or newer), or run bash setup.sh for the CPU"
cuda=$("$smi" | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)
[ -n "$cuda" ] || die "nvidia-smi sees no GPU (or its driver is not loaded): check \`nvidia-smi\`"
index=$("${PYTHON:-python3}" -m medcritical.gpu_check torch-index) ||
  die "driver CUDA $cuda is too old for torch 2.13: install NVIDIA driver 580 or newer (525.60.13+ for CUDA 12)"
if [ "$index" != cu130 ]; then  # PyPI's torch needs driver >= 580: take the build this driver runs
  export PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/$index"
  echo "driver CUDA $cuda: torch from $PIP_EXTRA_INDEX_URL"
fi
nvcc=$(command -v nvcc || true)
for home in ${MEDCRITICAL_CUDA_HOMES:-/usr/local/cuda /usr/local/cuda-* /opt/cuda}; do  # often not on PATH
  [ -n "$nvcc" ] || { [ -x "$home/bin/nvcc" ] && nvcc="$home/bin/nvcc"; } || true
done
[ -n "$nvcc" ] || die "no nvcc (CUDA toolkit) on PATH or under /usr/local/cuda*/bin: install the CUDA toolkit, or add its bin to PATH"
export PATH="$(dirname "$nvcc"):$PATH" CUDACXX="$nvcc"
arch=$("$smi" --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
[ -n "$arch" ] || die "nvidia-smi gave no compute capability: update the NVIDIA driver"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch}"
venv="${MEDCRITICAL_VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
offload='import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)'
if ! "$py" -c "$offload" 2>/dev/null; then
  # Not installed, or a CPU build (pip's cache would hand the same CPU wheel back): build it for this card.
  pin=$(grep -hoE '^llama-cpp-python[^#]*==[0-9.]+' requirements-infer.txt | sed 's/\[.*\]//')
  echo "building $pin for CUDA (sm_$arch, $nvcc); ~15 min"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -v --no-cache-dir --force-reinstall --no-deps "$pin" 2>&1 |
    grep --line-buffered -E '^\s*\[ *[0-9]+%\]|Successfully|ERROR|error:' || true
  "$py" -c "$offload" || die "llama-cpp-python built without CUDA offload: check that $nvcc works (rerun to see the log)"
fi
MEDCRITICAL_GPU_READY=1 bash setup.sh --gpu
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
  die "torch $("$py" -c 'import torch; print(torch.__version__)') does not see the GPU on driver CUDA $cuda: rerun, or install NVIDIA driver 580+"
"$py" -c "$offload" || die "llama-cpp-python cannot offload to the GPU: rerun bash setup.sh --gpu"
echo "CUDA stack ready: torch sees $("$py" -c 'import torch; print(torch.cuda.get_device_name(0))'), llama.cpp offloads"
