#!/usr/bin/env bash
# Builds libtriton_fastkv.so and a test engine, then runs the integration tests against a real
# Triton server (nvidia-pytriton's, CPU only). Idempotent; the first run installs the Python packages
# into target/triton-py. FASTKV_TRITON_CHECKPOINT picks the checkpoint (default: the test fixture).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=target/triton-py
CHECKPOINT=${FASTKV_TRITON_CHECKPOINT:-tests/fixtures/llama}
ENGINE=target/engines/triton-$(basename "$CHECKPOINT")

if [ ! -x "$PY/pytriton/tritonserver/bin/tritonserver" ] || [ ! -d "$PY/tritonclient" ]; then
  python3 -m pip install --quiet --target "$PY" nvidia-pytriton==0.7.0 'tritonclient[http,grpc]==2.73.0'
fi
# With FASTKV_FEATURES (scripts/test.sh's), the build the tests made is reused: the same packages and features, and
# --benches keeps the dev-dependencies in the feature resolution (with --lib --bins: --benches alone would select only
# benches), so nothing is compiled a second time.
if [ -n "${FASTKV_FEATURES:-}" ]; then
  cargo build --release --locked --workspace --features "$FASTKV_FEATURES" --lib --bins --benches
else
  cargo build --release --locked -p fastkv-triton -p fastkv-cli
fi
mkdir -p target/triton-backends/fastkv
cp target/release/libtriton_fastkv.so target/triton-backends/fastkv/
target/release/fastkv-build --checkpoint "$CHECKPOINT" --output "$ENGINE" --force --no-calibrate >/dev/null

export PYTHONPATH="$PWD/$PY${PYTHONPATH:+:$PYTHONPATH}"
export FASTKV_TRITONSERVER="$PWD/$PY/pytriton/tritonserver/bin/tritonserver"
export FASTKV_TRITON_BACKENDS="$PWD/target/triton-backends"
export FASTKV_TRITON_ENGINE="$PWD/$ENGINE"
export FASTKV_CLI="$PWD/target/release/fastkv"
timeout 600 python3 -m unittest discover -s triton/tests -v
