#!/usr/bin/env bash
# Installs what tests/onnx.rs runs the exported graphs with — onnx (checker) and onnxruntime (CPU), pinned — into
# target/onnx-py (pip --target, no torch), once; prints that folder, which the tests put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/onnx-py
pins=(onnx==1.23.2 onnxruntime==1.32.0 numpy==2.3.5)
stamp="$dir/.installed-$(printf '%s ' "${pins[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
    echo "installing ${pins[*]} into $dir" >&2
    rm -rf "$dir"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --target "$dir" "${pins[@]}" >&2
    touch "$stamp"
fi
printf '%s\n' "$dir"
