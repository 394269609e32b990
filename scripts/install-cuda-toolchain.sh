#!/usr/bin/env bash
# Installs the CUDA 13.0 nvcc PyPI wheels into target/cuda-toolchain (idempotent; leaves the system
# Python's packages, e.g. torch, alone) and prints the CUDA_HOME to use:
#   export CUDA_HOME=$(scripts/install-cuda-toolchain.sh) PATH=$CUDA_HOME/bin:$PATH
# Only the CUDA 13 wheels carry a complete nvcc; 13.0 matches driver 580 so its PTX JITs there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/cuda-toolchain
home=$dest/nvidia/cu13
if [ ! -x "$home/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-warn-conflicts --upgrade --target "$dest" \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
    'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' >&2
fi
# The wheels split the toolkit over several packages that all install into nvidia/cu13, and
# nvcc expects ptxas, cicc (nvvm) and the headers at their usual places under that one prefix.
[ -x "$home/bin/nvcc" ] || { echo "install-cuda-toolchain: nvcc missing after install" >&2; exit 1; }
"$home/bin/nvcc" --version >&2
echo "$(cd "$home" && pwd)"
