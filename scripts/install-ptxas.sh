#!/usr/bin/env bash
# Installs `ptxas` (NVIDIA's PTX assembler, from the PyPI package nvidia-cuda-nvcc-cu12; no GPU
# or CUDA toolkit needed) into a Python venv and prints its path on stdout, for
#   export LOOPC_PTXAS="$(scripts/install-ptxas.sh)"
# The CUDA tests (tests/cuda_backend.rs, feature `mlir`) assemble every generated PTX module with
# it (`ptxas -arch=sm_90`). Usage: scripts/install-ptxas.sh [venv dir, default target/ptxas-venv]
# Progress goes to stderr.
set -euo pipefail
venv="${1:-target/ptxas-venv}"

find_ptxas() {
  "$venv/bin/python" -c \
    'import nvidia.cuda_nvcc as m, os; print(os.path.join(list(m.__path__)[0], "bin", "ptxas"))' \
    2>/dev/null
}

if [ -x "$venv/bin/python" ] && p="$(find_ptxas)" && [ -x "$p" ]; then
  echo "$p"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
# A bare Debian may lack python3, or its venv module (ensurepip is packaged separately).
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update >&2
  $sudo apt-get install -y --no-install-recommends python3 python3-venv >&2
fi
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check nvidia-cuda-nvcc-cu12 >&2
p="$(find_ptxas)"
[ -x "$p" ] || { echo "ptxas not found after installing nvidia-cuda-nvcc-cu12 into $venv" >&2; exit 1; }
"$p" --version >&2
echo "$p"
