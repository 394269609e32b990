#!/usr/bin/env bash
# Every GPU check in one run of at most 5 minutes, from executables built here (the GPU machine has no Rust
# toolchain and gives one or two tries):
#
#   scripts/gpu-check.sh --stage            build with CI's features and profile (so after CI's build nothing is
#                                           rebuilt), copy the executables, stripped, to target/gpu-check/ and check
#                                           that they and the working tree fit in 56 MiB (the device tool carries 64)
#   scripts/gpu-check.sh OUTDIR             on the GPU machine (carry target/gpu-check): run them
#   scripts/gpu-check.sh --dry-run OUTDIR   the same run where there is no GPU: every step must fail, naming
#                                           "no CUDA device" (scripts/test.sh checks that it does)
#
# Phase 1 (≤ 90 s) runs every correctness test — the kernels (tests/cuda.rs), every backend against the CPU one on
# the same engines (tests/backends.rs: the CUDA engine alone and in batched decode steps, on the four HF fixtures
# and SmolLM2's shape at 2K) and what only the CUDA engine has (tests/cuda_engine.rs: graphs vs eager, concurrent
# streams, clear errors) — and writes OUTDIR/gpu-check.json; then TensorRT where it is installed (tests/backends.rs's
# TensorRT candidate: plans built and run against the CPU; one "skipped" line without libnvinfer). Phase 2 runs the
# benchmarks — kernels, the engine on Llama-3.1-8B's shape (TTFT full vs FastKV at 32K, then 128K; decode vs the
# bandwidth bound; graphs vs eager; batches of 1, 4 and 16) and HF transformers (SDPA, bf16) at 32K beside it — and
# rewrites the JSON as each result arrives, so a timeout or crash there loses nothing measured before.
# FASTKV_REQUIRE_GPU=1 makes every "no CUDA device" (driver, GPU, kernel image, cuBLAS, memory) a failure that names
# its cause, never a skip. Logs: OUTDIR/logs/STEP.log.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=target/gpu-check
features=fastkv/cuda,fastkv/tensorrt # scripts/test.sh's
limit_mib=56

usage() { echo "usage: $0 --stage | OUTDIR | --dry-run OUTDIR" >&2; exit 2; }

toolchain() {
  if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null; then
    CUDA_HOME=$(scripts/install-cuda-toolchain.sh) || { echo "gpu-check: no nvcc and its install failed" >&2; return 1; }
  fi
  [ -z "${CUDA_HOME:-}" ] || export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
}

# Prints "TARGET-NAME KIND PATH" for every executable cargo reports in its JSON messages on stdin.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            print(m["target"]["name"], m["target"]["kind"][0], m["executable"])'
}

