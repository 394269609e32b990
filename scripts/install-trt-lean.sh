#!/usr/bin/env bash
# Installs NVIDIA's TensorRT lean runtime (PyPI wheel tensorrt-lean-cu12-libs, 46 MB) into target/trt-lean
# (idempotent) and prints the path of libnvinfer_lean.so.11 for FASTKV_TRT_LEAN_LIB:
#   export FASTKV_TRT_LEAN_LIB=$(scripts/install-trt-lean.sh)
# Its plugin registry works without a GPU, so tests/trt_plugins.rs checks our plugin library in it.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/trt-lean
find_lib() { find "$dest" -name 'libnvinfer_lean.so.11' -print -quit 2>/dev/null; }
if [ -z "$(find_lib)" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-warn-conflicts --no-deps \
    --upgrade --target "$dest" 'tensorrt-lean-cu12-libs==11.4.0.106' >&2
fi
lib=$(find_lib)
[ -n "$lib" ] || { echo "install-trt-lean: libnvinfer_lean.so.11 missing after install" >&2; exit 1; }
echo "$(cd "$(dirname "$lib")" && pwd)/$(basename "$lib")"
