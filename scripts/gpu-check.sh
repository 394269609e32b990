#!/usr/bin/env bash
# Every GPU check in one go (one H200: a few minutes): the GPU tests of tests/cuda.rs against the host
# reference and the kernel benchmark (benches/kernels.rs); writes OUTDIR/gpu-check.json (results) and
# OUTDIR/gpu-check.log (everything printed).
#   scripts/gpu-check.sh --stage   build here (nvcc from CUDA_HOME/PATH, else the CUDA 13.0 wheels) and
#                                  put both executables, stripped, in target/gpu-check/ (~15 MB): for a
#                                  GPU machine without Rust or network, carry that folder.
#   scripts/gpu-check.sh OUTDIR    run them: the staged executables when present, else build with cargo.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 --stage | OUTDIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
bin=target/gpu-check

toolchain() {
  if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null; then
    CUDA_HOME=$(scripts/install-cuda-toolchain.sh) || { echo "gpu-check: no nvcc and its install failed" >&2; return 1; }
  fi
  [ -z "${CUDA_HOME:-}" ] || export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
}

# Builds the test and bench executables and copies them to $bin (stripped of debug info).
stage() {
  toolchain || return 1
  local tests bench
  tests=$(cargo test --release --features cuda --test cuda --no-run 2>&1 | tee /dev/stderr |
    sed -nE 's/.*Executable tests\/cuda\.rs \((.*)\)/\1/p') || return 1
  bench=$(cargo bench --features cuda --bench kernels --no-run 2>&1 | tee /dev/stderr |
    sed -nE 's/.*Executable benches\/kernels\.rs \((.*)\)/\1/p') || return 1
  [ -x "$tests" ] && [ -x "$bench" ] || { echo "gpu-check: build failed" >&2; return 1; }
  mkdir -p "$bin"
  cp "$tests" "$bin/cuda-tests" && cp "$bench" "$bin/kernels-bench"
  strip --strip-debug "$bin/cuda-tests" "$bin/kernels-bench"
  ls -l "$bin" >&2
}

if [ "$1" = --stage ]; then
  stage
  exit $?
fi
mkdir -p "$1" && out=$(cd "$1" && pwd)
log=$out/gpu-check.log
steps=()
: >"$log"
step() { # name, command...: runs it with a time limit, appends its output to the log, records rc and seconds
  local name=$1 t0=$SECONDS rc
  shift
  echo "== $name: $*" | tee -a "$log"
  timeout 280 "$@" >>"$log" 2>&1
  rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$log"
  steps+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
  return $rc
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$log" 2>&1
export FASTKV_BENCH_JSON=$out/kernels-bench.json
rm -f "$FASTKV_BENCH_JSON"
ok=1
if [ ! -x "$bin/cuda-tests" ] || [ ! -x "$bin/kernels-bench" ]; then
  step build scripts/gpu-check.sh --stage || ok=0
fi
if [ $ok = 1 ]; then
  step tests "$bin/cuda-tests" --nocapture --test-threads 1
  step bench "$bin/kernels-bench"
fi
# Per-test verdicts from the libtest lines, then one JSON with the steps, tests and benchmark.
tests=$(sed -nE 's/^test ([a-z_0-9]+) \.\.\. ([a-zA-Z]+).*/"\1": "\2",/p' "$log" | tr -d '\n')
{
  echo "{"
  echo "\"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)\","
  echo "\"steps\": {$(IFS=,; echo "${steps[*]}")},"
  echo "\"tests\": {${tests%,}},"
  echo "\"skipped_no_device\": $(grep -c 'skipped: no CUDA device' "$log"),"
  echo "\"bench\": $(cat "$FASTKV_BENCH_JSON" 2>/dev/null || echo null)"
  echo "}"
} >"$out/gpu-check.json"
cat "$out/gpu-check.json"
! grep -q '"rc": [1-9]' "$out/gpu-check.json"