stage() {
  toolchain || return 1
  local found
  found=$( { cargo test --release --locked --workspace --features "$features" --no-run --message-format=json-render-diagnostics &&
             cargo build --release --locked --workspace --benches --features "$features" --message-format=json-render-diagnostics; } |
           executables) || { echo "gpu-check: build failed" >&2; return 1; }
  rm -rf "$bin" && mkdir -p "$bin"
  local name kind path
  for want in "cuda test cuda-tests" "backends test backend-tests" "cuda_engine test cuda-engine-tests" \
              "kernels bench kernels-bench" "cuda_engine bench engine-bench"; do
    read -r name kind path <<<"$want"
    local exe
    exe=$(awk -v n="$name" -v k="$kind" '$1 == n && $2 == k { print $3 }' <<<"$found" | tail -1)
    [ -x "$exe" ] || { echo "gpu-check: the build made no $kind target $name" >&2; return 1; }
    cp "$exe" "$bin/$path"
  done
  strip --strip-all "$bin"/*
  # The device tool carries the working tree (tracked and untracked, not ignored) plus the carried folder.
  python3 - "$bin" "$limit_mib" <<'EOF'
import json, os, subprocess, sys
bin_dir, limit = sys.argv[1], int(sys.argv[2]) << 20
tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                      capture_output=True, check=True).stdout.decode().split("\0")
tree_bytes = sum(os.path.getsize(f) for f in tree if f and os.path.isfile(f))
exes = {f: os.path.getsize(os.path.join(bin_dir, f)) for f in sorted(os.listdir(bin_dir))}
total = tree_bytes + sum(exes.values())
report = {"executables": exes, "tree_bytes": tree_bytes, "total_bytes": total, "limit_bytes": limit,
          "fits": total <= limit}
json.dump(report, open(os.path.join(bin_dir, "bundle.json"), "w"), indent=1)
for f, n in exes.items():
    print(f"  {f}: {n / 2**20:.1f} MiB", file=sys.stderr)
print(f"gpu-check bundle: {total / 2**20:.1f} MiB ({tree_bytes / 2**20:.1f} MiB working tree + "
      f"{sum(exes.values()) / 2**20:.1f} MiB executables) of {limit >> 20} MiB", file=sys.stderr)
if total > limit:
    sys.exit(f"gpu-check: the bundle is {total / 2**20:.1f} MiB, over the {limit >> 20} MiB it may take "
             "(the device tool carries 64 MiB in all): shrink the executables or the working tree")
EOF
}

case "${1:-}" in
  --stage) [ $# -eq 1 ] || usage; stage; exit $? ;;
  --dry-run) [ $# -eq 2 ] || usage; dry=1; out=$2 ;;
  -*|"") usage ;;
  *) [ $# -eq 1 ] || usage; dry=0; out=$1 ;;
esac

mkdir -p "$out/logs" && out=$(cd "$out" && pwd)
rm -f "$out"/*.json "$out/steps.tsv" "$out"/logs/*.log
report() { python3 scripts/gpu-check-report.py "$out" "$bin"; }
if [ ! -f "$bin/bundle.json" ]; then
  # Never build here: the GPU machine has no Rust toolchain, and a build would eat the run's minutes.
  echo "gpu-check: $bin/ is not staged: run scripts/gpu-check.sh --stage where the project builds, and carry $bin" >&2
  report
  exit 1
fi
chmod +x "$bin"/*-tests "$bin"/*-bench # the copy may drop the run bit
export FASTKV_REQUIRE_GPU=1 FASTKV_ROOT=$PWD FASTKV_BENCH_JSON=$out/kernels-bench.json
[ "$dry" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1
# cuBLAS from the Python environment's nvidia wheels, where the GPU machine keeps it.
if [ -z "${FASTKV_CUBLAS_DIR:-}" ]; then
  FASTKV_CUBLAS_DIR=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
  [ -d "$FASTKV_CUBLAS_DIR" ] || FASTKV_CUBLAS_DIR=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null)
  export FASTKV_CUBLAS_DIR
fi

step() { # NAME SECONDS COMMAND...: runs it under a time limit, logs it, records rc and time, rewrites the JSON
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name: $*" >&2
  timeout --kill-after=5 "$limit" "$@" >"$out/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >>"$out/steps.tsv"
  echo "== $name: rc $rc in $((SECONDS - t0)) s" >&2
  report >/dev/null
}
# Test executables list their tests first, so a crash shows which tests never ran.
for t in kernel-tests:cuda-tests backend-tests:backend-tests engine-tests:cuda-engine-tests tensorrt:backend-tests; do
  "$bin/${t#*:}" --list --format terse >"$out/logs/${t%%:*}.list" 2>/dev/null
done

# Phase 1: correctness (≤ 90 s).
step kernel-tests 30 "$bin/cuda-tests" --test-threads 1 --show-output
FASTKV_BACKENDS="cpu batched decode,cuda:0,cuda:0 batched decode" \
  step backend-tests 35 "$bin/backend-tests" --test-threads 1 --show-output
step engine-tests 25 "$bin/cuda-engine-tests" --test-threads 1 --show-output
# TensorRT (where its libraries are installed; one "skipped" line where not): plans built for the fixtures and
# SmolLM2's shape, run on tensorrt:0 against the CPU like every backend.
FASTKV_BACKENDS=tensorrt:0 step tensorrt 90 "$bin/backend-tests" --test-threads 1 --show-output
# Phase 2: benchmarks, each result in the JSON as soon as it exists.
step kernel-bench 25 "$bin/kernels-bench"
step engine-bench 120 "$bin/engine-bench" --preset llama-3.1-8b --lengths 32768,131072 --decode-steps 64 \
  --json "$out/engine-bench.json"
step hf-transformers 60 python3 benches/peers/hf_gpu.py --preset llama-3.1-8b --lengths 32768 --json "$out/hf.json"
report
