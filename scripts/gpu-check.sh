#!/usr/bin/env bash
# Every GPU check in one go (one H200: about 4 minutes), from executables built here: the kernel tests
# (tests/cuda.rs) and the CUDA engine against the CPU backend on the same machine (tests/cuda_engine.rs: the
# four HF fixtures and a random-weight SmolLM2-shaped engine at 2K tokens, full KV and FastKV, graphs vs eager),
# the kernel benchmark, the engine benchmark on Llama-3.1-8B's shape (TTFT full vs FastKV at 32K and 128K,
# prefill FLOP rate, decode vs the bandwidth bound, graphs vs eager) and HF transformers (SDPA, bf16, same
# shape and tokens) as the side-by-side anchor. Writes OUTDIR/gpu-check.json (results) and OUTDIR/gpu-check.log.
#   scripts/gpu-check.sh --stage   build here (nvcc from CUDA_HOME/PATH, else the CUDA 13.0 wheels) and put the
#                                  executables, stripped, in target/gpu-check/: carry that folder (< 64 MiB).
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

# Prints the path of the executable cargo built for target $2 (e.g. "tests/cuda.rs") from its output $1.
executable() { sed -nE "s#.*Executable $2 \\((.*)\\)#\\1#p" <<<"$1" | tail -1; }

# Builds the test and bench executables and copies them to $bin (stripped of debug info).
stage() {
  toolchain || return 1
  local out
  out=$(cargo test --release --features cuda --test cuda --test cuda_engine --no-run 2>&1 | tee /dev/stderr) || return 1
  local tests engine_tests
  tests=$(executable "$out" tests/cuda.rs) engine_tests=$(executable "$out" tests/cuda_engine.rs)
  out=$(cargo bench --features cuda --bench kernels --bench cuda_engine --no-run 2>&1 | tee /dev/stderr) || return 1
  local kernels engine
  kernels=$(executable "$out" benches/kernels.rs) engine=$(executable "$out" benches/cuda_engine.rs)
  for f in "$tests" "$engine_tests" "$kernels" "$engine"; do
    [ -x "$f" ] || { echo "gpu-check: build failed (missing $f)" >&2; return 1; }
  done
  mkdir -p "$bin"
  cp "$tests" "$bin/cuda-tests" && cp "$engine_tests" "$bin/cuda-engine-tests"
  cp "$kernels" "$bin/kernels-bench" && cp "$engine" "$bin/engine-bench"
  strip --strip-all "$bin"/*
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
step() { # name, seconds, command...: runs it with a time limit, appends its output to the log, records rc and time
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name: $*" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$log"
  steps+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
  return $rc
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$log" 2>&1
# cuBLAS from the Python environment's nvidia wheels, where the GPU machine keeps it.
if [ -z "${FASTKV_CUBLAS_DIR:-}" ]; then
  FASTKV_CUBLAS_DIR=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
  [ -d "$FASTKV_CUBLAS_DIR" ] || FASTKV_CUBLAS_DIR=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null)
  export FASTKV_CUBLAS_DIR
fi
export FASTKV_ROOT=$PWD FASTKV_BENCH_JSON=$out/kernels-bench.json
rm -f "$FASTKV_BENCH_JSON" "$out/engine-bench.json" "$out/hf.json"
ok=1
if [ ! -x "$bin/engine-bench" ]; then
  step build 600 scripts/gpu-check.sh --stage || ok=0
fi
if [ $ok = 1 ]; then
  step kernel-tests 90 "$bin/cuda-tests" --nocapture --test-threads 1
  step engine-tests 100 "$bin/cuda-engine-tests" --nocapture --test-threads 1
  step kernel-bench 40 "$bin/kernels-bench"
  step engine-bench 150 "$bin/engine-bench" --preset llama-3.1-8b --lengths 32768,131072 --decode-steps 64 \
    --json "$out/engine-bench.json"
  step hf-transformers 90 python3 benches/peers/hf_gpu.py --preset llama-3.1-8b --lengths 32768 --json "$out/hf.json"
fi
# Per-test verdicts from the libtest lines, then one JSON with the steps, tests and benchmarks.
tests=$(sed -nE 's/^test ([a-z_0-9]+) \.\.\. ([a-zA-Z]+).*/"\1": "\2",/p' "$log" | tr -d '\n')
{
  echo "{"
  echo "\"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)\","
  echo "\"steps\": {$(IFS=,; echo "${steps[*]}")},"
  echo "\"tests\": {${tests%,}},"
  echo "\"skipped_no_device\": $(grep -c 'skipped: no CUDA device' "$log"),"
  echo "\"kernel_bench\": $(cat "$FASTKV_BENCH_JSON" 2>/dev/null || echo null),"
  echo "\"engine_bench\": $(cat "$out/engine-bench.json" 2>/dev/null || echo null),"
  echo "\"hf_transformers\": $(cat "$out/hf.json" 2>/dev/null || echo null)"
  echo "}"
} >"$out/gpu-check.json"
cat "$out/gpu-check.json"
! grep -q '"rc": [1-9]' "$out/gpu-check.json"
