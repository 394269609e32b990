#!/usr/bin/env bash
# Runs every test from a fresh clone (what CI runs). Installs what the tests need — the real models and essays
# (scripts/models.sh), onnx + onnxruntime (scripts/onnx-deps.sh), the CUDA compiler wheels so the kernels in plugin/
# always compile, Triton Inference Server (triton/run-tests.sh) — then runs the Rust tests with the `cuda` feature
# (without a GPU each CUDA test prints "skipped: no CUDA device"), builds the benchmarks, and tests the Triton backend
# against a real server on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/models.sh >/dev/null
scripts/onnx-deps.sh >/dev/null  # onnx + onnxruntime for tests/onnx.rs
CUDA_HOME=$(scripts/install-cuda-toolchain.sh)
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
cargo test --release --locked --workspace --features fastkv/cuda
cargo build --release --locked --benches --features cuda
FASTKV_TRITON_CHECKPOINT=target/models/SmolLM2-135M-Instruct.Q4_1.gguf triton/run-tests.sh
