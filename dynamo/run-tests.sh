#!/usr/bin/env bash
# Tests fastkv as an NVIDIA Dynamo worker on this machine (dynamo/test_cluster.py): Dynamo's frontend
# and several fastkv workers on loopback, with file discovery, driven by the official openai client.
# Builds nothing Rust-side: it uses the fastkv binary already built (FASTKV_CLI, default
# target/release/fastkv) and an engine directory (first argument or FASTKV_DYNAMO_ENGINE, default
# target/engines/serve-test, which server/run-tests.sh builds from the bundled SmolLM2; when it is
# missing and that checkpoint is there, fastkv-build makes it). Installs the Python side with
# dynamo/install.sh (idempotent). FASTKV_DYNAMO_DISCOVERY=etcd runs the same tests on etcd + NATS
# (Debian's packages, installed by dynamo/install.sh --etcd) instead of Dynamo's file discovery.
set -euo pipefail
cd "$(dirname "$0")/.."
export FASTKV_CLI=${FASTKV_CLI:-$PWD/target/release/fastkv}
ENGINE=${1:-${FASTKV_DYNAMO_ENGINE:-target/engines/serve-test}}
CHECKPOINT=target/models/SmolLM2-135M-Instruct.Q4_1.gguf

[ -x "$FASTKV_CLI" ] || { echo "run-tests.sh: $FASTKV_CLI not found; build it first (cargo build --release -p fastkv-cli)" >&2; exit 1; }
if [ ! -f "$ENGINE/engine.json" ]; then
  if [ "$ENGINE" = target/engines/serve-test ] && [ -f "$CHECKPOINT" ] && [ -x target/release/fastkv-build ]; then
    echo "run-tests.sh: building $ENGINE from $CHECKPOINT"
    target/release/fastkv-build --checkpoint "$CHECKPOINT" --output "$ENGINE" --force --no-calibrate >/dev/null
  else
    echo "run-tests.sh: no engine at $ENGINE (give an engine directory, or run server/run-tests.sh)" >&2
    exit 1
  fi
fi
dynamo/install.sh $([ "${FASTKV_DYNAMO_DISCOVERY:-file}" = etcd ] && echo --etcd)

export FASTKV_DYNAMO_ENGINE=$(cd "$ENGINE" && pwd)
export FASTKV_DYNAMO_PYTHON=$PWD/target/dynamo-py/bin/python
export PYTHONPATH="$PWD/target/server-py${PYTHONPATH:+:$PYTHONPATH}"
timeout 900 python3 dynamo/test_cluster.py
