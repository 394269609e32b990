#!/usr/bin/env bash
# Runs every test from a fresh clone (what CI runs). Installs what the tests need — the real models and essays
# (scripts/models.sh), onnx + onnxruntime (scripts/onnx-deps.sh), the CUDA compiler wheels so the kernels in plugin/ always compile, the TensorRT lean runtime
# (its plugin registry works without a GPU), Triton Inference Server (triton/run-tests.sh), the official `openai` client
# and schemathesis (server/run-tests.sh), NVIDIA Dynamo's frontend and runtime (dynamo/run-tests.sh) — then runs the Rust tests
# with the `cuda` and `tensorrt` features (without a GPU each CUDA test prints "skipped: no CUDA device"; the TensorRT
# plugin library is checked in the lean runtime's registry), builds the benchmarks with the same features (one build),
# checks that the crate without features still builds, and tests the Triton backend, `fastkv serve` and fastkv as a
# Dynamo worker against real servers on the bundled model. The Rust tests include the fuzz smoke run (tests/fuzz.rs, about a minute) on the seed corpora
# scripts/fuzz-corpus.sh writes first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/models.sh >/dev/null
scripts/onnx-deps.sh >/dev/null  # onnx + onnxruntime for tests/onnx.rs
CUDA_HOME=$(scripts/install-cuda-toolchain.sh)
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
FASTKV_TRT_LEAN_LIB=$(scripts/install-trt-lean.sh)
export FASTKV_TRT_LEAN_LIB
export FASTKV_FEATURES=fastkv/cuda,fastkv/tensorrt
# Everything is installed above: a test whose model, package or corpus is missing fails instead of skipping.
export FASTKV_FULL_TESTS=1
scripts/fuzz-corpus.sh >/dev/null
cargo test --release --locked --workspace --features "$FASTKV_FEATURES"
cargo build --release --locked --workspace --benches --features "$FASTKV_FEATURES"
# The GPU run's bundle, from the build above, and that run on this GPU-less machine: every step must fail naming
# "no CUDA device", none may claim success, and the bundle must fit what the GPU machine takes.
scripts/gpu-check.sh --stage
! scripts/gpu-check.sh --dry-run target/gpu-check-dry-run >/dev/null
python3 scripts/gpu-check-report.py --expect-no-device target/gpu-check-dry-run
cargo check --release --locked -p fastkv
FASTKV_TRITON_CHECKPOINT=target/models/SmolLM2-135M-Instruct.Q4_1.gguf triton/run-tests.sh
server/run-tests.sh
dynamo/run-tests.sh
